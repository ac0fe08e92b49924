"""``merge_patch``: fold a patch into a standalone model that needs no mmdelta."""

import copy

import torch
from torch import nn

from ..branches.base import tensor_store
from .slot import iter_slots, remove_slot
from .state import patch_state, resolve_patch_name


def _set_tensor(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    store, attr = tensor_store(layer, name)
    old = store[attr]
    store[attr] = (
        nn.Parameter(value, requires_grad=old.requires_grad)
        if isinstance(old, nn.Parameter)
        else value
    )


def _update_sizes(layer: nn.Module) -> None:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return
    size = weight.shape[0]
    for attr in ("out_features", "out_channels"):
        if isinstance(getattr(layer, attr, None), int):
            setattr(layer, attr, size)


def merge_patch(model: nn.Module, name: str | None = None) -> nn.Module:
    """A new model in which patch ``name`` (default: the active one, else the only
    one) is part of the weights.

    Mergeable branches are folded into their layers' tensors (``W + ΔW``, scale-and-shift
    into weight and bias), patch-owned layers replace the base's (a new class set included:
    the heads' ``num_classes`` take the patch's value), and every patch, slot and guard is
    removed: the result is a plain model of the upstream class whose ``state_dict()`` loads
    into plain mmdet / mmseg built with the patch's class count. ``model`` is not changed.

    Raises:
        ValueError: the patch has a branch type that cannot be folded (e.g. ``BlockDelta``),
            or no patch is named and none is active or the only one
            (:func:`~mmdelta.patching.state.resolve_patch_name`).
    """
    name = resolve_patch_name(model, name, "merge")
    blocking = sorted(
        {
            f"{type(slot[name]).__name__} on {path}"
            for path, slot in iter_slots(model)
            if name in slot and not slot[name].mergeable
        }
    )
    if blocking:
        raise ValueError(
            f"patch {name!r} cannot be merged into plain weights: it has branches that compute "
            f"something no base layer can (e.g. {blocking[:3]}, {len(blocking)} in all); serve "
            "it with mmdelta (load_patch + set_active_patch) instead"
        )
    merged = copy.deepcopy(model)
    state = patch_state(merged)
    state.activate(merged, name)  # the patch's head attributes (num_classes, …)
    with torch.no_grad():
        for path, slot in list(iter_slots(merged)):
            layer = merged.get_submodule(path)
            part = slot._modules.get(name)
            if part is not None:
                for tensor_name, value in part.merged_tensors(layer).items():
                    _set_tensor(layer, tensor_name, value.detach())
                _update_sizes(layer)
            remove_slot(layer)
    state.tear_down(merged)  # guard, state and requires_grad flags; the model's own train()
    return merged
