"""Patch-owned layers: the patch's own copy of a layer's tensors (heads, task-specific norms)."""

from collections.abc import Sequence

import torch
from torch import nn

from .base import PatchPart, call_with_tensors

#: owned tensor ``name`` is held as ``own_<name>`` with ``.`` written as ``__``: no attribute
#: is called ``weight``/``bias``, so OpenMMLab initialisers (which re-initialise any module
#: with a ``weight``, e.g. ``init_cfg`` overrides by name) never reach the patch's copies
_PREFIX, _SEP = "own_", "__"


def owned_tensor_names(layer: nn.Module) -> list[str]:
    """The tensors a patch owns for ``layer``: its direct parameters and persistent buffers,
    plus those of children its forward reads without calling them (``out_proj`` of
    ``nn.MultiheadAttention``). Names as in ``layer.state_dict()``."""
    names = [n for n, p in layer._parameters.items() if p is not None]
    names += [
        n
        for n, b in layer._buffers.items()
        if b is not None and n not in layer._non_persistent_buffers_set
    ]
    if isinstance(layer, nn.MultiheadAttention):
        names += [f"out_proj.{n}" for n, p in layer.out_proj._parameters.items() if p is not None]
    return names


def tracks_running_stats(layer: nn.Module) -> bool:
    buffers = layer._buffers
    return buffers.get("running_mean") is not None or buffers.get("running_var") is not None


class PatchOwned(PatchPart):
    """The patch's own copy of a layer's parameters and buffers, initialised from the base's.

    While its patch is active the layer's own class forward runs with these tensors in
    place of the base's (which are never read or written), so the patch can retrain the
    layer freely — and, with ``rows``, give it another output size (a new class set).

    * ``rows`` (optional) maps each output row of the patch's layer to the base row it is
      initialised from (``None``: freshly initialised). Every owned tensor whose dim 0 is
      the base's output size is re-indexed: new shape ``(len(rows), ...)``. Fresh weight rows
      are drawn from ``N(0, std(base weight))``, fresh bias entries get the base bias' mean
      (keeping prior-probability biases such as RetinaNet's).
    * Layers with running statistics (BatchNorm): with ``update_stats`` the copy uses batch
      statistics and updates its *own* running statistics while the model trains; without,
      it always normalises with its own (copied, frozen) statistics. The base's statistics
      never change either way.

    Tensor ``name`` of the layer is held as ``own_<name>`` (``.`` written as ``__``), e.g.
    ``roi_head.bbox_head.fc_cls.delta.voc.own_weight``; :meth:`tensors` maps them back.
    """

    mergeable = True

    def __init__(
        self, layer: nn.Module, rows: Sequence[int | None] | None = None, update_stats=True
    ):
        super().__init__(layer)
        self.form = "owned"
        self.update_stats = bool(update_stats)
        self.has_stats = tracks_running_stats(layer)
        state = layer.state_dict(keep_vars=True)
        parameters = {n for n, _ in layer.named_parameters()}
        out_size = layer.weight.shape[0] if rows is not None else None
        for name in owned_tensor_names(layer):
            tensor = state[name].detach()
            if rows is not None and tensor.dim() >= 1 and tensor.shape[0] == out_size:
                tensor = _reindexed(tensor, rows, is_weight=name.endswith("weight"))
            else:
                tensor = tensor.clone()
            key = _PREFIX + name.replace(".", _SEP)
            if name in parameters:
                self.register_parameter(key, nn.Parameter(tensor, requires_grad=False))
            else:
                self.register_buffer(key, tensor)
        self.out_rows = len(rows) if rows is not None else None

    @classmethod
    def supports(cls, layer: nn.Module) -> bool:
        return bool(owned_tensor_names(layer))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Layer state-dict name -> this patch's tensor."""
        own = {**self._parameters, **self._buffers}
        return {k.removeprefix(_PREFIX).replace(_SEP, "."): v for k, v in own.items()}

    def patched_forward(self, layer, base_forward, args, kwargs):
        training = (self.training and self.update_stats) if self.has_stats else None
        return call_with_tensors(layer, self.tensors(), args, kwargs, training=training)

    def merged_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.tensors().items()}

    def extra_repr(self) -> str:
        out = f", out rows={self.out_rows}" if self.out_rows is not None else ""
        stats = f", update_stats={self.update_stats}" if self.has_stats else ""
        return f"tensors={list(self.tensors())}{out}{stats}"


@torch.no_grad()
def _reindexed(base: torch.Tensor, rows: Sequence[int | None], is_weight: bool) -> torch.Tensor:
    out = base.new_empty((len(rows), *base.shape[1:]))
    fresh = [i for i, r in enumerate(rows) if r is None]
    kept = [(i, r) for i, r in enumerate(rows) if r is not None]
    if kept:
        dst, src = zip(*kept, strict=True)
        out[list(dst)] = base[list(src)]
    if fresh:
        if is_weight and base.is_floating_point():
            std = float(base.float().std()) if base.numel() > 1 else 0.01
            out[fresh] = torch.randn_like(out[fresh]) * std
        else:
            out[fresh] = base.mean() if base.is_floating_point() else 0
    return out
