"""The per-output-channel scale-and-shift Δ branch (convs, linears and affine norms)."""

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..registry import DELTA_BRANCHES
from .base import FoldingDelta

#: layer types whose ``weight`` has the output channels along dim 0 and whose output is
#: linear in (weight, bias) per output channel.
_SUPPORTED = (nn.Conv2d, nn.Linear, _BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _along_dim0(vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``vector`` of shape ``(C,)`` viewed to broadcast along dim 0 of ``like``."""
    return vector.view(-1, *([1] * (like.dim() - 1)))


@DELTA_BRANCHES.register_module()
class ScaleShiftDelta(FoldingDelta):
    r"""Zero-initialised per-output-channel scale and shift, applied in weight space.

    For a frozen layer with weight ``W`` (output channels along dim 0) and bias ``b`` the
    patched layer is the layer's own forward computed with

    .. math::

        W' = W \cdot (1 + \gamma), \qquad b' = b \cdot (1 + \gamma) + \beta,

    ``γ, β`` of shape ``(C_out,)`` (``γ`` broadcast along dim 0 of ``W``). For a conv or
    linear layer this scales each output channel by ``1 + γ`` and then shifts it by ``β``;
    for an affine norm (BatchNorm, LayerNorm, GroupNorm) it does the same to the normalised
    output. ``γ`` and ``β`` are zero at initialisation, so the patched layer multiplies by
    exactly ``1.0`` and adds exactly ``0.0``: it computes the base output bit for bit.

    ``β`` exists only when the layer has a bias: a shift cannot be folded into the plain
    checkpoint of a bias-less layer (there is no tensor to hold it), so on such layers the
    branch is a pure scale (``form == "scale"``; otherwise ``"scale_shift"``).

    Supported: ``nn.Conv2d``, ``nn.Linear``, torch BatchNorm (``_BatchNorm``, including
    ``SyncBatchNorm``), ``nn.LayerNorm`` (and subclasses such as mmpretrain's
    ``LayerNorm2d``) and ``nn.GroupNorm`` — in each case only with an affine ``weight``.
    ``nn.ConvTranspose2d`` is not supported (its dim 0 is the input channels). Layers that
    re-normalise their weight per output channel in their forward (weight-standardised
    convs) undo the scale; only the shift has an effect on them.

    Mergeable: :meth:`merged_tensors` returns ``W'`` and ``b'`` computed by exactly the
    operations the patched forward uses, so a plain layer holding them computes bit for bit
    what the patched layer computes. The base tensors are never modified; BatchNorm running
    statistics are the layer's own (read, and updated in training mode, as without the
    patch).

    Args:
        layer: the frozen layer (see above).
    """

    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        if not self.supports(layer):
            raise TypeError(
                "ScaleShiftDelta patches nn.Conv2d, nn.Linear and affine BatchNorm / "
                f"LayerNorm / GroupNorm layers, not {type(layer).__name__}"
                + (" without an affine weight" if isinstance(layer, _SUPPORTED) else "")
            )
        weight = layer.weight
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.channels = weight.shape[0]
        self.gamma = nn.Parameter(torch.zeros(self.channels, **factory))
        if getattr(layer, "bias", None) is not None:
            self.form = "scale_shift"
            self.beta = nn.Parameter(torch.zeros(self.channels, **factory))
        else:
            self.form = "scale"
            self.beta = None

    @classmethod
    def supports(cls, layer: nn.Module) -> bool:
        return isinstance(layer, _SUPPORTED) and getattr(layer, "weight", None) is not None

    def tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """``W'`` and ``b'``: the one computation shared by the forward and the merge."""
        weight, bias = layer.weight, getattr(layer, "bias", None)
        factor = 1 + self.gamma
        tensors = {"weight": weight * _along_dim0(factor, weight)}
        if bias is not None:
            scaled = bias * _along_dim0(factor, bias)
            if self.beta is not None:
                scaled = scaled + _along_dim0(self.beta, bias)
            tensors["bias"] = scaled
        return tensors

    def extra_repr(self) -> str:
        return f"form={self.form}, channels={self.channels}"
