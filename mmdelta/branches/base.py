"""The kinds of part a patch adds to a layer, and the helpers they share.

:class:`PatchPart` (what a slot holds) ├─ :class:`DeltaBranch` (a registered Δ type)
├─ :class:`AdditiveDelta` / :class:`FoldingDelta`; patch-owned copies are
:class:`~mmdelta.branches.owned.PatchOwned`.
"""

from collections.abc import Callable
from itertools import chain

import torch
from torch import nn

#: the layer types (and their subclasses) Δ branches patch by default and heads end in
PATCHABLE_LAYERS = (nn.Conv2d, nn.Linear)


class LayerTooSmall(Exception):
    """Raised by a branch constructor when the layer is too small for the smallest branch.

    The patcher skips such a layer and lists it in the summary; it is not a user error.
    """


def tensor_store(layer: nn.Module, name: str) -> tuple[dict, str]:
    """The dict (``_parameters`` or ``_buffers`` of the owning module) that holds tensor
    ``name`` of ``layer`` (a state-dict name, e.g. ``weight`` or ``out_proj.weight``), and
    the key in it."""
    owner, attr = layer, name
    if "." in name:
        owner_path, _, attr = name.rpartition(".")
        owner = layer.get_submodule(owner_path)
    store = owner._parameters if attr in owner._parameters else owner._buffers
    if attr not in store:
        raise KeyError(f"{type(owner).__name__} has no parameter or buffer {attr!r}")
    return store, attr


def call_with_tensors(
    layer: nn.Module,
    tensors: dict[str, torch.Tensor],
    args: tuple,
    kwargs: dict,
    training: bool | None = None,
):
    """``layer(*args, **kwargs)`` computed by the layer's own *class* forward with some of its
    parameters / buffers replaced by ``tensors`` (names as in ``layer.state_dict()``) and,
    optionally, ``layer.training`` set to ``training`` for the call.

    The layer is left exactly as it was (also on error): the original parameter and buffer
    objects are put back, never recomputed. In-place buffer updates inside the forward
    (BatchNorm running statistics) go to the tensors passed in. (Runs on every patched
    forward, so it is kept lean: no context-manager objects, no lookups for direct names.)
    """
    saved = []
    saved_mode = layer.training
    switch = training is not None and training != saved_mode
    try:
        for name, tensor in tensors.items():
            store, attr = tensor_store(layer, name)
            saved.append((store, attr, store[attr]))
            store[attr] = tensor
        if switch:  # a plain attribute: skip nn.Module.__setattr__'s checks on this hot path
            layer.__dict__["training"] = training
        return type(layer).forward(layer, *args, **kwargs)
    finally:
        if switch:
            layer.__dict__["training"] = saved_mode
        for store, attr, original in reversed(saved):
            store[attr] = original


