"""``apply_delta_patch``: patch a model in place; ``build_patch`` / ``attach_patch`` below it."""

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from mmengine.logging import print_log
from torch import nn

from ..branches import LayerTooSmall, PatchOwned
from .classes import ClassChange, base_class_names, default_head_layers, plan_class_change
from .config import DeltaPatchConfigError, branch_type, resolve_config
from .slot import slot_of
from .state import active_patch, delta_disabled, patch_configs, patch_state
from .summary import PatchSummary, count_base_params, describe_layer
from .targets import norm_layers, resolve_owned, resolve_targets


@dataclass
class BuiltPatch:
    """Everything a patch adds to a model, built but not yet attached."""

    name: str
    cfg: dict
    #: (layer path, layer, branch): Δ branches, patch-owned layers and task norms
    branches: list[tuple[str, nn.Module, nn.Module]] = field(default_factory=list)
    classes: ClassChange | None = None
    summary: PatchSummary | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """``"<layer>:<tensor>"`` (the patch-file keys) -> every tensor the patch holds."""
        return {
            f"{path}:{key}": t
            for path, _, branch in self.branches
            for key, t in branch.state_dict().items()
        }


def build_patch(model: nn.Module, cfg: Mapping | None, name: str | None = None) -> BuiltPatch:
    """Validates ``cfg`` and builds the patch's branches without touching ``model``.

    ``name`` overrides ``cfg['name']``. Raises :class:`DeltaPatchConfigError` for every
    problem the config has with this model.

    The patch is built against the base: while another patch is active (its class count in
    the heads, its branches in the layers' forwards) it is switched off for the build.
    """
    if active_patch(model) is not None:
        with delta_disabled(model):
            return _build_patch(model, cfg, name)
    return _build_patch(model, cfg, name)


def _build_patch(model: nn.Module, cfg: Mapping | None, name: str | None) -> BuiltPatch:
    if name is not None and isinstance(cfg, Mapping | None):
        cfg = {**(cfg or {}), "name": name}
    resolved = resolve_config(model, cfg)
    name = resolved["name"]
    if name in patch_configs(model):
        raise DeltaPatchConfigError(
            f"the model already carries a patch named {name!r}; give the new one another "
            f"delta_patch.name (it carries {list(patch_configs(model))})"
        )
    built = BuiltPatch(name=name, cfg=resolved)
    built.classes = _plan_classes(model, resolved)
    owned = _owned_parts(model, resolved, built.classes)
    built.branches.extend(owned)
    built.branches.extend(_task_norm_parts(model, resolved, {p for p, _, _ in owned}))
    delta_layers, placement = _delta_parts(model, resolved, {p for p, _, _ in built.branches})
    if resolved["side"] is not None:
        delta_layers.append(_build_side(model, resolved["side"], built.branches + delta_layers))
    built.branches.extend(delta_layers)
    if not built.branches:
        raise DeltaPatchConfigError(
            "delta_patch: branch=None and nothing owned: the patch would train nothing; set "
            "delta_patch.branch, trainable, classes or task_norm"
        )
    for _, layer, _ in built.branches:
        slot_of(layer)  # raises if the layer cannot carry a slot
    built.summary = _summary(model, resolved, built, delta_layers, placement)
    return built


#: (layer path, layer, part): what a patch adds where
Part = tuple[str, nn.Module, nn.Module]


def _plan_classes(model: nn.Module, resolved: dict) -> ClassChange | None:
    """Step 1a: the class change of ``delta_patch.classes`` (``None``: the base's classes)."""
    if resolved["classes"] is None:
        return None
    classes = plan_class_change(
        model, resolved["classes"], resolved["base_classes"], resolved["class_map"]
    )
    matched = len(classes.matched)
    unknown = not (resolved["base_classes"] or matched or base_class_names(model))
    print_log(
        f"mmdelta patch {resolved['name']!r}: {len(resolved['classes'])} classes, {matched} "
        "start from the base's rows for the same class"
        + (
            " (the base's class names are unknown: set delta_patch.base_classes)" if unknown else ""
        ),
        logger="current",
    )
    return classes


def _owned_parts(model: nn.Module, resolved: dict, classes: ClassChange | None) -> list[Part]:
    """Step 1b: patch-owned copies of ``trainable`` layers (a new class set implies its
    heads' final layers, which must be owned)."""
    trainable = list(resolved["trainable"])
    if classes is not None:
        trainable = trainable or default_head_layers(model, classes)
    owned = resolve_owned(model, trainable) if trainable else []
    if classes is not None:
        missing = sorted(set(classes.rows) - {path for path, _ in owned})
        if missing:
            raise DeltaPatchConfigError(
                f"delta_patch.classes changes the output size of {missing}, so the patch must "
                f"own them: add them to delta_patch.trainable (it is {resolved['trainable']})"
            )
    rows = classes.rows if classes is not None else {}
    return [(path, layer, PatchOwned(layer, rows=rows.get(path))) for path, layer in owned]


def _task_norm_parts(model: nn.Module, resolved: dict, owned_paths: set[str]) -> list[Part]:
    """Step 2: the patch's own normalisation layers (``delta_patch.task_norm``)."""
    if resolved["task_norm"] is None:
        return []
    norms = norm_layers(model, resolved["targets"], resolved["exclude"], owned_paths)
    if not norms:
        raise DeltaPatchConfigError(
            f"delta_patch.task_norm is set but targets {resolved['targets']} (exclude "
            f"{resolved['exclude']}) contain no normalisation layer"
        )
    update = resolved["task_norm"] == "stats"
    return [(path, layer, PatchOwned(layer, update_stats=update)) for path, layer in norms]


