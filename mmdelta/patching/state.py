"""Which patches a model carries and which one computes.

The model keeps plain attributes: ``_mmdelta_patches`` (patch name -> resolved config, in
the order applied), ``_mmdelta_attrs`` (patch name -> {module path -> {attribute -> value
while that patch is active}}, e.g. a head's ``num_classes``), ``_mmdelta_base_attrs`` (the
base's values of those attributes) and ``_mmdelta_active`` (the active patch or ``None``).
Every :class:`~mmdelta.patching.slot.DeltaSlot` mirrors the selection in its ``active``
field, which is what the patched layers' forwards read.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .slot import iter_slots, remove_slot, slot_prefixes

_MISSING = object()


def patch_configs(model: nn.Module) -> dict[str, dict]:
    """Patch name -> resolved ``delta_patch`` config, for every patch the model carries."""
    return dict(model.__dict__.get("_mmdelta_patches", {}))


def patch_names(model: nn.Module) -> list[str]:
    """Names of the patches the model carries, in the order they were added."""
    return list(model.__dict__.get("_mmdelta_patches", {}))


def record_patch(model: nn.Module, name: str, cfg: dict, attrs: dict | None = None) -> None:
    model.__dict__.setdefault("_mmdelta_patches", {})[name] = cfg
    model.__dict__.setdefault("_mmdelta_attrs", {})[name] = attrs or {}
    base = model.__dict__.setdefault("_mmdelta_base_attrs", {})
    for path, values in (attrs or {}).items():
        module = model.get_submodule(path)
        for attr in values:
            base.setdefault(path, {}).setdefault(attr, getattr(module, attr, _MISSING))


def active_patch(model: nn.Module) -> str | None:
    """The name of the active patch (``None``: the model computes its base function)."""
    return model.__dict__.get("_mmdelta_active")


def _set_attrs(model: nn.Module, values: dict) -> None:
    for path, attrs in values.items():
        module = model.get_submodule(path)
        for attr, value in attrs.items():
            if value is _MISSING:
                module.__dict__.pop(attr, None)
            else:
                setattr(module, attr, value)


def set_active_patch(model: nn.Module, name: str | None) -> None:
    """Makes patch ``name`` the one that computes (``None``: none, the exact base model).

    Switches every patched layer, and the head attributes a patch with its own class set
    changes (``num_classes``, …). Only the active patch's branches are evaluated.
    """
    if name is not None and name not in patch_configs(model):
        raise KeyError(f"model carries no patch {name!r}; it has {patch_names(model)}")
    _set_attrs(model, model.__dict__.get("_mmdelta_base_attrs", {}))
    if name is not None:
        _set_attrs(model, model.__dict__["_mmdelta_attrs"][name])
    model.__dict__["_mmdelta_active"] = name
    for _, slot in iter_slots(model):
        slot.active = name
        for branch in slot.values():
            branch.clear_cache()
    if "train" in model.__dict__:  # the guard: requires_grad follows the selection
        from .freeze import enforce_frozen_base

        enforce_frozen_base(model, model.training)


def get_delta_patch_cfg(model: nn.Module, name: str | None = None) -> dict:
    """The resolved config (defaults filled in) of patch ``name`` (default: the active one)."""
    name = name if name is not None else active_patch(model)
    configs = patch_configs(model)
    if name not in configs:
        raise KeyError(f"model carries no patch {name!r}; it has {list(configs)}")
    return configs[name]


def patch_classes(model: nn.Module, name: str | None = None) -> list[str] | None:
    """The class names of patch ``name`` (default: the active one) when it has its own class
    set; ``None`` when it keeps the base's."""
    name = name if name is not None else active_patch(model)
    return None if name is None else get_delta_patch_cfg(model, name).get("classes")


def remove_patch(model: nn.Module, name: str) -> None:
    """Takes patch ``name`` off the model (its tensors are dropped). A removed active patch
    leaves the model inactive; with no patch left the model is the plain base model."""
    configs = model.__dict__.get("_mmdelta_patches", {})
    if name not in configs:
        raise KeyError(f"model carries no patch {name!r}; it has {list(configs)}")
    if active_patch(model) == name:
        set_active_patch(model, None)
    for _, slot in list(iter_slots(model)):
        if name in slot:
            del slot[name]
    layers = [model.get_submodule(path) for path, slot in iter_slots(model) if not len(slot)]
    for layer in layers:
        remove_slot(layer)
    del configs[name]
    del model.__dict__["_mmdelta_attrs"][name]
    if not configs:
        from .freeze import restore_requires_grad

        model.__dict__.pop("train", None)
        restore_requires_grad(model, model.__dict__.get("_mmdelta_requires_grad", {}))
        for attr in [a for a in model.__dict__ if a.startswith("_mmdelta_")]:
            del model.__dict__[attr]


def base_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` without any patch tensor: a plain upstream checkpoint of the base."""
    prefixes = slot_prefixes(model)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


@contextmanager
def delta_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``model`` computes exactly its base function, head included: no patch
    tensor is read, and head attributes hold the base's values. Equivalent to
    ``set_active_patch(model, None)`` for the block; the selection is restored on exit (also
    on error). Raises ``ValueError`` for a model without any patch, which usually means the
    wrong object was passed.
    """
    if not patch_configs(model):
        raise ValueError(
            f"delta_disabled: this {type(model).__name__} carries no Δ patch "
            "(apply one with mmdelta.apply_delta_patch first)"
        )
    saved = active_patch(model)
    set_active_patch(model, None)
    try:
        yield model
    finally:
        set_active_patch(model, saved)
