"""ScaleShiftDelta and BlockDelta: exact at init, mergeable/merged exactly, never touch the base."""

import copy

import pytest
import torch
from mmdet.models.backbones.resnet import BasicBlock as DetBasicBlock
from mmdet.models.backbones.resnet import Bottleneck as DetBottleneck
from mmdet.models.backbones.resnext import Bottleneck as ResNeXtBottleneck
from mmpretrain.models.backbones.convnext import ConvNeXtBlock
from mmpretrain.models.utils import LayerNorm2d
from mmseg.models.backbones import ResNetV1c
from torch import nn

from mmdelta import DELTA_BRANCHES
from mmdelta.branches import BlockDelta, ScaleShiftDelta
from mmdelta.patching.slot import slot_of


def attach(layer: nn.Module, branch: nn.Module) -> None:
    slot = slot_of(layer, create=True)
    slot["p"] = branch
    slot.active = "p"


def randomise_(module: nn.Module) -> None:
    """Non-trivial base parameters and running statistics (norms start at 1 / 0)."""
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            tensor.copy_(torch.randn_like(tensor) * (0.5 if "weight" in name else 0.2))
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn_like(buffer) * 0.1)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand_like(buffer) + 0.5)


def frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# --------------------------------------------------------------------- ScaleShiftDelta

#: name -> (layer factory, input shape, forward kwargs)
SCALE_SHIFT_LAYERS = {
    "conv": (lambda: nn.Conv2d(4, 6, 3, 2, 1), (2, 4, 9, 9), {}),
    "conv_no_bias": (lambda: nn.Conv2d(4, 6, 3, 1, 1, bias=False), (2, 4, 7, 7), {}),
    "conv_grouped": (lambda: nn.Conv2d(4, 8, 3, 1, 1, groups=2), (2, 4, 7, 7), {}),
    "linear": (lambda: nn.Linear(5, 7), (2, 3, 5), {}),
    "batchnorm_eval": (lambda: nn.BatchNorm2d(6).eval(), (2, 6, 5, 5), {}),
    "layernorm": (lambda: nn.LayerNorm(8), (2, 3, 8), {}),
    "layernorm_no_bias": (lambda: nn.LayerNorm(8, bias=False), (2, 3, 8), {}),
    "layernorm_2d_dims": (lambda: nn.LayerNorm((4, 3)), (2, 5, 4, 3), {}),
    "layernorm2d_channel_first": (lambda: LayerNorm2d(6), (2, 6, 5, 5), {}),
    "layernorm2d_channel_last": (
        lambda: LayerNorm2d(6),
        (2, 5, 5, 6),
        {"data_format": "channel_last"},
    ),
    "groupnorm": (lambda: nn.GroupNorm(2, 6), (2, 6, 5, 5), {}),
}


def make_scale_shift(kind):
    torch.manual_seed(0)
    factory, shape, kwargs = SCALE_SHIFT_LAYERS[kind]
    layer = factory()
    randomise_(layer)
    frozen(layer)
    return layer, torch.randn(*shape), kwargs


@pytest.mark.parametrize("kind", list(SCALE_SHIFT_LAYERS))
def test_scale_shift_exact_at_init_and_merges_exactly(kind):
    layer, x, kwargs = make_scale_shift(kind)
    plain = copy.deepcopy(layer)
    base = layer(x, **kwargs)
    saved = {k: v.clone() for k, v in layer.state_dict().items()}

    assert ScaleShiftDelta.supports(layer)
    branch = DELTA_BRANCHES.build(dict(type="ScaleShiftDelta", layer=layer))
    assert isinstance(branch, ScaleShiftDelta) and branch.mergeable
    has_bias = getattr(layer, "bias", None) is not None
    assert branch.form == ("scale_shift" if has_bias else "scale")
    assert (branch.beta is not None) == has_bias
    assert branch.gamma.shape == (layer.weight.shape[0],)
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in branch.modules())
    assert "form=" in repr(branch)
    attach(layer, branch)

    patched = layer(x, **kwargs)
    assert torch.equal(patched, base)  # ×1.0 and +0.0: bit for bit

    with torch.no_grad():
        for p in branch.parameters():
            p.normal_(0, 0.3)
    patched = layer(x, **kwargs)
    assert patched.shape == base.shape and not torch.allclose(patched, base)

    merged = branch.merged_tensors(layer)
    assert set(merged) == ({"weight", "bias"} if has_bias else {"weight"})
    plain.load_state_dict(merged, strict=False)
    assert torch.equal(plain(x, **kwargs), patched)

    # the base tensors are never written
    for k, v in layer.state_dict().items():
        if k in saved:
            assert torch.equal(v, saved[k]), k


