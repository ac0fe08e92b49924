"""The side Δ-network (``delta_patch.side`` / ``preset='fast'``) on real mmdet / mmseg /
mmpretrain models: exact when off (and at init), only the patch trains, no gradient crosses
the frozen backbone, patch files round-trip, merging is refused."""

import copy
import re

import pytest
import torch
from mm_models import build_pair, make_batch, tensor_outputs
from mmengine.optim import OptimWrapper

from mmdelta import (
    DeltaPatchConfigError,
    SideDelta,
    apply_delta_patch,
    base_state_dict,
    delta_disabled,
    get_delta_patch_cfg,
    load_patch,
    merge_patch,
    save_patch,
)
from mmdelta.exactness import identical
from mmdelta.patching.slot import iter_slots

#: a detector, a segmenter with a deep-stem ResNet, a ConvNeXt segmenter
MODELS = ["faster_rcnn_r50_fpn", "deeplabv3_r18_v1c", "upernet_convnext"]


def patch_params(model):
    return {
        f"{path}.delta.{name}.{pname}": p
        for path, slot in iter_slots(model)
        for name, branch in slot.items()
        for pname, p in branch.named_parameters()
    }


def side_of(model) -> SideDelta:
    return next(b for _, s in iter_slots(model) for b in s.values() if isinstance(b, SideDelta))


def randomise_side_(model, std=0.05):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in side_of(model).parameters():
            p.add_(torch.randn_like(p) * std)


@pytest.mark.parametrize("name", MODELS)
def test_fast_preset_is_exact_until_trained_and_exact_when_off(name):
    model, base = build_pair(name)
    batch = make_batch(name)
    expected = tensor_outputs(base, batch)
    summary = apply_delta_patch(model, dict(preset="fast"))
    cfg = get_delta_patch_cfg(model)
    assert cfg["side"]["at"] == "backbone" and "backbone" not in cfg["targets"]
    assert cfg["task_norm"] is None
    assert any(layer.form == "side" for layer in summary.layers)
    assert identical(tensor_outputs(model, batch), expected)  # zero-initialised `up`

    randomise_side_(model)
    patched = tensor_outputs(model, batch)
    assert not identical(patched, expected)
    with delta_disabled(model):
        assert identical(tensor_outputs(model, batch), expected)
    assert identical(tensor_outputs(model, batch), patched)
    copied = copy.deepcopy(model)
    assert identical(tensor_outputs(copied, batch), patched)


