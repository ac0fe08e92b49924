"""LowRankDelta math: zero at init, equal to its folded weight, never larger than its layer."""

import pytest
import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import nn

from mmdelta import DELTA_BRANCHES, LowRankDelta
from mmdelta.branches import LayerTooSmall

LAYERS = {
    "dense_3x3_stride2": lambda: nn.Conv2d(16, 32, 3, 2, 1),
    "dense_1x1": lambda: nn.Conv2d(64, 16, 1),
    "stem_7x7": lambda: nn.Conv2d(3, 16, 7, 2, 3),
    "grouped_resnext": lambda: nn.Conv2d(32, 32, 3, 1, 2, dilation=2, groups=8),
    "depthwise_7x7": lambda: nn.Conv2d(16, 16, 7, 1, 3, groups=16),
    "depthwise_multiplier": lambda: nn.Conv2d(8, 16, 5, 2, 2, groups=8),
    "reflect_padding": lambda: nn.Conv2d(8, 8, 3, 1, 1, padding_mode="reflect"),
    "same_padding_dilated": lambda: nn.Conv2d(8, 8, 3, padding="same", dilation=2),
    "depthwise_circular_rect": lambda: nn.Conv2d(
        8, 8, (3, 5), (2, 1), (1, 2), groups=8, padding_mode="circular"
    ),
    "linear_channels_last": lambda: nn.Linear(12, 48),
}


def make(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    x = (
        torch.randn(2, 5, 6, 12)
        if isinstance(layer, nn.Linear)
        else torch.randn(2, layer.in_channels, 17, 19)
    )
    return layer, x


@pytest.mark.parametrize("kind", list(LAYERS))
def test_zero_at_init_and_equal_to_folded_weight(kind):
    layer, x = make(kind)
    branch = LowRankDelta(layer, rank=4, alpha=8)
    base = layer(x)
    assert torch.equal(base + branch(x), base)

    nn.init.normal_(branch.up)
    delta = branch(x)
    assert delta.shape == base.shape and delta.abs().sum() > 0
    if isinstance(layer, nn.Linear):
        merged = F.linear(x, layer.weight + branch.delta_weight(), layer.bias)
    else:
        merged = layer._conv_forward(x, layer.weight + branch.delta_weight(), layer.bias)
    torch.testing.assert_close(merged, base + delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("rank", [1, 8, 64])
def test_never_more_parameters_than_the_layer(kind, rank):
    layer, _ = make(kind)
    branch = LowRankDelta(layer, rank=rank)
    assert sum(p.numel() for p in branch.parameters()) <= layer.weight.numel()
    assert 1 <= branch.rank <= rank


def test_forms_and_ranks():
    assert LowRankDelta(nn.Conv2d(16, 16, 7, groups=16), rank=8).form == "depthwise"
    assert LowRankDelta(nn.Conv2d(16, 16, 7, groups=16), rank=8).rank == 3  # 49 // 14
    grouped = LowRankDelta(nn.Conv2d(256, 256, 3, groups=32), rank=64)
    assert (grouped.form, grouped.rank) == ("conv", 2)  # 64 // 32 per group
    assert LowRankDelta(nn.Conv2d(256, 256, 3), rank=8).rank == 8
    with pytest.raises(LayerTooSmall):
        LowRankDelta(nn.Conv2d(8, 8, 1, groups=8))  # a 1x1 depthwise conv is a per-channel scale
    with pytest.raises(TypeError, match=r"nn\.Conv2d and nn\.Linear"):
        LowRankDelta(nn.BatchNorm2d(4))


def test_registry_builds_by_type():
    layer = nn.Conv2d(8, 8, 3)
    branch = DELTA_BRANCHES.build(dict(type="LowRankDelta", rank=2), default_args=dict(layer=layer))
    assert isinstance(branch, LowRankDelta) and branch.rank == 2


def test_openmmlab_initialisers_skip_branches():
    """``init_cfg`` initialisers pick layers by class name; a branch has no Conv2d inside."""

    class Neck(BaseModule):
        def __init__(self):
            super().__init__(
                init_cfg=[
                    dict(type="Xavier", layer="Conv2d"),
                    dict(type="Constant", layer="LowRankDelta", val=1),
                ]
            )
            self.conv = nn.Conv2d(8, 8, 3)
            self.branch = LowRankDelta(self.conv)

    neck = Neck()
    neck.init_weights()
    assert not neck.branch.up.any()


@pytest.mark.parametrize("kind", ["dense_3x3_stride2", "depthwise_7x7", "linear_channels_last"])
def test_compute_forms_agree_and_the_inference_fold_follows_updates(kind):
    from mmdelta.patching.slot import slot_of

    layer, x = make(kind)
    base = layer(x)
    branch = LowRankDelta(layer, rank=4)
    slot = slot_of(layer, create=True)
    slot["p"], slot.active = branch, "p"
    layer.eval()
    nn.init.normal_(branch.up)
    outputs = {}
    for compute in ("branch", "weight", "auto"):
        branch.compute = compute
        with torch.no_grad():
            outputs[compute] = layer(x)
    assert not torch.equal(outputs["branch"], base)
    torch.testing.assert_close(outputs["weight"], outputs["branch"], rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs["auto"], outputs["weight"])  # eval + no_grad: weight form
    with torch.no_grad():
        branch.up.mul_(2)  # an optimiser step: the cached fold must not be reused
        again = layer(x)
    torch.testing.assert_close(again - base, 2 * (outputs["weight"] - base), rtol=1e-4, atol=1e-4)
    slot.active = None
    assert torch.equal(layer(x), base)
    with pytest.raises(ValueError, match="`compute` must be"):
        LowRankDelta(layer, compute="fast")
