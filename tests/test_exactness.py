"""The central promise on real mmdet / mmseg / mmpretrain models: with the patch off the
model is the base model bit for bit — right after patching, with non-zero Δ weights, and
after real training steps (BatchNorm statistics included)."""

import copy

import pytest
import torch
from mm_models import (
    MODELS,
    build_pair,
    make_batch,
    register_scopes,
    tensor_outputs,
)
from mmengine.optim import OptimWrapper

from mmdelta import apply_delta_patch, base_state_dict, delta_disabled
from mmdelta.exactness import identical
from mmdelta.patching.slot import iter_slots


def delta_params(model):
    return {
        f"{path}.delta.{name}.{pname}": p
        for path, slot in iter_slots(model)
        for name, branch in slot.items()
        for pname, p in branch.named_parameters()
    }


def base_state(model):
    return {k: v.clone() for k, v in base_state_dict(model).items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_model_is_exact_until_delta_is_nonzero(name):
    model, base = build_pair(name)
    batch = make_batch(name)
    expected = tensor_outputs(base, batch)

    summary = apply_delta_patch(model, {})
    assert summary.layers and summary.delta_params > 0
    assert identical(tensor_outputs(model, batch), expected)

    torch.manual_seed(0)
    for key, p in delta_params(model).items():
        if key.endswith(".up"):
            torch.nn.init.normal_(p, std=0.1)
    patched = tensor_outputs(model, batch)
    assert not identical(patched, expected), "non-zero Δ weights must change the output"

    with delta_disabled(model):
        assert identical(tensor_outputs(model, batch), expected)
    # the patch is live again after the block
    assert identical(tensor_outputs(model, batch), patched)


@pytest.mark.parametrize("name", list(MODELS))
def test_training_steps_touch_only_delta(name):
    model, base = build_pair(name)
    batch = make_batch(name)
    expected = tensor_outputs(base, batch)
    apply_delta_patch(model, {})
    before = base_state(model)
    deltas = delta_params(model)
    initial = {k: p.detach().clone() for k, p in deltas.items()}

    assert {id(p) for p in model.parameters() if p.requires_grad} == {
        id(p) for p in deltas.values()
    }

    got_grad = dict.fromkeys(deltas, False)
    for key, p in deltas.items():
        p.register_hook(
            lambda g, key=key: got_grad.__setitem__(key, got_grad[key] or bool(g.abs().sum() > 0))
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = OptimWrapper(torch.optim.SGD(trainable, lr=0.01, momentum=0.9))
    model.train()
    for step in range(3):
        losses = model.train_step(make_batch(name, seed=step), optim)
        assert all(torch.isfinite(v).all() for v in losses.values())

    assert all(got_grad.values()), [k for k, v in got_grad.items() if not v]
    # every Δ tensor moves, but a LowRankDelta's `down`: its gradient passes through its
    # zero-initialised `up` (about 1e-5 after three steps), so its updates can sit below
    # float32 resolution (the stem's do); it is proven to train by its gradient above
    unchanged = [
        k for k, p in deltas.items() if not k.endswith(".down") and torch.equal(p, initial[k])
    ]
    assert not unchanged, unchanged

    after = base_state(model)
    reference = base.state_dict()
    assert after.keys() == before.keys() == reference.keys()
    changed = [
        k
        for k in before
        if not (torch.equal(before[k], after[k]) and torch.equal(after[k], reference[k]))
    ]
    assert not changed, f"base tensors changed by training: {changed}"
    with delta_disabled(model):
        assert identical(tensor_outputs(model, batch), expected)
    assert not identical(tensor_outputs(model, batch), expected)


def test_upstream_checkpoints_load_into_patched_model_and_base_saves_as_upstream():
    name = "retinanet_r18_fpn"
    model, base = build_pair(name)
    apply_delta_patch(model, {})
    # an upstream checkpoint of the base: only the Δ keys are missing, nothing unexpected
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == set(delta_params(model))
    # the base part of a patched model is a plain upstream checkpoint
    fresh = build_pair(name)[1]
    fresh.load_state_dict(base_state_dict(model), strict=True)
    batch = make_batch(name)
    assert identical(tensor_outputs(fresh, batch), tensor_outputs(base, batch))


@pytest.mark.parametrize(
    "backbone",
    [
        dict(type="mmdet.ResNeXt", depth=50, groups=32, base_width=4),
        dict(type="mmdet.ResNetV1d", depth=18),
        dict(type="mmseg.ResNetV1c", depth=18),
        dict(type="mmdet.ResNet", depth=18, style="caffe", frozen_stages=2),
    ],
    ids=lambda cfg: f"{cfg['type']}-{cfg['depth']}",
)
def test_backbone_variants_exact_and_trainable(backbone):
    """Grouped (ResNeXt), deep-stem (V1c/V1d) and caffe-style ResNets: one mechanism."""
    from mmengine.registry import MODELS

    register_scopes()
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.backbone = MODELS.build(backbone)
    base = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 64, 64)
    summary = apply_delta_patch(model, {})
    if "ResNeXt" in backbone["type"]:
        assert {layer.form for layer in summary.layers} == {"conv"}
        grouped = [layer for layer in summary.layers if layer.rank == 1]
        assert grouped and all(layer.delta_params < layer.base_params for layer in summary.layers)
    model.eval()
    with torch.no_grad():
        expected = list(base.backbone(x))
        assert identical(list(model.backbone(x)), expected)
    model.train()
    deltas = delta_params(model)
    assert all(p.requires_grad for p in deltas.values())
    loss = sum(out.square().mean() for out in model.backbone(x))
    loss.backward()
    ups = [p for k, p in deltas.items() if k.endswith(".up")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ups)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in base_state_dict(model).items())
