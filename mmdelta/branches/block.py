"""The block-level Δ branch: a small network in parallel with a whole residual block."""

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import DELTA_BRANCHES
from .base import AdditiveDelta

#: class names (anywhere in the MRO) of the residual blocks this branch patches
BLOCK_CLASS_NAMES = frozenset({"BasicBlock", "Bottleneck", "ConvNeXtBlock"})

#: side of the square zeros input of the geometry dry run
_PROBE_SIZE = 32


def _input_channels(block: nn.Module, who: str = "BlockDelta") -> int:
    """``in_channels`` / ``in_features`` of the block's first submodule (registration order)
    that has one: the number of channels the block reads."""
    for name, module in block.named_modules():
        if not name:
            continue  # the block itself
        for attr in ("in_channels", "in_features"):
            value = getattr(module, attr, None)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                return int(value)
    raise TypeError(
        f"{who}: cannot tell the input channels of {type(block).__name__}: none of its "
        "submodules has an `in_channels` or `in_features` attribute"
    )


def _probe(block: nn.Module, c_in: int, size: int = _PROBE_SIZE):
    """The block's own class forward on zeros ``(1, c_in, size, size)`` in eval mode,
    without gradients; every submodule's mode and every buffer (running statistics) is left
    exactly as it was."""
    param = next(block.parameters(), None)
    factory = (
        dict(device=param.device, dtype=param.dtype)
        if param is not None and param.is_floating_point()
        else {}
    )
    modes = [(m, m.training) for m in block.modules()]
    buffers = [(b, b.clone()) for b in block.buffers()]
    try:
        for module, _ in modes:
            module.training = False  # not .eval(): a block may override train()
        with torch.no_grad():
            return type(block).forward(block, torch.zeros(1, c_in, size, size, **factory))
    finally:
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            for buffer, saved in buffers:
                if not torch.equal(buffer, saved):
                    buffer.copy_(saved)


@DELTA_BRANCHES.register_module()
class BlockDelta(AdditiveDelta):
    r"""Zero-initialised Δ network in parallel with a whole residual block.

    ``Δ(x) = up(GELU(down(x)))`` where ``down`` is a ``3×3`` conv ``C_in → width`` with the
    block's overall stride ``s`` (padding 1) and ``up`` a ``1×1`` conv ``width → C_out``; both
    have a bias. ``up`` (weight and bias) is zero at initialisation, so ``Δ ≡ 0`` and the
    patched block computes exactly the base block; ``down`` is Kaiming-uniform like a fresh
    conv, with a zero bias. The patched block returns ``block(x) + Δ(x)`` (the default
    additive :meth:`~AdditiveDelta.patched_forward`). Parameters:
    ``width·(9·C_in + 1) + C_out·(width + 1)``.

    Supported: residual blocks, recognised by a class named ``BasicBlock``, ``Bottleneck``
    or ``ConvNeXtBlock`` anywhere in the MRO (mmdet / mmseg / mmpretrain ResNet blocks,
    ResNeXt's ``Bottleneck`` subclass, mmpretrain's ``ConvNeXtBlock``, torchvision's
    blocks). Blocks map ``(N, C_in, H, W)`` to ``(N, C_out, H/s, W/s)``.

    The geometry is read generically: ``C_in`` is the ``in_channels`` / ``in_features`` of
    the block's first submodule that has one; ``C_out`` and ``s`` come from one dry run of
    the block on zeros ``(1, C_in, 32, 32)`` without gradients and in eval mode (every
    submodule's mode and every buffer is restored exactly afterwards). A block whose output
    is not ``(1, C_out, 32/s, 32/s)`` for an integer ``s`` raises ``TypeError``.

    Not mergeable: the Δ network is nonlinear and sits beside several layers.

    Args:
        layer: the frozen residual block.
        width: number of hidden channels of the Δ network.
    """

    def __init__(self, layer: nn.Module, width: int = 16):
        super().__init__(layer)
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
            raise ValueError(f"BlockDelta: `width` must be a positive integer, got {width!r}")
        if not self.supports(layer):
            raise TypeError(
                "BlockDelta patches residual blocks (a class named "
                f"{' / '.join(sorted(BLOCK_CLASS_NAMES))} in the MRO), "
                f"not {type(layer).__name__}"
            )
        self.form = "block"
        self.width = int(width)
        c_in = _input_channels(layer)
        out = _probe(layer, c_in)
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        if (
            shape is None
            or len(shape) != 4
            or shape[0] != 1
            or shape[2] != shape[3]
            or shape[2] < 1
            or _PROBE_SIZE % shape[2]
        ):
            got = shape if shape is not None else type(out).__name__
            raise TypeError(
                f"BlockDelta: {type(layer).__name__} maps a (1, {c_in}, {_PROBE_SIZE}, "
                f"{_PROBE_SIZE}) input to {got}, not to (1, C_out, {_PROBE_SIZE}/s, "
                f"{_PROBE_SIZE}/s) with an integer stride s; it cannot get a block-level Δ"
            )
        self.in_channels, self.out_channels = c_in, shape[1]
        self.stride = _PROBE_SIZE // shape[2]

        factory = dict(device=out.device, dtype=out.dtype)
        self.down = nn.Parameter(torch.empty(self.width, c_in, 3, 3, **factory))
        self.down_bias = nn.Parameter(torch.zeros(self.width, **factory))
        self.up = nn.Parameter(torch.zeros(self.out_channels, self.width, 1, 1, **factory))
        self.up_bias = nn.Parameter(torch.zeros(self.out_channels, **factory))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    @classmethod
    def supports(cls, layer: nn.Module) -> bool:
        return any(klass.__name__ in BLOCK_CLASS_NAMES for klass in type(layer).__mro__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.conv2d(x, self.down, self.down_bias, self.stride, 1))
        return F.conv2d(h, self.up, self.up_bias)

    def extra_repr(self) -> str:
        return (
            f"form={self.form}, in_channels={self.in_channels}, width={self.width}, "
            f"out_channels={self.out_channels}, stride={self.stride}"
        )