def _delta_parts(model: nn.Module, resolved: dict, reserved: set[str]):
    """Step 3: a ``delta_patch.branch`` on every supported target layer not ``reserved``.

    Returns ``(parts, placement)``; ``placement`` is ``None`` without a branch type.
    """
    if resolved["branch"] is None:
        return [], None
    branch_cfg = dict(resolved["branch"])
    branch_cls = branch_type(branch_cfg.pop("type"))
    placement = resolve_targets(
        model, resolved["targets"], resolved["exclude"], branch_cls.supports, reserved
    )
    parts = []
    for path, layer in placement.layers:
        try:
            branch = branch_cls(layer, **branch_cfg)
        except LayerTooSmall as err:
            placement.skipped.append((path, str(err)))
            continue
        except (TypeError, ValueError, RuntimeError, MemoryError) as err:
            # RuntimeError / MemoryError: options that ask for more memory than there is
            raise DeltaPatchConfigError(
                f"delta_patch.branch={resolved['branch']} on {path}: {err}"
            ) from err
        parts.append((path, layer, branch))
    if not parts:
        skipped = [p for p, _ in placement.skipped]
        raise DeltaPatchConfigError(
            f"delta_patch: nothing to patch: targets {resolved['targets']} (exclude "
            f"{resolved['exclude']}) contain no layer {resolved['branch']['type']} supports"
            + (f" large enough (skipped: {skipped})" if skipped else "")
        )
    return parts, placement


def _summary(model, resolved, built: BuiltPatch, delta_layers: list[Part], placement):
    """Step 4: the :class:`PatchSummary` of the built patch."""
    return PatchSummary(
        name=built.name,
        branch=resolved["branch"],
        layers=[describe_layer(model, p, layer, b) for p, layer, b in delta_layers],
        owned=[
            describe_layer(model, p, layer, b)
            for p, layer, b in built.branches
            if isinstance(b, PatchOwned)
        ],
        base_params=count_base_params(model),
        skipped=placement.skipped if placement is not None else [],
        unsupported=placement.unsupported if placement is not None else [],
        classes=resolved["classes"],
    )


def _build_side(model: nn.Module, side: dict, others: list) -> tuple[str, nn.Module, nn.Module]:
    """The side network of ``delta_patch.side`` on the module at ``side['at']``."""
    options = {k: v for k, v in side.items() if k not in ("type", "at")}
    at = side["at"]
    try:
        host = model.get_submodule(at)
    except AttributeError as err:
        top = [name for name, _ in model.named_children()]
        raise DeltaPatchConfigError(
            f"delta_patch.side.at {at!r} is not a module of the model (top-level modules: {top})"
        ) from err
    if any(path == at for path, _, _ in others):
        raise DeltaPatchConfigError(
            f"delta_patch.side.at {at!r}: the patch already has a branch or an owned copy of "
            "that module; a module takes one of them"
        )
    try:
        branch = branch_type(side["type"])(host, **options)
    except (TypeError, ValueError, RuntimeError, MemoryError) as err:
        raise DeltaPatchConfigError(f"delta_patch.side={side} on {at}: {err}") from err
    return at, host, branch


def attach_patch(model: nn.Module, built: BuiltPatch, select: bool = True) -> None:
    """Attaches a built patch (cannot fail for a patch built on this model)."""
    state = patch_state(model, create=True)
    for _, layer, branch in built.branches:
        slot_of(layer, create=True)[built.name] = branch
    state.add(model, built.name, built.cfg, built.classes.attrs if built.classes else {})
    state.activate(model, built.name if select else state.active)


def apply_delta_patch(model: nn.Module, cfg: Mapping | None = None) -> PatchSummary:
    """Adds the patch described by ``cfg`` to ``model``, in place, and makes it active.

    ``cfg`` is what a config's ``delta_patch`` key holds (schema:
    :mod:`mmdelta.patching.config`); ``{}`` or ``None`` applies the default patch (rank-8
    :class:`~mmdelta.branches.LowRankDelta` on the backbone, the neck and the decode head
    except its classifier). Afterwards:

    * the model computes exactly what it computed before (every Δ outputs zero, owned layers
      start as copies — except rows of a new class set that the base has no class for);
    * only the new patch's parameters require grad, and base running statistics never
      change, across ``model.train()`` and training steps (:mod:`mmdelta.patching.freeze`);
    * every base state-dict key keeps its name and value; the patch's tensors are added as
      ``<layer>.delta.<name>.<tensor>``;
    * the resolved config is kept on the model (:func:`mmdelta.get_delta_patch_cfg`).

    Nothing is changed when an error is raised (everything is built before anything is
    attached).

    Returns:
        PatchSummary: patched layers per stage, owned layers, Δ / patch fractions.

    Raises:
        DeltaPatchConfigError: unknown keys, bad values, a pattern that matches nothing, a
            model with nothing to patch, or a patch name the model already carries.
    """
    built = build_patch(model, cfg)
    attach_patch(model, built)
    print_log(built.summary.line(), logger="current")
    return built.summary
