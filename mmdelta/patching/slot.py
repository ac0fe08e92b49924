"""Where Δ branches live: a :class:`DeltaSlot` inside each patched layer.

A patched layer ``L`` gets one child ``L.delta`` (a :class:`DeltaSlot`) that maps patch
names to branches, and one forward hook that adds the active branch's output. The layer
itself (its class, parameters, buffers and state-dict keys) is untouched, so
``backbone.layer1.0.conv1.weight`` stays ``backbone.layer1.0.conv1.weight`` and a branch's
parameters sit right beside it, e.g. ``backbone.layer1.0.conv1.delta.<patch>.up``.
"""

from collections.abc import Iterator

import torch
from torch import nn

SLOT_NAME = "delta"


class DeltaSlot(nn.ModuleDict):
    """The Δ branches of one layer, keyed by patch name; at most one is ``active``.

    ``active`` is a patch name or ``None``; with ``None`` (or a name this layer has no
    branch for) the layer computes exactly its base function.
    """

    def __init__(self):
        super().__init__()
        self.active: str | None = None

    def active_branch(self) -> nn.Module | None:
        return self._modules.get(self.active) if self.active is not None else None


def _add_active_delta(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: ``f(x)`` -> ``f(x) + Δ(x)`` for the active branch, else ``f(x)`` as is.

    A module-level function (not a closure) so that ``copy.deepcopy`` and pickling of a
    patched model keep every hook pointing at its own layer's slot.
    """
    branch = layer._modules[SLOT_NAME].active_branch()
    if branch is None:
        return output
    delta = branch(args[0])
    if delta.shape != output.shape:
        raise RuntimeError(
            f"Δ branch of {type(layer).__name__} produced {tuple(delta.shape)} but the layer "
            f"produced {tuple(output.shape)}: this layer computes its output in a non-standard "
            "way; leave it out of the patch with `exclude`."
        )
    return output + delta


def slot_of(layer: nn.Module, create: bool = False) -> DeltaSlot | None:
    """The layer's slot; with ``create`` one is added (and the hook registered) if absent."""
    slot = layer._modules.get(SLOT_NAME)
    if slot is not None and not isinstance(slot, DeltaSlot):
        raise TypeError(
            f"{type(layer).__name__} already has a child called {SLOT_NAME!r} that is not a "
            "DeltaSlot; mmdelta cannot patch it"
        )
    if slot is None and create:
        slot = DeltaSlot()
        layer.add_module(SLOT_NAME, slot)
        layer.register_forward_hook(_add_active_delta)
    return slot


def iter_slots(model: nn.Module) -> Iterator[tuple[str, DeltaSlot]]:
    """``(layer_path, slot)`` for every patched layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, DeltaSlot):
            yield name.rpartition(".")[0], module


def slot_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes (``"<layer>.delta."``) of every Δ slot in ``model``."""
    return tuple(
        f"{path}.{SLOT_NAME}." if path else f"{SLOT_NAME}." for path, _ in iter_slots(model)
    )
