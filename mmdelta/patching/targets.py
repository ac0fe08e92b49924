"""From ``targets`` / ``exclude`` glob patterns to the concrete layers a patch wraps."""

import difflib
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn

from .config import DeltaPatchConfigError
from .slot import DeltaSlot

#: layer classes (and their subclasses) a Δ branch can be attached to
PATCHABLE_LAYERS = (nn.Conv2d, nn.Linear)
#: final prediction layers of OpenMMLab heads: a container pattern never expands into them
CLASSIFIER_NAMES = frozenset(
    {
        "conv_seg",  # mmseg decode heads
        "fc_cls",  # mmdet bbox heads
        "fc_reg",
        "retina_cls",  # mmdet RetinaHead
        "retina_reg",
        "rpn_cls",  # mmdet RPNHead
        "rpn_reg",
        "conv_cls",  # mmdet anchor-free / dense heads
        "conv_reg",
        "conv_centerness",
        "conv_logits",  # mmdet mask heads
        "fc",  # mmpretrain LinearClsHead
    }
)


@dataclass
class TargetLayers:
    """The resolved placement of a patch (module paths are dotted, relative to the model)."""

    layers: list[tuple[str, nn.Module]] = field(default_factory=list)
    #: conv-like layers inside the targets that no branch supports (e.g. DCN): (path, type)
    unsupported: list[tuple[str, str]] = field(default_factory=list)


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` of the base model: everything except Δ slots and their contents.

    Like ``named_modules()``, a module shared by several parents is yielded once.
    """
    seen = set()
    stack = [("", model)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module
        children = [
            (f"{path}.{name}" if path else name, child)
            for name, child in module.named_children()
            if not isinstance(child, DeltaSlot)
        ]
        stack.extend(reversed(children))


def _is_conv_like(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() in (3, 4, 5)


def _is_hooked_by_forward(path: str, modules: dict[str, nn.Module]) -> bool:
    """False for layers whose owner reads their weight without calling them.

    ``nn.MultiheadAttention`` uses ``out_proj.weight`` directly, so a forward hook on
    ``out_proj`` would never run.
    """
    parent = modules.get(path.rpartition(".")[0])
    return not isinstance(parent, nn.MultiheadAttention)


def _no_match_error(key: str, pattern: str, paths: list[str], model: nn.Module) -> Exception:
    close = difflib.get_close_matches(pattern, paths, n=5, cutoff=0.6)
    top = [name for name, _ in model.named_children()]
    hint = f" Close matches: {close}." if close else ""
    return DeltaPatchConfigError(
        f"delta_patch.{key} pattern {pattern!r} matches no module of the model.{hint} "
        f"Top-level modules: {top}. Patterns are fnmatch globs over dotted module paths, "
        "e.g. 'backbone', 'backbone.layer3', 'neck.*_convs.*'."
    )


def resolve_targets(model: nn.Module, targets: list[str], exclude: list[str]) -> TargetLayers:
    """Expands the patterns into the layers to patch, in model order, without duplicates.

    Raises:
        DeltaPatchConfigError: a pattern matches nothing, or nothing patchable remains.
    """
    modules = dict(base_modules(model))
    modules.pop("", None)
    paths = list(modules)

    def matching(key: str, patterns: list[str]) -> set[str]:
        hit = set()
        for pattern in patterns:
            found = [p for p in paths if fnmatchcase(p, pattern)]
            if not found:
                raise _no_match_error(key, pattern, paths, model)
            hit.update(found)
        return hit

    roots = matching("targets", targets)
    excluded_roots = matching("exclude", exclude)

    def under(path: str, prefixes: set[str]) -> bool:
        return any(path == r or path.startswith(r + ".") for r in prefixes)

    result = TargetLayers()
    for path, module in modules.items():
        if not under(path, roots) or under(path, excluded_roots):
            continue
        direct = path in roots
        is_classifier = path.rpartition(".")[2] in CLASSIFIER_NAMES
        if isinstance(module, PATCHABLE_LAYERS):
            if (direct or not is_classifier) and _is_hooked_by_forward(path, modules):
                result.layers.append((path, module))
        elif _is_conv_like(module) and not is_classifier:
            result.unsupported.append((path, type(module).__name__))
    if not result.layers:
        found = sorted({type(modules[p]).__name__ for p in paths if under(p, roots)})
        raise DeltaPatchConfigError(
            f"delta_patch: nothing to patch: targets {targets} (exclude {exclude}) contain no "
            f"nn.Conv2d / nn.Linear layer. Module types found there: {found}."
        )
    return result


def _is_plain_container(module: nn.Module) -> bool:
    """A ``ModuleList``/``Sequential`` (or subclass) that adds no forward logic of its own."""
    return isinstance(module, (nn.ModuleList, nn.Sequential)) and type(module).forward in (
        nn.Module.forward,
        nn.Sequential.forward,
    )


def stage_of(model: nn.Module, path: str) -> str:
    """The stage a layer belongs to, for reporting: ``backbone.layer2``, ``backbone.stages.1``,
    ``neck.lateral_convs``, ``decode_head.psp_modules``, …

    It is the top-level module plus its child on the path, one level deeper when that child
    is a plain list of plain lists (ConvNeXt's ``stages`` and ``downsample_layers``).
    """
    parts = path.split(".")
    depth = min(2, len(parts))
    module = model.get_submodule(".".join(parts[:depth]))
    if (
        len(parts) > depth + 1
        and _is_plain_container(module)
        and all(_is_plain_container(child) for child in module.children())
    ):
        depth += 1
    return ".".join(parts[:depth])
