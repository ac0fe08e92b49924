"""The side Δ-network: a small ladder beside a whole frozen backbone.

Per-layer Δ branches sit inside the backbone, so the gradient of every training step must
travel back through all of it (and every branch re-reads its layer's input). A side network
reads what the frozen backbone *produces* — its multi-scale outputs — plus the image, and
adds a correction to each output. No gradient ever crosses the backbone, which then runs
under ``torch.no_grad()``: the training step costs the backbone's inference, the side
network, and whatever trains after the backbone (neck, heads).
"""

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import DELTA_BRANCHES
from .base import AdditiveDelta
from .block import _input_channels, _probe

#: side of the square zeros input of the geometry dry run (stride 32 still leaves 4×4)
_PROBE_SIZE = 128


def _features(output) -> list[torch.Tensor]:
    """The backbone's output as a list of tensors (a tensor, a tuple/list or a dict of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return list(output.values())
    if isinstance(output, Sequence) and not isinstance(output, str):
        return list(output)
    raise TypeError(f"a backbone output of type {type(output).__name__}")


def _like(output, features: list[torch.Tensor]):
    """``features`` in the structure of ``output`` (tensor, tuple, list or dict)."""
    if isinstance(output, torch.Tensor):
        return features[0]
    if isinstance(output, Mapping):
        return type(output)(zip(output.keys(), features, strict=True))
    return type(output)(features) if isinstance(output, tuple | list) else features


def _conv(c_out: int, c_in: int, k: int, factory: dict, zero: bool = False) -> nn.Parameter:
    weight = nn.Parameter(torch.empty(c_out, c_in, k, k, **factory))
    if zero:
        nn.init.zeros_(weight)
    else:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


@DELTA_BRANCHES.register_module()
class SideDelta(AdditiveDelta):
    r"""A zero-initialised side network beside a frozen backbone (ladder side-tuning).

    The backbone maps an image ``x: (N, C_img, H, W)`` to features ``f_i: (N, C_i, H/s_i,
    W/s_i)``, ``i = 0 … L-1`` (a tuple, list or dict, e.g. ResNet's four stages or ConvNeXt's
    normalised stage outputs). The side network has one level per output, ``width`` channels:

    * ``z_0 = lat_0(f_0) + stem(x)`` (``stem``: ``log2 s_0`` 3×3 stride-2 convs, only with
      ``image=True``); ``z_i = lat_i(f_i) + down_i(h_{i-1})`` (``lat``: 1×1 conv,
      ``down``: 3×3 conv with the stride between the two levels: the ladder);
    * ``h_i = z_i + mix_i(GELU(GN(z_i)))`` (``mix``: 3×3 conv, GroupNorm with the branch's
      own affine parameters and no running statistics);
    * ``Δ_i = up_i(GELU(h_i))`` (``up``: 1×1 conv ``width → C_i`` with a bias, both **zero**
      at construction, so ``Δ ≡ 0`` and the patched backbone is exactly the base).

    The patched backbone returns ``f_i + Δ_i`` in the base's output structure. When nothing
    inside the backbone needs a gradient (no other trainable branch of the selected patch
    sits in it — the case the side network is for), the base backbone runs under
    ``torch.no_grad()``: no activation of it is kept for backward and no gradient crosses it.

    Geometry is read generically (one mechanism for mmdet / mmseg ResNets, ResNeXt,
    mmpretrain ConvNeXt, torchvision backbones): ``C_img`` from the backbone's first layer
    with ``in_channels``, ``C_i`` and ``s_i`` from one dry run on zeros ``(1, C_img, 128,
    128)`` in eval mode without gradients (every mode and buffer restored). Where a level's
    spatial size differs from the ladder's (odd sizes, patchify stems), the ladder's state is
    resized (nearest) to the backbone's.

    Not mergeable (a network beside the backbone, not a weight change). Inference cost: the
    side network's convolutions at ``width`` channels beside the base backbone.

    Args:
        layer: the frozen backbone (any module whose forward maps an image to features).
        width: channels of the side network.
        image: whether the side network also reads the image (its own stem).
        groups: GroupNorm groups (must divide ``width``).
    """

    #: its Δ reads the backbone's outputs too (``forward(x, features)``), not only ``x``
    per_sample = False

    def __init__(self, layer: nn.Module, width: int = 64, image: bool = True, groups: int = 8):
        super().__init__(layer)
        for key, value in (("width", width), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"SideDelta: `{key}` must be a positive integer, got {value!r}")
        if width % groups:
            raise ValueError(f"SideDelta: `groups` ({groups}) must divide `width` ({width})")
        if not isinstance(image, bool):
            raise ValueError(f"SideDelta: `image` must be True or False, got {image!r}")
        self.form = "side"
        self.width, self.image, self.groups = int(width), image, int(groups)
        c_img = _input_channels(layer, "SideDelta")
        try:
            shapes = [f.shape for f in _features(_probe(layer, c_img, _PROBE_SIZE))]
        except Exception as err:  # whatever a non-backbone raises on an image
            raise TypeError(
                f"SideDelta: {type(layer).__name__} cannot run on an image (1, {c_img}, "
                f"{_PROBE_SIZE}, {_PROBE_SIZE}) ({type(err).__name__}: {err}); a side network "
                "sits beside a module that maps the image to feature maps (a backbone)"
            ) from err
        bad = [tuple(s) for s in shapes if len(s) != 4 or s[0] != 1 or _PROBE_SIZE % s[-1]]
        if not shapes or bad:
            raise TypeError(
                f"SideDelta: {type(layer).__name__} maps a (1, {c_img}, {_PROBE_SIZE}, "
                f"{_PROBE_SIZE}) image to {[tuple(s) for s in shapes]}, not to feature maps "
                f"(1, C, {_PROBE_SIZE}/s, {_PROBE_SIZE}/s); it cannot get a side network"
            )
        self.channels = [int(s[1]) for s in shapes]
        self.strides = [_PROBE_SIZE // int(s[-1]) for s in shapes]
        param = next(layer.parameters(), None)
        factory = dict(device=param.device, dtype=param.dtype) if param is not None else {}
        w = self.width

        def params(shape_fn, n, **kw):
            return nn.ParameterList([shape_fn(i, **kw) for i in range(n)])

        levels = len(self.channels)
        self.lat = params(lambda i: _conv(w, self.channels[i], 1, factory), levels)
        self.lat_bias = params(lambda i: nn.Parameter(torch.zeros(w, **factory)), levels)
        self.down = params(lambda i: _conv(w, w, 3, factory), levels - 1)
        self.mix = params(lambda i: _conv(w, w, 3, factory), levels)
        self.norm_weight = params(lambda i: nn.Parameter(torch.ones(w, **factory)), levels)
        self.norm_bias = params(lambda i: nn.Parameter(torch.zeros(w, **factory)), levels)
        self.up = params(lambda i: _conv(self.channels[i], w, 1, factory, zero=True), levels)
        self.up_bias = params(
            lambda i: nn.Parameter(torch.zeros(self.channels[i], **factory)), levels
        )
        # the image stem: stride-2 convs up to the first level's stride (4 for ResNet's C2)
        steps = max(0, round(math.log2(self.strides[0]))) if image else 0
        chans = [c_img] + [max(w // 2, 8)] * (steps - 1) + [w]
        self.stem = nn.ParameterList(
            [_conv(chans[k + 1], chans[k], 3, factory) for k in range(steps)]
        )

    @classmethod
    def supports(cls, layer: nn.Module) -> bool:
        """Never chosen by target expansion: a side network is placed with
        ``delta_patch.side`` on one module (default ``backbone``)."""
        return False

    def forward(self, x: torch.Tensor, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Corrections ``Δ_i`` (shapes of ``features``) from the image and the features."""
        deltas, h = [], None
        for i, f in enumerate(features):
            z = F.conv2d(f, self.lat[i], self.lat_bias[i])
            if i == 0:
                if len(self.stem):
                    s = x
                    for k, weight in enumerate(self.stem):
                        s = F.conv2d(s, weight, None, 2, 1)
                        if k < len(self.stem) - 1:
                            s = F.gelu(s)
                    z = z + _resized(s, z)
            else:
                stride = max(1, self.strides[i] // self.strides[i - 1])
                z = z + _resized(F.conv2d(h, self.down[i - 1], None, stride, 1), z)
            g = F.group_norm(z, self.groups, self.norm_weight[i], self.norm_bias[i])
            h = z + F.conv2d(F.gelu(g), self.mix[i], None, 1, 1)
            deltas.append(F.conv2d(F.gelu(h), self.up[i], self.up_bias[i]))
        return deltas

    def patched_forward(self, layer, base_forward, args, kwargs):
        if _needs_grad_inside(layer, self):
            output = base_forward(*args, **kwargs)
        else:
            with torch.no_grad():
                output = base_forward(*args, **kwargs)
        features = _features(output)
        if len(features) != len(self.channels):
            raise RuntimeError(
                f"SideDelta: the backbone returned {len(features)} feature maps, the side "
                f"network was built for {len(self.channels)}"
            )
        x = args[0] if args else next(iter(kwargs.values()))
        deltas = self(x.to(self.lat[0].dtype) if self.image else x, features)
        return _like(output, [f + d.to(f.dtype) for f, d in zip(features, deltas, strict=True)])

    def extra_repr(self) -> str:
        return (
            f"form={self.form}, width={self.width}, channels={self.channels}, "
            f"strides={self.strides}, image={self.image}"
        )


def _resized(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if h.shape[-2:] == like.shape[-2:]:
        return h
    return F.interpolate(h, size=like.shape[-2:], mode="nearest")


def _needs_grad_inside(layer: nn.Module, branch: nn.Module) -> bool:
    """Whether anything inside ``layer`` other than ``branch`` requires a gradient (another
    trainable branch of the selected patch, or a base parameter someone unfroze)."""
    if not torch.is_grad_enabled():
        return False
    own = {id(q) for q in branch.parameters()}
    return any(p.requires_grad and id(p) not in own for p in layer.parameters())