@pytest.mark.parametrize("kind", ["conv", "layernorm2d_channel_last", "groupnorm"])
def test_scale_shift_gradients_reach_the_branch_only(kind):
    layer, x, kwargs = make_scale_shift(kind)
    branch = ScaleShiftDelta(layer)
    attach(layer, branch)
    with torch.no_grad():
        branch.gamma.normal_(0, 0.3)
    (layer(x, **kwargs) ** 2).sum().backward()
    for p in branch.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    base_params = [p for n, p in layer.named_parameters() if not n.startswith("delta.")]
    assert base_params and all(p.grad is None for p in base_params)


def test_scale_shift_batchnorm_training_keeps_the_base_statistics_path():
    """In training mode the patched BN updates the layer's running statistics exactly as the
    plain BN does (the statistics are the input's, not the scale's)."""
    layer, x, _ = make_scale_shift("batchnorm_eval")
    layer.train()
    plain = copy.deepcopy(layer)
    branch = ScaleShiftDelta(layer)
    attach(layer, branch)
    with torch.no_grad():
        branch.gamma.normal_(0, 0.3)
        branch.beta.normal_(0, 0.3)
    out = layer(x)
    plain.load_state_dict(branch.merged_tensors(layer), strict=False)
    assert torch.equal(plain(x), out)
    assert torch.equal(plain.running_mean, layer.running_mean)
    assert torch.equal(plain.running_var, layer.running_var)
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize(
    "layer",
    [
        nn.BatchNorm2d(6, affine=False),
        nn.LayerNorm(8, elementwise_affine=False),
        LayerNorm2d(6, elementwise_affine=False),
        nn.GroupNorm(2, 6, affine=False),
        nn.ConvTranspose2d(4, 6, 3),
        nn.Conv1d(4, 6, 3),
        nn.ReLU(),
    ],
    ids=lambda m: repr(m),
)
def test_scale_shift_unsupported(layer):
    assert not ScaleShiftDelta.supports(layer)
    with pytest.raises(TypeError):
        ScaleShiftDelta(layer)


def test_scale_shift_supports_sync_batchnorm():
    layer = nn.SyncBatchNorm(6)
    assert ScaleShiftDelta.supports(layer)
    assert ScaleShiftDelta(layer).form == "scale_shift"


# --------------------------------------------------------------------------- BlockDelta


def _downsample(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


def _v1c_stage_block(depth, stage, index):
    backbone = ResNetV1c(
        depth=depth,
        stem_channels=8,
        base_channels=8,
        num_stages=3,
        strides=(1, 2, 1),
        dilations=(1, 1, 2),
        out_indices=(2,),
    )
    return getattr(backbone, f"layer{stage}")[index]


#: name -> (block factory, C_in, C_out, stride)
BLOCKS = {
    "mmdet_bottleneck_s2": (
        lambda: DetBottleneck(16, 8, stride=2, downsample=_downsample(16, 32, 2)),
        16,
        32,
        2,
    ),
    "mmdet_basicblock_s2": (
        lambda: DetBasicBlock(16, 24, stride=2, downsample=_downsample(16, 24, 2)),
        16,
        24,
        2,
    ),
    "mmseg_v1c_bottleneck_s2": (lambda: _v1c_stage_block(50, 2, 0), 32, 64, 2),
    "mmseg_v1c_bottleneck_dilated": (lambda: _v1c_stage_block(50, 3, 1), 128, 128, 1),
    "mmseg_v1c_basicblock_s2": (lambda: _v1c_stage_block(18, 2, 0), 8, 16, 2),
    "resnext_bottleneck_s2": (
        lambda: ResNeXtBottleneck(
            64, 16, groups=32, base_width=4, stride=2, downsample=_downsample(64, 64, 2)
        ),
        64,
        64,
        2,
    ),
    "mmpretrain_convnext": (lambda: ConvNeXtBlock(16, layer_scale_init_value=0.5), 16, 16, 1),
}


def make_block(kind):
    torch.manual_seed(0)
    factory, c_in, c_out, stride = BLOCKS[kind]
    block = factory()
    randomise_(block)
    frozen(block)
    return block, torch.randn(2, c_in, 12, 12), c_out, stride


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_block_delta_zero_at_init_then_additive(kind):
    block, x, c_out, stride = make_block(kind)
    block.eval()
    base = block(x)
    assert base.shape == (2, c_out, 12 // stride, 12 // stride)

    assert BlockDelta.supports(block)
    branch = DELTA_BRANCHES.build(dict(type="BlockDelta", layer=block, width=8))
    assert isinstance(branch, BlockDelta) and branch.form == "block" and branch.width == 8
    assert (branch.out_channels, branch.stride) == (c_out, stride)
    assert branch.in_channels == x.shape[1]
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in branch.modules())
    assert "width=8" in repr(branch)
    attach(block, branch)

    assert torch.equal(block(x), base)

    with torch.no_grad():
        branch.up.normal_()
    patched = block(x)
    assert patched.shape == base.shape
    assert not torch.allclose(patched, base)
    assert torch.equal(patched, base + branch(x))


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_block_delta_gradients_reach_the_branch_only(kind):
    block, x, _, _ = make_block(kind)
    block.train()
    branch = BlockDelta(block, width=4)
    attach(block, branch)
    with torch.no_grad():
        branch.up.normal_()
    block(x).square().mean().backward()
    for name, p in branch.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    base_params = [p for n, p in block.named_parameters() if ".delta." not in f".{n}"]
    assert base_params and all(not p.requires_grad and p.grad is None for p in base_params)


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_block_delta_construction_leaves_the_block_alone(kind):
    block, _, _, _ = make_block(kind)
    block.train()
    first_norm = next(m for m in block.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)))
    first_norm.eval()  # a mixed-mode block: every module's own mode must come back
    modes = {name: m.training for name, m in block.named_modules()}
    buffers = {name: (b.clone(), b._version) for name, b in block.named_buffers()}

    branch = BlockDelta(block)
    assert branch.width == 16

    assert {name: m.training for name, m in block.named_modules()} == modes
    for name, b in block.named_buffers():
        assert torch.equal(b, buffers[name][0]) and b._version == buffers[name][1], name
    assert not branch.mergeable
    with pytest.raises(NotImplementedError):
        branch.merged_tensors(block)


