"""Which patches a model carries and which one computes: one :class:`PatchState` per model.

A patched model holds exactly one piece of mmdelta state, ``model._mmdelta`` (a
:class:`PatchState`), plus two things that live where torch looks for them:

* a :class:`~mmdelta.patching.slot.DeltaSlot` child and a
  :class:`~mmdelta.patching.slot.SlotForward` in every patched layer (the parts and the
  dispatch), each slot mirroring the selection in its ``active`` field;
* a :class:`GuardedTrain` as the model's instance-level ``train``, so every
  ``model.train(mode)`` ends with the frozen-base invariants (:mod:`.freeze`).

Both are plain picklable objects: a patched model survives ``copy.deepcopy``, ``pickle``
and ``torch.save(model)`` / ``torch.load`` with its patches, selection and guard. With the
last patch removed (or merged into a copy) :meth:`PatchState.tear_down` takes all three
off again: the model is the plain base model.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .freeze import enforce_frozen_base, requires_grad_flags, restore_requires_grad
from .slot import NotRoutable, iter_slots, remove_slot, routes_per_sample, slot_prefixes

#: the model attribute holding its :class:`PatchState`
STATE_ATTR = "_mmdelta"


class _Missing:
    """Marks an attribute the base module did not have (it is removed again when the base
    is selected). Pickles as a reference to the one instance, :data:`MISSING`."""

    def __reduce__(self):
        return "MISSING"

    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


class PatchState:
    """Everything mmdelta knows about one patched model.

    * ``configs``: patch name -> resolved ``delta_patch`` config, in the order applied;
    * ``attrs``: patch name -> {module path -> {attribute -> value while that patch is
      active}} (e.g. a head's ``num_classes`` for a patch with its own class set), and
      ``base_attrs`` the base's values of those attributes;
    * ``active``: the patch that computes, or ``None`` (the exact base);
    * ``base_requires_grad``: the base parameters' own ``requires_grad`` flags, recorded
      before patching and given back by :meth:`tear_down`.

    The operations take the model they belong to (the state holds no reference to it).
    """

    def __init__(self, base_requires_grad: dict[str, bool]):
        self.configs: dict[str, dict] = {}
        self.attrs: dict[str, dict] = {}
        self.base_attrs: dict[str, dict] = {}
        self.active: str | None = None
        self.base_requires_grad = dict(base_requires_grad)

    # -------------------------------------------------------------------- queries

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    def which(self, name: str | None, action: str) -> str:
        """The one rule for "which patch do you mean" (save, merge, serving, export):
        ``name`` if given (it must exist), else the active patch, else the only patch.

        Raises:
            KeyError: ``name`` is not a patch of the model.
            ValueError: no name, no active patch and not exactly one patch.
        """
        if name is None:
            name = self.active or (self.names[0] if len(self.configs) == 1 else None)
            if name is None:
                raise ValueError(f"no patch is active; say which to {action}: one of {self.names}")
        self.check(name)
        return name

    def check(self, name: str) -> None:
        if name not in self.configs:
            raise KeyError(f"model carries no patch {name!r}; it has {self.names}")

    # ------------------------------------------------------------------ operations

    def add(self, model: nn.Module, name: str, cfg: dict, attrs: dict) -> None:
        """Records patch ``name`` (its parts are already in the slots)."""
        self.configs[name] = cfg
        self.attrs[name] = attrs
        for path, values in attrs.items():
            module = model.get_submodule(path)
            for attr in values:
                default = getattr(module, attr, MISSING)
                self.base_attrs.setdefault(path, {}).setdefault(attr, default)

    def activate(self, model: nn.Module, name: str | None) -> None:
        """Makes ``name`` the patch that computes (``None``: the base), in every slot and
        in the head attributes, and re-asserts the frozen-base invariants."""
        if name is not None:
            self.check(name)
        _set_attrs(model, self.base_attrs)
        if name is not None:
            _set_attrs(model, self.attrs[name])
        changed, self.active = name != self.active, name
        for _, slot in iter_slots(model):
            slot.active = name
            if changed:  # inference caches (folded weights) of the patch switched off
                for part in slot.values():
                    part.clear_cache()
        self.enforce(model, model.training)

    def routable(self, model: nn.Module, name: str) -> bool:
        """Whether patch ``name`` can run routed (:meth:`routed`): it keeps the base's head
        attributes and every part of it adds a per-sample Δ. (A part in a module whose dim 0
        is not the image batch is only found by running: ``NotRoutable``.)"""
        self.check(name)
        parts = (slot[name] for _, slot in iter_slots(model) if name in slot)
        return not self.attrs[name] and all(routes_per_sample(p) for p in parts)

    @contextmanager
    def routed(self, model: nn.Module, routes: Sequence[str | None]) -> Iterator[nn.Module]:
        """Inside the block a forward over a batch gives sample ``i`` patch ``routes[i]``
        (``None``: the base) in one pass (:meth:`DeltaSlot.routed_forward`); the active
        patch is unchanged afterwards (also on error).

        Raises:
            KeyError: a name the model carries no patch for.
            NotRoutable: a requested patch changes head attributes (its own class set):
                its samples need another head, run them grouped by patch.
        """
        for name in {r for r in routes if r is not None}:
            self.check(name)
            if self.attrs[name]:
                raise NotRoutable(
                    f"patch {name!r} has its own class set (it changes {sorted(self.attrs[name])}); "
                    "its samples cannot share a forward with other patches"
                )
        saved = self.active  # routes override it in every slot; only its heads must go
        switch = saved is not None and bool(self.attrs[saved])
        if switch:
            self.activate(model, None)
        slots = [slot for _, slot in iter_slots(model)]
        try:
            for slot in slots:
                slot.routes = list(routes)
            yield model
        finally:
            for slot in slots:
                slot.routes = None
            if switch:
                self.activate(model, saved)

    def enforce(self, model: nn.Module, mode: bool) -> None:
        enforce_frozen_base(model, self.active, mode)

    def remove(self, model: nn.Module, name: str) -> None:
        """Drops patch ``name`` and its parts; the last one tears the state down."""
        self.check(name)
        if self.active == name:
            self.activate(model, None)
        for path, slot in list(iter_slots(model)):
            if name in slot:
                del slot[name]
            if not len(slot):
                remove_slot(model.get_submodule(path))
        del self.configs[name], self.attrs[name]
        if not self.configs:
            self.tear_down(model)

    def tear_down(self, model: nn.Module) -> None:
        """Takes every slot, the guard and the state off ``model`` and gives the base
        parameters their own ``requires_grad`` back; then runs the model's own
        ``train(mode)`` (frozen stages, ``norm_eval``) in the mode it is in."""
        for path, _ in list(iter_slots(model)):
            remove_slot(model.get_submodule(path))
        model.__dict__.pop("train", None)
        model.__dict__.pop(STATE_ATTR, None)
        restore_requires_grad(model, self.base_requires_grad)
        model.train(model.training)


class GuardedTrain:
    """A patched model's instance-level ``train``: the model class's own ``train(mode)``,
    then the frozen-base invariants. Picklable (not a bound method)."""

    __slots__ = ("model",)

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, mode: bool = True) -> nn.Module:
        model = self.model
        type(model).train(model, mode)
        model.__dict__[STATE_ATTR].enforce(model, mode)
        return model

    def __getstate__(self):
        return self.model

    def __setstate__(self, model):
        self.model = model

    def __repr__(self) -> str:
        return f"GuardedTrain({type(self.model).__name__})"


def _set_attrs(model: nn.Module, values: dict) -> None:
    for path, attrs in values.items():
        module = model.get_submodule(path)
        for attr, value in attrs.items():
            if value is MISSING:
                module.__dict__.pop(attr, None)
            else:
                setattr(module, attr, value)


def patch_state(model: nn.Module, create: bool = False) -> PatchState | None:
    """The model's :class:`PatchState` (``None`` for a plain model); with ``create`` a new
    one is made — recording the base's ``requires_grad`` flags and installing the guard —
    if there is none."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None and create:
        if "train" in model.__dict__:
            raise TypeError(
                f"{type(model).__name__} has an instance-level train ({model.__dict__['train']!r}) "
                "set by something else; mmdelta cannot guard it"
            )
        state = PatchState(requires_grad_flags(model))
        model.__dict__[STATE_ATTR] = state
        model.__dict__["train"] = GuardedTrain(model)
    return state


# ------------------------------------------------------------------ public functions


def patch_configs(model: nn.Module) -> dict[str, dict]:
    """Patch name -> resolved ``delta_patch`` config, for every patch the model carries."""
    state = patch_state(model)
    return dict(state.configs) if state is not None else {}


def patch_names(model: nn.Module) -> list[str]:
    """Names of the patches the model carries, in the order they were added."""
    state = patch_state(model)
    return state.names if state is not None else []


def active_patch(model: nn.Module) -> str | None:
    """The name of the active patch (``None``: the model computes its base function)."""
    state = patch_state(model)
    return state.active if state is not None else None


def resolve_patch_name(model: nn.Module, name: str | None, action: str = "use") -> str:
    """``name``, or the patch meant when none is named (the active one, else the only
    one): the rule :func:`save_patch`, :func:`merge_patch` and serving share. ``action``
    words the error (``"no patch is active; say which to <action>"``)."""
    state = patch_state(model)
    if state is None:
        raise KeyError(f"this {type(model).__name__} carries no mmdelta patch")
    return state.which(name, action)


def routed_patches(model: nn.Module, routes: Sequence[str | None]):
    """A context in which one forward gives each sample of the batch its own patch
    (``routes``: a patch name or ``None`` per sample); see :meth:`PatchState.routed`."""
    state = patch_state(model)
    if state is None:
        raise KeyError(f"this {type(model).__name__} carries no mmdelta patch")
    return state.routed(model, routes)


def set_active_patch(model: nn.Module, name: str | None) -> None:
    """Makes patch ``name`` the one that computes (``None``: none, the exact base model).

    Switches every patched layer, and the head attributes a patch with its own class set
    changes (``num_classes``, …). Only the active patch's branches are evaluated.
    """
    state = patch_state(model)
    if state is None:
        if name is None:
            return
        raise KeyError(f"model carries no patch {name!r}; it has []")
    state.activate(model, name)


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
    state = patch_state(model)
    if state is None:
        raise KeyError(f"model carries no patch {name!r}; it has []")
    state.remove(model, name)


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
