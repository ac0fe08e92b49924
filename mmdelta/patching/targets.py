"""From ``targets`` / ``exclude`` glob patterns to the concrete layers a patch wraps."""

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..branches import PATCHABLE_LAYERS
from ..branches.owned import owned_tensor_names
from .config import DeltaPatchConfigError
from .slot import DeltaSlot

#: normalisation layers a patch can own (task-specific normalisation)
NORM_LAYERS = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm)
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
    #: layers the branch type found too small (``LayerTooSmall``): (path, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)


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


def _submodules(model: nn.Module) -> dict[str, nn.Module]:
    """Path -> module for every base module below the root (the root itself left out)."""
    modules = dict(base_modules(model))
    modules.pop("", None)
    return modules


def _is_conv_like(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() in (3, 4, 5)


def _is_called_by_its_owner(path: str, modules: dict[str, nn.Module]) -> bool:
    """False for layers whose owner reads their weight without calling them.

    ``nn.MultiheadAttention`` uses ``out_proj.weight`` directly, so a patched forward of
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


def _match(model: nn.Module, paths: list[str], key: str, patterns: list[str]) -> set[str]:
    hit = set()
    for pattern in patterns:
        found = [p for p in paths if fnmatchcase(p, pattern)]
        if not found:
            raise _no_match_error(key, pattern, paths, model)
        hit.update(found)
    return hit


def _under(path: str, prefixes: set[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in prefixes)


def resolve_targets(
    model: nn.Module,
    targets: list[str],
    exclude: list[str],
    supports: Callable[[nn.Module], bool] = lambda m: isinstance(m, PATCHABLE_LAYERS),
    reserved: set[str] = frozenset(),
) -> TargetLayers:
    """Expands the patterns into the layers to patch, in model order, without duplicates.

    ``supports`` says which modules the branch type attaches to; modules under a
    ``reserved`` path (patch-owned modules) are left out.

    Raises:
        DeltaPatchConfigError: a pattern matches nothing, or nothing patchable remains.
    """
    modules = _submodules(model)
    paths = list(modules)
    roots = _match(model, paths, "targets", targets)
    excluded_roots = _match(model, paths, "exclude", exclude) | set(reserved)

    result = TargetLayers()
    taken: set[str] = set()
    for path, module in modules.items():
        if not _under(path, roots) or _under(path, excluded_roots) or _under(path, taken):
            continue
        direct = path in roots
        is_classifier = path.rpartition(".")[2] in CLASSIFIER_NAMES
        if supports(module):
            if (direct or not is_classifier) and _is_called_by_its_owner(path, modules):
                result.layers.append((path, module))
                taken.add(path)
        elif _is_conv_like(module) and not is_classifier:
            result.unsupported.append((path, type(module).__name__))
    return result


def resolve_owned(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module]]:
    """The layers a patch owns for ``trainable`` patterns: every module under a matched
    path that holds tensors of its own (children read without a call, such as
    ``nn.MultiheadAttention.out_proj``, belong to their owner), in model order."""
    modules = _submodules(model)
    roots = _match(model, list(modules), "trainable", patterns)
    owned = [
        (path, module)
        for path, module in modules.items()
        if _under(path, roots)
        and owned_tensor_names(module)
        and _is_called_by_its_owner(path, modules)
    ]
    if not owned:
        raise DeltaPatchConfigError(
            f"delta_patch.trainable {patterns} names modules without parameters or buffers"
        )
    return owned


def norm_layers(model: nn.Module, targets: list[str], exclude: list[str], reserved: set[str]):
    """Normalisation layers (BatchNorm, SyncBN, LayerNorm, GroupNorm, InstanceNorm with
    affine or running statistics) under ``targets``, for task-specific normalisation."""
    modules = _submodules(model)
    paths = list(modules)
    roots = _match(model, paths, "targets", targets)
    excluded = _match(model, paths, "exclude", exclude) | set(reserved)
    return [
        (path, m)
        for path, m in modules.items()
        if _under(path, roots)
        and not _under(path, excluded)
        and isinstance(m, NORM_LAYERS)
        and owned_tensor_names(m)
    ]


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
