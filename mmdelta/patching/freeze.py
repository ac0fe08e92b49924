"""The frozen-base invariants of a patched model.

After :func:`mmdelta.apply_delta_patch` and after every ``model.train(mode)``:

* no base parameter requires grad; exactly the selected patch's parameters do;
* every base module with running statistics (BatchNorm, SyncBN, tracked InstanceNorm) is
  in eval mode, so training never changes ``running_mean`` / ``running_var`` /
  ``num_batches_tracked``, whatever the model's ``norm_eval`` says;
* every patch part is in the model's mode (a patch's own BatchNorm statistics train).

OpenMMLab backbones override ``train()``: mmdet's ``ResNet.train`` calls
``_freeze_stages()``, which sets ``requires_grad=False`` on everything in the frozen stages
(Δ branches included) and ``.eval()``s them; mmseg's ``ResNetV1c`` defaults to
``norm_eval=False`` and would put its BatchNorms in train mode. So the invariants are
re-asserted *after* the model's own ``train`` on every call (the guard is part of the
model's :class:`~mmdelta.patching.state.PatchState`). This module holds the functions
only; it knows nothing of which patch is selected beyond what it is told.
"""

from torch import nn

from ..branches.owned import tracks_running_stats
from .slot import iter_slots
from .targets import base_modules


def enforce_frozen_base(model: nn.Module, selected: str | None, mode: bool) -> None:
    """Re-asserts the invariants above on ``model`` (cheap: one pass over the modules).

    ``selected`` is the active patch (its parts require grad; every other patch's do not);
    ``mode`` is the mode every patch part is put in — also where the model's own
    ``train()`` (``_freeze_stages``, ``norm_eval``) switched it off — so a patch's own
    normalisation layers train when the model trains.
    """
    for _, module in base_modules(model):
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
        if tracks_running_stats(module):
            module.train(False)
    for _, slot in iter_slots(model):
        slot.train(mode)
        for name, part in slot.items():
            part.requires_grad_(name == selected)


def requires_grad_flags(model: nn.Module) -> dict[str, bool]:
    """Parameter name -> ``requires_grad``: the base's own flags (e.g. BatchNorm weights a
    config froze with ``norm_cfg=dict(requires_grad=False)``), recorded before patching."""
    return {name: p.requires_grad for name, p in model.named_parameters()}


def restore_requires_grad(model: nn.Module, flags: dict[str, bool]) -> None:
    """Gives every parameter named in ``flags`` its recorded ``requires_grad``."""
    for name, param in model.named_parameters():
        if name in flags:
            param.requires_grad_(flags[name])
