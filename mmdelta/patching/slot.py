"""Where Δ branches live: a :class:`DeltaSlot` inside each patched layer.

A patched layer ``L`` gets one child ``L.delta`` (a :class:`DeltaSlot`) that maps patch
names to what each patch adds there (a :class:`~mmdelta.branches.PatchPart`), and an
instance-level ``forward`` (:class:`SlotForward`) that runs the layer's own class forward
when no part is active and the active part's patched forward otherwise. The layer itself
(its class, parameters, buffers and state-dict keys) is untouched, so
``backbone.layer1.0.conv1.weight`` stays ``backbone.layer1.0.conv1.weight`` and a branch's
parameters sit right beside it, e.g. ``backbone.layer1.0.conv1.delta.<patch>.up``.
"""

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..branches import AdditiveDelta

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
        #: per-sample patch names while a routed batch runs (``PatchState.routed``)
        self.routes: Sequence[str | None] | None = None

    def forward(self, x):
        """Identity: a host that runs its children as a pipeline (``nn.Sequential``,
        torchvision's ``IntermediateLayerGetter``) passes through its slot unchanged."""
        return x

    def active_branch(self) -> nn.Module | None:
        return self._modules.get(self.active) if self.active is not None else None

    def routed_forward(self, layer: nn.Module, base_forward, args: tuple, kwargs: dict):
        """One forward for a batch whose samples choose their own patch (``routes``, one
        name or ``None`` per sample along dim 0): the base layer once for the whole batch,
        then each patch's ``Δ`` on its own samples, added to their rows.

        Defined for additive per-sample parts only (:class:`~mmdelta.branches.AdditiveDelta`
        with ``per_sample``); anything else, or an input whose dim 0 is not the batch of
        images (e.g. an RoI head's RoIs), raises :class:`NotRoutable`. Row ``i`` equals the
        layer's output for sample ``i`` alone with its patch up to the kernels' batching
        (not bitwise: the base runs on the whole batch)."""
        routes = self.routes
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(routes):
            if name is not None and name in self._modules:
                rows.setdefault(name, []).append(i)
        if not rows:  # no routed patch has a part here: the base layer, whatever its input
            return base_forward(*args, **kwargs)
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.shape[0] != len(routes):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise NotRoutable(
                f"{type(layer).__name__} gets an input {got} whose dim 0 is not the batch of "
                f"{len(routes)} images; its patches cannot be routed per sample"
            )
        output = base_forward(*args, **kwargs)
        for name, index in rows.items():
            part = self._modules[name]
            if not routes_per_sample(part):
                raise NotRoutable(
                    f"patch {name!r} has a {type(part).__name__} on {type(layer).__name__}: "
                    "not an additive per-sample branch, it cannot be routed per sample"
                )
            index = torch.tensor(index, device=x.device)
            output = output.index_add(0, index, part(x.index_select(0, index)))
        return output


def routes_per_sample(part: nn.Module) -> bool:
    """Whether ``part`` can add its Δ to its own samples of a routed batch: an additive
    branch whose Δ of sample ``i`` reads sample ``i`` only."""
    return isinstance(part, AdditiveDelta) and part.per_sample


class NotRoutable(ValueError):
    """A batch that cannot run with a patch per sample (see :meth:`DeltaSlot.routed_forward`);
    run it grouped by patch instead."""


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
        slot = layer._modules[SLOT_NAME]
        if slot.routes is not None:
            return slot.routed_forward(layer, self.base_forward, args, kwargs)
        branch = slot.active_branch()
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