@pytest.mark.parametrize("name", MODELS)
def test_fast_preset_trains_only_the_patch_and_no_gradient_crosses_the_backbone(name):
    model, base = build_pair(name)
    batch = make_batch(name)
    expected = tensor_outputs(base, batch)
    apply_delta_patch(model, dict(preset="fast"))
    before = {k: v.clone() for k, v in base_state_dict(model).items()}
    params = patch_params(model)
    initial = {k: p.detach().clone() for k, p in params.items()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {
        id(p) for p in params.values()
    }
    # what the backbone's own layers produce while training: never part of the graph
    backbone_grad = []
    first = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_hook(lambda m, i, o: backbone_grad.append(o.requires_grad))

    got_grad = dict.fromkeys(params, False)
    for key, p in params.items():
        p.register_hook(
            lambda g, key=key: got_grad.__setitem__(key, got_grad[key] or bool(g.abs().sum() > 0))
        )
    optim = OptimWrapper(torch.optim.SGD(list(params.values()), lr=0.01, momentum=0.9))
    model.train()
    for step in range(3):
        losses = model.train_step(make_batch(name, seed=step), optim)
        assert all(torch.isfinite(v).all() for v in losses.values())

    assert backbone_grad and not any(backbone_grad)
    # every tensor gets a gradient, but the output projections of levels no head reads
    # (DeepLabV3's heads read only the last two backbone outputs)
    no_grad = {k for k, v in got_grad.items() if not v}
    assert all(re.search(r"\.up(_bias)?\.\d+$", k) for k in no_grad), no_grad
    assert any(re.search(r"\.up\.\d+$", k) for k in set(params) - no_grad)
    unchanged = {
        k for k, p in params.items() if not k.endswith(".down") and torch.equal(p, initial[k])
    }
    assert unchanged <= no_grad, unchanged - no_grad
    after = base_state_dict(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"base tensors changed by training: {changed}"
    model.eval()
    with delta_disabled(model):
        assert identical(tensor_outputs(model, batch), expected)
    assert not identical(tensor_outputs(model, batch), expected)


def test_side_network_beside_per_layer_branches_lets_their_gradient_through():
    """With trainable Δ inside the backbone (same patch) the backbone keeps its graph."""
    name = "deeplabv3_r18_v1c"
    model, _ = build_pair(name)
    apply_delta_patch(model, dict(side=dict(width=16), targets=["backbone.layer4"]))
    inner = [p for path, s in iter_slots(model) if path != "backbone" for p in s.parameters()]
    assert inner
    seen = []
    for p in inner:
        p.register_hook(lambda g: seen.append(bool(g.abs().sum() > 0)))
    model.train()
    optim = OptimWrapper(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.1))
    for step in range(2):
        model.train_step(make_batch(name, seed=step), optim)
    assert len(seen) == 2 * len(inner) and any(seen)


def test_fast_patch_file_round_trip_and_merge_refused(tmp_path):
    name = "deeplabv3_r18_v1c"
    model, fresh = build_pair(name)
    batch = make_batch(name)
    apply_delta_patch(model, dict(name="fast", preset="fast", side=dict(width=32)))
    randomise_side_(model)
    patched = tensor_outputs(model, batch)
    file = save_patch(model, tmp_path / "fast.safetensors")
    assert load_patch(fresh, file) == "fast"
    assert get_delta_patch_cfg(fresh) == get_delta_patch_cfg(model)
    assert side_of(fresh).width == 32
    assert identical(tensor_outputs(fresh, batch), patched)
    # loading the same file again onto the model that carries it replaces its tensors
    assert load_patch(fresh, file) == "fast"
    assert identical(tensor_outputs(fresh, batch), patched)
    with pytest.raises(ValueError, match="SideDelta on backbone"):
        merge_patch(model)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(preset="quick"), "delta_patch.preset must be one of"),
        (dict(side=dict(at="bakbone")), "side.at 'bakbone' is not a module"),
        (dict(side=dict(width=0)), "`width` must be a positive integer"),
        (dict(side=dict(width=12, groups=8)), "must divide `width`"),
        (dict(side=dict(depth=2)), r"delta_patch.side has unknown option\(s\) \['depth'\]"),
        (dict(side="backbone"), "delta_patch.side must be a dict"),
        (dict(side=dict(at="data_preprocessor")), "SideDelta: cannot tell the input channels"),
        (dict(side=dict(at="decode_head")), "maps the image to feature maps"),
        (
            dict(side=dict(at="backbone.layer1.0.conv1"), targets=["backbone.layer1.0.conv1"]),
            "already has a branch or an owned copy",
        ),
    ],
)
def test_side_config_errors_name_the_key(cfg, message):
    model, _ = build_pair("deeplabv3_r18_v1c")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DeltaPatchConfigError, match=message):
        apply_delta_patch(model, cfg)
    assert not list(iter_slots(model))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_preset_keys_set_beside_it_win():
    model, _ = build_pair("faster_rcnn_r50_fpn")
    apply_delta_patch(
        model, dict(preset="fast", targets=["neck"], branch=dict(rank=4), side=dict(width=32))
    )
    cfg = get_delta_patch_cfg(model)
    assert cfg["targets"] == ["neck"] and cfg["branch"]["rank"] == 4
    assert cfg["side"] == dict(type="SideDelta", at="backbone", width=32, image=True, groups=8)
    model2, _ = build_pair("faster_rcnn_r50_fpn")
    apply_delta_patch(model2, dict(preset="fast"))
    assert get_delta_patch_cfg(model2)["targets"] == ["neck", "rpn_head", "roi_head"]
    model3, _ = build_pair("faster_rcnn_r50_fpn")
    apply_delta_patch(model3, dict(preset="accurate"))
    assert get_delta_patch_cfg(model3)["side"] is None
