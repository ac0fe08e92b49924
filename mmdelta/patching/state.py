"""Which patches a model carries and which one computes.

The model keeps a plain attribute ``_mmdelta_patches`` (patch name -> resolved config, in
the order applied) and ``_mmdelta_active`` (the selected patch name or ``None``). Every
:class:`~mmdelta.patching.slot.DeltaSlot` mirrors the selection in its ``active`` field,
which is what the forward hooks read.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .slot import iter_slots, slot_prefixes


def patch_configs(model: nn.Module) -> dict[str, dict]:
    """Patch name -> resolved ``delta_patch`` config, for every patch applied to ``model``."""
    return dict(model.__dict__.get("_mmdelta_patches", {}))


def record_patch(model: nn.Module, name: str, cfg: dict) -> None:
    model.__dict__.setdefault("_mmdelta_patches", {})[name] = cfg


def active_patch(model: nn.Module) -> str | None:
    """The name of the selected patch (``None``: the model computes its base function)."""
    return model.__dict__.get("_mmdelta_active")


def select_patch(model: nn.Module, name: str | None) -> None:
    """Makes ``name`` the patch that computes (``None``: none), in every patched layer."""
    if name is not None and name not in patch_configs(model):
        raise KeyError(f"model carries no patch {name!r}; it has {list(patch_configs(model))}")
    model.__dict__["_mmdelta_active"] = name
    for _, slot in iter_slots(model):
        slot.active = name


def get_delta_patch_cfg(model: nn.Module, name: str | None = None) -> dict:
    """The resolved config (defaults filled in) of patch ``name`` (default: the active one)."""
    name = name if name is not None else active_patch(model)
    configs = patch_configs(model)
    if name not in configs:
        raise KeyError(f"model carries no patch {name!r}; it has {list(configs)}")
    return configs[name]


def base_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` without any Δ tensor: a plain upstream checkpoint of the base."""
    prefixes = slot_prefixes(model)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


@contextmanager
def delta_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``model`` computes exactly its base function: no Δ is evaluated.

    The selection is restored on exit (also on error); blocks nest. Raises ``ValueError``
    for a model without any Δ patch, which usually means the wrong object was passed.
    """
    slots = [slot for _, slot in iter_slots(model)]
    if not slots:
        raise ValueError(
            f"delta_disabled: this {type(model).__name__} carries no Δ patch "
            "(apply one with mmdelta.apply_delta_patch first)"
        )
    saved = [slot.active for slot in slots]
    for slot in slots:
        slot.active = None
    try:
        yield model
    finally:
        for slot, name in zip(slots, saved, strict=True):
            slot.active = name
