"""Where Δ branches live: a :class:`DeltaSlot` inside each patched layer.

A patched layer ``L`` gets one child ``L.delta`` (a :class:`DeltaSlot`) that maps patch
names to what each patch adds there (a :class:`~mmdelta.branches.PatchPart`), and an
instance-level ``forward`` (:class:`SlotForward`) that runs the layer's own class forward
when no part is active and the active part's patched forward otherwise. The layer itself
(its class, parameters, buffers and state-dict keys) is untouched, so
``backbone.layer1.0.conv1.weight`` stays ``backbone.layer1.0.conv1.weight`` and a branch's
parameters sit right beside it, e.g. ``backbone.layer1.0.conv1.delta.<patch>.up``.
"""

from collections.abc import Iterator

from torch import nn

#: the name of the slot child in every patched layer
SLOT_NAME = "delta"
#: the state-dict key segment every patch tensor lives under (``<layer>.delta.<patch>.…``)
DELTA_SEGMENT = f".{SLOT_NAME}."


class DeltaSlot(nn.ModuleDict):
    """The patch parts of one layer, keyed by patch name; at most one is ``active``.

    ``active`` is a patch name or ``None``; with ``None`` (or a name this layer has no
    part for) the layer computes exactly its base function.
    """

    def __init__(self):
        super().__init__()
        self.active: str | None = None

    def forward(self, x):
        """Identity: a host that runs its children as a pipeline (``nn.Sequential``,
        torchvision's ``IntermediateLayerGetter``) passes through its slot unchanged."""
        return x

    def active_branch(self) -> nn.Module | None:
        return self._modules.get(self.active) if self.active is not None else None


class SlotForward:
    """The forward of one patched layer, stored in the layer's instance ``__dict__`` (the
    class is untouched).

    No active part: exactly the layer's own class forward, nothing else is evaluated.
    Active part: whatever the part computes from the layer and its inputs
    (:meth:`~mmdelta.branches.PatchPart.patched_forward`). A plain picklable object (not a
    bound method), so ``copy.deepcopy``, ``pickle`` and ``torch.save(model)`` /
    ``torch.load`` carry it to the copy's layer.
    """

    __slots__ = ("layer",)

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def __call__(self, *args, **kwargs):
        layer = self.layer
        branch = layer._modules[SLOT_NAME].active_branch()
        if branch is None:
            return type(layer).forward(layer, *args, **kwargs)
        return branch.patched_forward(layer, self.base_forward, args, kwargs)

    def base_forward(self, *args, **kwargs):
        """The layer's own class forward."""
        return type(self.layer).forward(self.layer, *args, **kwargs)

    def __getstate__(self):
        return self.layer

    def __setstate__(self, layer):
        self.layer = layer

    def __repr__(self) -> str:
        return f"SlotForward({type(self.layer).__name__})"


def slot_of(layer: nn.Module, create: bool = False) -> DeltaSlot | None:
    """The layer's slot; with ``create`` one is added (and the dispatcher installed) if absent."""
    slot = layer._modules.get(SLOT_NAME)
    if slot is not None and not isinstance(slot, DeltaSlot):
        raise TypeError(
            f"{type(layer).__name__} already has a child called {SLOT_NAME!r} that is not a "
            "DeltaSlot; mmdelta cannot patch it"
        )
    if slot is None:
        forward = layer.__dict__.get("forward")
        if forward is not None:
            raise TypeError(
                f"{type(layer).__name__} has an instance-level forward ({forward!r}) set by "
                "something else; mmdelta cannot patch it"
            )
        if create:
            slot = DeltaSlot()
            layer.add_module(SLOT_NAME, slot)
            layer.__dict__["forward"] = SlotForward(layer)
    return slot


def remove_slot(layer: nn.Module) -> None:
    """Takes the slot and the dispatcher off ``layer``: it is a plain layer again."""
    del layer._modules[SLOT_NAME]
    layer.__dict__.pop("forward", None)


def iter_slots(model: nn.Module) -> Iterator[tuple[str, DeltaSlot]]:
    """``(layer_path, slot)`` for every patched layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, DeltaSlot):
            yield name.rpartition(".")[0], module


def slot_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes (``"<layer>.delta."``) of every Δ slot in ``model``."""
    return tuple(
        f"{path}{DELTA_SEGMENT}" if path else f"{SLOT_NAME}." for path, _ in iter_slots(model)
    )