class PatchPart(nn.Module):
    """What a patch holds for one layer of the base: the contract a
    :class:`~mmdelta.patching.slot.DeltaSlot` relies on.

    While its patch is active the layer's forward is :meth:`patched_forward`; while it is
    inactive the layer runs its own class forward and the part is not evaluated. A part
    never writes the frozen layer's parameters or buffers.

    The kinds: :class:`AdditiveDelta` (``f(x) + Δ(x)``), :class:`FoldingDelta` (``f`` with
    Δ folded into its tensors) and :class:`~mmdelta.branches.PatchOwned` (the patch's own
    copy of the layer's tensors).
    """

    #: whether :meth:`merged_tensors` folds the part into the layer's own tensors.
    mergeable = False

    def __init__(self, layer: nn.Module):
        super().__init__()
        # a type-name string (not the module itself) so the layer is not registered twice
        self.layer_type = type(layer).__name__

    @classmethod
    def supports(cls, layer: nn.Module) -> bool:
        """Whether this part type can be attached to ``layer`` (used to expand targets)."""
        raise NotImplementedError

    def patched_forward(
        self, layer: nn.Module, base_forward: Callable, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        """The patched layer's output for inputs ``args`` / ``kwargs``; ``base_forward`` is
        the layer's own class forward."""
        raise NotImplementedError

    def merged_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """New values for some of ``layer``'s parameters/buffers (name -> tensor) such that the
        plain layer holding them computes what the patched layer computes (up to rounding).
        Returns new tensors; never modifies the layer."""
        raise NotImplementedError(f"{type(self).__name__} cannot be folded into its layer")

    def clear_cache(self) -> None:
        """Drops anything cached for inference (called when the active patch changes)."""
        self.__dict__.pop("_folded", None)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_folded", None)  # keyed on tensor ids: meaningless in a copy
        return state


class DeltaBranch(PatchPart):
    """A Δ on one frozen layer ``f`` (``f`` keeps its own parameters): the types
    ``delta_patch.branch=dict(type=...)`` selects from ``DELTA_BRANCHES``.

    Invariants of every branch type:

    * at construction the patched forward computes exactly the base function (``Δ ≡ 0``);
    * the branch never writes the frozen layer's parameters or buffers;
    * parameters are plain ``nn.Parameter`` attributes (no ``nn.Conv2d``/``nn.Linear``
      children), so OpenMMLab ``init_cfg`` initialisers that select layers by class name
      (e.g. FPN's ``Xavier(layer='Conv2d')``) never re-initialise them.

    A branch type is one of two kinds (or both, choosing per call: ``LowRankDelta``):
    :class:`AdditiveDelta` or :class:`FoldingDelta`.
    """

    @classmethod
    def supports(cls, layer: nn.Module) -> bool:
        return isinstance(layer, PATCHABLE_LAYERS)


class AdditiveDelta(DeltaBranch):
    """A branch whose patched layer returns ``f(x) + Δ(x)``: :meth:`forward` is ``Δ`` of the
    layer's first input, with exactly the layer's output shape.

    ``per_sample``: ``Δ(x)[i]`` depends on sample ``x[i]`` only, so a batch can give each
    sample its own patch (``DeltaSlot.routed_forward``)."""

    per_sample = True

    def patched_forward(
        self, layer: nn.Module, base_forward: Callable, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        output = base_forward(*args, **kwargs)
        delta = self(args[0])
        if delta.shape != output.shape:
            raise RuntimeError(
                f"Δ branch of {type(layer).__name__} produced {tuple(delta.shape)} but the "
                f"layer produced {tuple(output.shape)}: this layer computes its output in a "
                "non-standard way; leave it out of the patch with `exclude`."
            )
        return output + delta


class FoldingDelta(DeltaBranch):
    """A branch folded into the layer's own tensors: the patched layer is the layer's own
    class forward computed with :meth:`tensors` (e.g. ``W + ΔW``) in place of its
    parameters. One computation serves the forward (differentiable), the inference cache and
    the merge, so a merged layer computes what the patched one computes."""

    mergeable = True

    def tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """Layer state-dict name -> the value with Δ folded in (differentiable in Δ)."""
        raise NotImplementedError

    def patched_forward(
        self, layer: nn.Module, base_forward: Callable, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        """The layer's own forward computed with :meth:`tensors`: recomputed on every call
        while gradients may be needed, folded once and cached for inference (eval mode
        under ``torch.no_grad()``)."""
        if self.training or torch.is_grad_enabled():
            tensors = self.tensors(layer)
        else:
            tensors = self._cached_tensors(layer)
        return call_with_tensors(layer, tensors, args, kwargs)

    def merged_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.tensors(layer)

    def _cached_tensors(self, layer: nn.Module) -> dict:
        """:meth:`tensors`, computed once and reused until a parameter of the branch or the
        layer changes (tensor versions)."""
        own = chain(self._parameters.values(), layer._parameters.values())
        key = tuple((id(t), t._version) for t in own if t is not None)
        cached = self.__dict__.get("_folded")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.tensors(layer))
            self.__dict__["_folded"] = cached
        return cached[1]