@pytest.mark.parametrize("width", [0, -1, 2.5, True, "16", None])
def test_block_delta_rejects_bad_width(width):
    block, _, _, _ = make_block("mmdet_basicblock_s2")
    with pytest.raises(ValueError, match="width"):
        BlockDelta(block, width=width)


def test_block_delta_supports_only_residual_blocks():
    import torchvision.models.resnet as tv

    assert BlockDelta.supports(tv.BasicBlock(8, 8))
    assert BlockDelta.supports(tv.Bottleneck(32, 8))
    for layer in (nn.Conv2d(8, 8, 3), nn.Sequential(nn.Conv2d(8, 8, 3)), nn.BatchNorm2d(8)):
        assert not BlockDelta.supports(layer)
        with pytest.raises(TypeError):
            BlockDelta(layer)

    branch = BlockDelta(tv.Bottleneck(16, 8, stride=2, downsample=_downsample(16, 32, 2)))
    assert (branch.in_channels, branch.out_channels, branch.stride) == (16, 32, 2)


def test_block_delta_rejects_a_block_of_unexpected_geometry():
    class BasicBlock(nn.Module):  # a "block" whose stride does not divide the probe size
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, stride=3, padding=1)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(TypeError, match="stride"):
        BlockDelta(BasicBlock())

    class Bottleneck(nn.Module):  # a "block" that returns features, not a 4-D map
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x.mean((2, 3)))

    with pytest.raises(TypeError, match="stride"):
        BlockDelta(Bottleneck())


# ----------------------------------------------------------------------------- the kinds


def test_every_registered_branch_type_has_a_kind_and_mergeable_follows_it():
    from mmdelta.branches import (
        AdditiveDelta,
        DeltaBranch,
        FoldingDelta,
        LowRankDelta,
        PatchOwned,
        PatchPart,
    )

    DELTA_BRANCHES.import_from_location()
    types = dict(DELTA_BRANCHES.module_dict)
    assert {"LowRankDelta", "ScaleShiftDelta", "BlockDelta", "SideDelta"} <= set(types)
    for name, cls in types.items():
        assert issubclass(cls, DeltaBranch), name
        assert issubclass(cls, AdditiveDelta | FoldingDelta), f"{name} has no kind"
        assert cls.mergeable == issubclass(cls, FoldingDelta), name
    assert issubclass(LowRankDelta, AdditiveDelta) and issubclass(LowRankDelta, FoldingDelta)
    # a patch-owned copy is a part of a patch, not a Δ branch, and is not registered
    assert issubclass(PatchOwned, PatchPart) and not issubclass(PatchOwned, DeltaBranch)
    assert PatchOwned.mergeable and "PatchOwned" not in types


def test_delta_branches_is_a_scoped_child_of_the_root_model_registry():
    from mmengine.registry import MODELS, DefaultScope

    assert DELTA_BRANCHES.parent is MODELS and DELTA_BRANCHES.scope == "mmdelta"
    assert MODELS.children["mmdelta"] is DELTA_BRANCHES

    conv = nn.Conv2d(4, 6, 3)
    branch = MODELS.build(dict(type="mmdelta.ScaleShiftDelta", layer=conv))
    assert isinstance(branch, ScaleShiftDelta)
    # an mmdet / mmseg default scope (set by their runners) does not hide the branch types
    for scope in ("mmdet", "mmseg", None):
        with DefaultScope.overwrite_default_scope(scope):
            branch = DELTA_BRANCHES.build(dict(type="ScaleShiftDelta", layer=conv))
            assert isinstance(branch, ScaleShiftDelta), scope
            block = MODELS.build(dict(type="mmdelta.BlockDelta", layer=DetBasicBlock(8, 8)))
            assert isinstance(block, BlockDelta), scope
