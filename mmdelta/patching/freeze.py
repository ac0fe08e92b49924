"""The frozen-base invariants of a patched model, and the guard that keeps them.

After :func:`mmdelta.apply_delta_patch` and after every ``model.train(mode)``:

* no base parameter requires grad; exactly the selected patch's Δ parameters do;
* every base module with running statistics (BatchNorm, SyncBN, tracked InstanceNorm) is
  in eval mode, so training never changes ``running_mean`` / ``running_var`` /
  ``num_batches_tracked``, whatever the model's ``norm_eval`` says;
* every patch branch is in the model's mode (a patch's own BatchNorm statistics train).

OpenMMLab backbones override ``train()``: mmdet's ``ResNet.train`` calls
``_freeze_stages()``, which sets ``requires_grad=False`` on everything in the frozen stages
(Δ branches included) and ``.eval()``s them; mmseg's ``ResNetV1c`` defaults to
``norm_eval=False`` and would put its BatchNorms in train mode. So the guard runs *after*
the model's own ``train`` on every call: the model instance gets its own ``train`` that calls
the class's ``train`` and then :func:`enforce_frozen_base`. The class, the state dict and
the module tree are not changed by this.
"""

import types

from torch import nn

from ..branches.owned import tracks_running_stats
from .slot import iter_slots
from .state import active_patch
from .targets import base_modules


def enforce_frozen_base(model: nn.Module, mode: bool | None = None) -> None:
    """Re-asserts the invariants above on ``model`` (cheap: one pass over the modules).

    ``mode`` (default: ``model.training``) is the mode every patch branch is put in — also
    where the model's own ``train()`` (``_freeze_stages``, ``norm_eval``) switched it off —
    so a patch's own normalisation layers train when the model trains.
    """
    mode = model.training if mode is None else mode
    for _, module in base_modules(model):
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
        if tracks_running_stats(module):
            module.train(False)
    selected = active_patch(model)
    for _, slot in iter_slots(model):
        slot.train(mode)
        for name, branch in slot.items():
            branch.requires_grad_(name == selected)


def _train_keeping_base_frozen(self: nn.Module, mode: bool = True) -> nn.Module:
    type(self).train(self, mode)
    enforce_frozen_base(self, mode)
    return self


def install_train_guard(model: nn.Module) -> None:
    """Makes every later ``model.train(mode)`` / ``model.eval()`` end with the invariants.

    The base parameters' own ``requires_grad`` flags (e.g. BatchNorm weights a config froze
    with ``norm_cfg=dict(requires_grad=False)``) are recorded first, for
    :func:`restore_requires_grad` when the last patch goes (``remove_patch``, ``merge_patch``).
    """
    if "train" not in model.__dict__:
        model.__dict__["_mmdelta_requires_grad"] = {
            name: p.requires_grad for name, p in model.named_parameters()
        }
        model.train = types.MethodType(_train_keeping_base_frozen, model)
    enforce_frozen_base(model)


def restore_requires_grad(model: nn.Module, flags: dict[str, bool]) -> None:
    """Gives every parameter named in ``flags`` its recorded ``requires_grad``."""
    for name, param in model.named_parameters():
        if name in flags:
            param.requires_grad_(flags[name])
