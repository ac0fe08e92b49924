"""The low-rank Δ branch for ``nn.Conv2d`` (dense, grouped, depthwise) and ``nn.Linear``."""

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import DELTA_BRANCHES
from .base import AdditiveDelta, FoldingDelta, LayerTooSmall


@DELTA_BRANCHES.register_module()
class LowRankDelta(AdditiveDelta, FoldingDelta):
    r"""Zero-initialised low-rank Δ: ``Δ(x) = s · up(down(x))`` with ``s = alpha / rank``.

    For a frozen conv ``f(x) = W ⋆ x`` with ``W: (C_out, C_in/g, k_h, k_w)`` and ``g`` groups:

    * **dense / grouped** (``C_in/g > 1``): ``down`` is a ``k_h×k_w`` conv ``C_in → g·r``
      with the layer's stride, padding (and padding mode), dilation and groups; ``up`` is a
      ``1×1`` conv ``g·r → C_out`` with ``g`` groups. Per group ``ΔW_j = s · U_j D_j`` with
      ``U_j: (C_out/g, r)``, ``D_j: (r, C_in/g·k_h·k_w)``, i.e. a block-diagonal ΔW of
      rank ``r`` per group. ``r = rank`` for dense convs and ``max(1, rank // g)`` for grouped
      ones. Parameters: ``r·(C_in·k_h·k_w + C_out)``.
    * **depthwise** (``C_in/g == 1``, e.g. ConvNeXt's 7×7): a per-channel low-rank
      *spatial* delta, ``ΔW_o = s · Σ_t col_{o,t} ⊗ row_{o,t}`` (``k_h×1`` times ``1×k_w``),
      computed as ``down`` = a ``(k_h×1)`` depthwise conv ``C_in → C_out·r`` and ``up`` = a
      ``(1×k_w)`` grouped conv ``C_out·r → C_out``. Parameters: ``C_out·r·(k_h + k_w)``.
    * **linear** ``f(x) = x W^T`` with ``W: (C_out, C_in)`` over the last dim of ``x``:
      ``down: (r, C_in)``, ``up: (C_out, r)``, ``ΔW = s · up @ down``.

    The rank is capped so that the branch never has more parameters than the weight it
    patches (nor more than the rank of that weight); a layer too small for rank 1 raises
    :class:`LayerTooSmall`. ``up`` is zero at initialisation (so ``Δ ≡ 0``) and ``down`` is
    Kaiming-uniform like a fresh conv. Shapes: ``forward`` maps the layer's input
    ``(N, C_in, H, W)`` (conv) or ``(..., C_in)`` (linear) to exactly the layer's output
    shape. Mergeable: ``f(x; W + delta_weight()) == f(x) + Δ(x)`` up to rounding.

    Two ways to compute the patched layer (``compute``):

    * **branch form** ``f(x; W) + Δ(x)``: Δ runs as its own two small convs; only Δ's own
      weight gradients are formed, but every branch re-reads the layer's input;
    * **weight form** ``f(x; W + ΔW)``: the layer's own kernel with a folded weight. In eval
      mode under ``torch.no_grad()`` the fold is computed once and cached until Δ or the
      patch selection changes, so inference costs what the base costs. In training the
      gradient reaches Δ through the fold, which forms the layer's full weight gradient.

    ``compute='auto'`` (default) uses the weight form for inference (eval + no_grad) and the
    branch form otherwise; ``'branch'`` / ``'weight'`` force one form. Either way the base
    ``W`` is never modified.

    Args:
        layer: the frozen ``nn.Conv2d`` or ``nn.Linear`` (or a subclass that keeps their
            geometry, e.g. mmcv's wrappers).
        rank: requested rank ``r`` (per group for grouped convs, see above).
        alpha: scale numerator; ``None`` means ``alpha = rank`` (scale 1).
    """

    def __init__(
        self, layer: nn.Module, rank: int = 8, alpha: float | None = None, compute: str = "auto"
    ):
        super().__init__(layer)
        if compute not in ("auto", "branch", "weight"):
            raise ValueError(
                f"LowRankDelta: `compute` must be 'auto', 'branch' or 'weight', got {compute!r}"
            )
        self.compute = compute
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"LowRankDelta: `rank` must be a positive integer, got {rank!r}")
        if alpha is not None and (
            isinstance(alpha, bool)
            or not isinstance(alpha, numbers.Real)
            or not 0 < alpha < math.inf  # inf: scale · 0 would be NaN, not an exact zero Δ
        ):
            raise ValueError(
                f"LowRankDelta: `alpha` must be a positive number (finite), got {alpha!r}"
            )
        self.requested_rank = int(rank)
        try:
            self.scale = 1.0 if alpha is None else float(alpha) / int(rank)
        except OverflowError as err:  # an int too large for a float
            raise ValueError(
                f"LowRankDelta: `rank` {rank} / `alpha` {alpha} out of range: {err}"
            ) from err
        weight = layer.weight
        factory = dict(device=weight.device, dtype=weight.dtype)

        if isinstance(layer, nn.Linear):
            self.form = "linear"
            c_in, c_out = layer.in_features, layer.out_features
            cap = min(c_in, c_out, (c_in * c_out) // (c_in + c_out))
            self.rank = self._capped(rank, cap)
            self.down = nn.Parameter(torch.empty(self.rank, c_in, **factory))
            self.up = nn.Parameter(torch.zeros(c_out, self.rank, **factory))
        elif isinstance(layer, nn.Conv2d):
            self._init_conv(layer, rank, factory)
        else:
            raise TypeError(
                f"LowRankDelta patches nn.Conv2d and nn.Linear layers, not {type(layer).__name__}"
            )
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    @staticmethod
    def _capped(requested: int, cap: int) -> int:
        if cap < 1:
            raise LayerTooSmall("a rank-1 delta would have more parameters than the layer")
        return min(int(requested), cap)

    def _init_conv(self, conv: nn.Conv2d, rank: int, factory: dict) -> None:
        c_in, c_out, g = conv.in_channels, conv.out_channels, conv.groups
        kh, kw = conv.kernel_size
        self.groups = g
        self.stride, self.dilation = tuple(conv.stride), tuple(conv.dilation)
        # (left, right, top, bottom), what torch itself pads with for non-zero modes
        self.pad4 = tuple(int(p) for p in conv._reversed_padding_repeated_twice)
        self.pad_mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        base_params = c_out * (c_in // g) * kh * kw
        if c_in // g == 1 and g > 1:
            self.form = "depthwise"
            cap = min(kh, kw, (kh * kw) // (kh + kw))
            self.rank = self._capped(rank, cap)
            self.down = nn.Parameter(torch.empty(c_out * self.rank, 1, kh, 1, **factory))
            self.up = nn.Parameter(torch.zeros(c_out, self.rank, 1, kw, **factory))
        else:
            self.form = "conv"
            per_group = rank if g == 1 else max(1, rank // g)
            cap = min(c_out // g, (c_in // g) * kh * kw, base_params // (c_in * kh * kw + c_out))
            self.rank = self._capped(per_group, cap)
            self.down = nn.Parameter(torch.empty(g * self.rank, c_in // g, kh, kw, **factory))
            self.up = nn.Parameter(torch.zeros(c_out, self.rank, 1, 1, **factory))

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pads like the base conv; returns the input and the conv's remaining padding."""
        left, right, top, bottom = self.pad4
        if self.pad_mode == "constant" and left == right and top == bottom:
            return x, (top, left)
        return F.pad(x, self.pad4, mode=self.pad_mode), (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up * self.scale if self.scale != 1.0 else self.up
        if self.form == "linear":
            return F.linear(F.linear(x, self.down), up)
        x, (ph, pw) = self._padded(x)
        (sh, sw), (dh, dw) = self.stride, self.dilation
        if self.form == "depthwise":
            h = F.conv2d(x, self.down, None, (sh, 1), (ph, 0), (dh, 1), self.groups)
            return F.conv2d(h, up, None, (1, sw), (0, pw), (1, dw), up.shape[0])
        h = F.conv2d(x, self.down, None, self.stride, (ph, pw), self.dilation, self.groups)
        return F.conv2d(h, up, None, 1, 0, 1, self.groups)

    def patched_forward(self, layer, base_forward, args, kwargs):
        """Branch form (additive) or weight form (folding), as ``compute`` says."""
        inference = not (self.training or torch.is_grad_enabled())
        if self.compute == "branch" or (self.compute == "auto" and not inference):
            return AdditiveDelta.patched_forward(self, layer, base_forward, args, kwargs)
        return FoldingDelta.patched_forward(self, layer, base_forward, args, kwargs)

    def tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """``W + ΔW``: the weight form, shared by the forward, the cache and the merge."""
        return {"weight": layer.weight + self.delta_weight().to(layer.weight.dtype)}

    def delta_weight(self) -> torch.Tensor:
        if self.form == "linear":
            return self.scale * self.up @ self.down
        if self.form == "depthwise":
            c_out, r, _, kw = self.up.shape
            down = self.down.view(c_out, r, -1)
            w = torch.einsum("ori,orj->oij", down, self.up.view(c_out, r, kw))
            return self.scale * w.unsqueeze(1)
        g, r = self.groups, self.rank
        c_out = self.up.shape[0]
        up = self.up.view(g, c_out // g, r)
        down = self.down.view(g, r, -1)
        w = torch.bmm(up, down).reshape(c_out, *self.down.shape[1:])
        return self.scale * w

    def extra_repr(self) -> str:
        return f"form={self.form}, rank={self.rank}, scale={self.scale:g}, compute={self.compute}"
