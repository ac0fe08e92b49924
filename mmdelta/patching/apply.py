"""``apply_delta_patch``: patch a model in place with zero-initialised Δ branches."""

from collections.abc import Mapping

from mmengine.logging import print_log
from torch import nn

from ..branches import LayerTooSmall
from ..registry import DELTA_BRANCHES
from .config import DeltaPatchConfigError, resolve_config
from .freeze import install_train_guard
from .slot import slot_of
from .state import patch_configs, record_patch, select_patch
from .summary import PatchSummary, count_base_params, describe_layer
from .targets import resolve_targets


def apply_delta_patch(model: nn.Module, cfg: Mapping | None = None) -> PatchSummary:
    """Adds the Δ branches described by ``cfg`` to ``model``, in place, and selects them.

    ``cfg`` is what a config's ``delta_patch`` key holds (schema:
    :mod:`mmdelta.patching.config`); ``{}`` or ``None`` applies the default patch (rank-8
    :class:`~mmdelta.branches.LowRankDelta` on the backbone, the neck and the decode head
    except its classifier). Afterwards:

    * the model computes exactly what it computed before (every branch outputs zero);
    * only the new patch's Δ parameters require grad, and base running statistics never
      change, across ``model.train()`` and training steps (:mod:`mmdelta.patching.freeze`);
    * every base state-dict key keeps its name and value; Δ parameters are added as
      ``<layer>.delta.<name>.<param>``;
    * the resolved config is kept on the model (:func:`mmdelta.get_delta_patch_cfg`).

    Nothing is changed when an error is raised (all branches are built before any is
    attached).

    Returns:
        PatchSummary: patched layers per stage, Δ parameters, Δ fraction, patch fraction.

    Raises:
        DeltaPatchConfigError: unknown keys, bad values, a pattern that matches nothing, a
            model with nothing to patch, or a patch name the model already carries.
    """
    resolved = resolve_config(model, cfg)
    name = resolved["name"]
    if name in patch_configs(model):
        raise DeltaPatchConfigError(
            f"the model already carries a patch named {name!r}; give the new one another "
            f"delta_patch.name (it carries {list(patch_configs(model))})"
        )
    placement = resolve_targets(model, resolved["targets"], resolved["exclude"])
    branch_cfg = dict(resolved["branch"])
    branch_cls = DELTA_BRANCHES.get(branch_cfg.pop("type"))

    built, skipped = [], []
    for path, layer in placement.layers:
        slot_of(layer)  # raises if the layer's `delta` name is taken by something else
        try:
            built.append((path, layer, branch_cls(layer, **branch_cfg)))
        except LayerTooSmall as err:
            skipped.append((path, str(err)))
        except (TypeError, ValueError) as err:
            raise DeltaPatchConfigError(f"delta_patch.branch={resolved['branch']}: {err}") from err
    if not built:
        raise DeltaPatchConfigError(
            f"delta_patch: every targeted layer is too small for {resolved['branch']}: "
            f"{[path for path, _ in skipped]}"
        )

    for _, layer, branch in built:
        slot_of(layer, create=True)[name] = branch
    record_patch(model, name, resolved)
    select_patch(model, name)
    install_train_guard(model)

    summary = PatchSummary(
        name=name,
        branch=resolved["branch"],
        layers=[describe_layer(model, path, layer, branch) for path, layer, branch in built],
        base_params=count_base_params(model),
        skipped=skipped,
        unsupported=placement.unsupported,
    )
    print_log(summary.line(), logger="current")
    return summary
