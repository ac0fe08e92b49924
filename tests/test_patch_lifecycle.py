"""Named patches on one base: switching, patch-owned heads with their own class set, removal."""

import copy

import pytest
import torch
from mm_models import build_pair, make_batch, tensor_outputs

from mmdelta import (
    DeltaPatchConfigError,
    active_patch,
    apply_delta_patch,
    base_state_dict,
    delta_disabled,
    patch_classes,
    patch_names,
    remove_patch,
    set_active_patch,
)
from mmdelta.exactness import flat_tensors, identical

COCO = [f"coco{i}" for i in range(80)]
#: 20 new classes: 12 share a name with a base class, 'plane' maps onto 'coco4' by class_map
NEW = [f"coco{i}" for i in range(0, 24, 2)] + ["plane"] + [f"new{i}" for i in range(7)]


def randomise(model, name, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f".delta.{name}." in key:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)


def same(a, b):
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=False)
    )


@pytest.fixture(scope="module")
def faster_rcnn():
    model, base = build_pair("faster_rcnn_r50_fpn")
    batch = make_batch("faster_rcnn_r50_fpn")
    return model, base, batch, tensor_outputs(base, batch)


def test_two_patches_switch_and_none_is_the_base(faster_rcnn):
    model, _, batch, base_out = faster_rcnn
    model = copy.deepcopy(model)
    apply_delta_patch(model, dict(name="a"))
    randomise(model, "a", seed=1)
    out_a = tensor_outputs(model, batch)
    apply_delta_patch(model, dict(name="b", targets=["backbone.layer4", "neck"], task_norm=True))
    randomise(model, "b", seed=2)
    out_b = tensor_outputs(model, batch)
    assert patch_names(model) == ["a", "b"] and active_patch(model) == "b"
    assert not same(out_a, base_out) and not same(out_b, base_out) and not same(out_a, out_b)
    for name, expected in [("a", out_a), (None, base_out), ("b", out_b), ("a", out_a)]:
        set_active_patch(model, name)
        assert same(tensor_outputs(model, batch), expected), name
    with delta_disabled(model):
        assert active_patch(model) is None
        assert same(tensor_outputs(model, batch), base_out)
    assert active_patch(model) == "a"
    # only the active patch trains
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".delta.a." in k for k in trainable)
    with pytest.raises(KeyError, match="carries no patch 'c'"):
        set_active_patch(model, "c")


def test_only_the_active_patch_computes(faster_rcnn):
    model = copy.deepcopy(faster_rcnn[0])
    apply_delta_patch(model, dict(name="a"))
    apply_delta_patch(model, dict(name="b"))
    calls = []
    for _, slot in model.named_modules():
        if type(slot).__name__ == "DeltaSlot":
            slot["a"].register_forward_hook(lambda *_: calls.append("a"))
            slot["b"].register_forward_hook(lambda *_: calls.append("b"))
    model.train()
    batch = make_batch("faster_rcnn_r50_fpn")
    data = model.data_preprocessor(batch, True)
    model.backbone(data["inputs"])
    assert calls and set(calls) == {"b"}


def test_own_20_class_head_on_an_80_class_base(faster_rcnn):
    model, _, batch, base_out = faster_rcnn
    model = copy.deepcopy(model)
    summary = apply_delta_patch(
        model,
        dict(name="voc", classes=NEW, base_classes=COCO, class_map={"plane": "coco4"}),
    )
    head = model.roi_head.bbox_head
    assert [layer.path for layer in summary.owned] == [
        "roi_head.bbox_head.fc_cls",
        "roi_head.bbox_head.fc_reg",
    ]
    assert summary.classes == NEW and patch_classes(model) == NEW
    assert head.num_classes == 20
    out = tensor_outputs(model, batch)
    cls_score, bbox_pred = out[-2], out[-1]
    assert cls_score.shape[1] == 21 and bbox_pred.shape[1] == 4 * 20

    # rows of the matching base classes (and the background) start from the base's
    owned_cls = head.fc_cls.delta["voc"].own_weight
    owned_reg = head.fc_reg.delta["voc"].own_weight
    for new_index, name in enumerate(NEW):
        source = (
            COCO.index({"plane": "coco4"}.get(name, name)) if not name.startswith("new") else None
        )
        if source is None:
            assert not torch.equal(owned_cls[new_index], head.fc_cls.weight[0])
            continue
        assert torch.equal(owned_cls[new_index], head.fc_cls.weight[source])
        rows = slice(4 * new_index, 4 * new_index + 4)
        assert torch.equal(owned_reg[rows], head.fc_reg.weight[4 * source : 4 * source + 4])
    assert torch.equal(owned_cls[20], head.fc_cls.weight[80])  # background
    # the base's own head is untouched and serves when the patch is off
    assert head.fc_cls.weight.shape[0] == 81

    with delta_disabled(model):
        assert head.num_classes == 80 and patch_classes(model) is None
        assert same(tensor_outputs(model, batch), base_out)
    set_active_patch(model, None)
    assert same(tensor_outputs(model, batch), base_out)
    assert head.num_classes == 80
    set_active_patch(model, "voc")
    assert same(tensor_outputs(model, batch), out) and head.num_classes == 20


def test_training_a_20_class_patch_keeps_the_base(faster_rcnn):
    """The loss runs with the patch's class count; only the patch moves."""
    from mmdet.testing import demo_mm_inputs

    model = copy.deepcopy(faster_rcnn[0])
    apply_delta_patch(model, dict(name="voc", classes=NEW, base_classes=COCO))
    base_before = {k: v.clone() for k, v in base_state_dict(model).items()}
    patch_before = {k: v.clone() for k, v in model.state_dict().items() if ".delta." in k}
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.SGD(params, lr=0.01)
    torch.manual_seed(0)
    batch = demo_mm_inputs(2, [(3, 96, 96)] * 2, num_items=[3, 2], num_classes=20)
    model.train()
    for _ in range(2):
        losses = model(**model.data_preprocessor(batch, True), mode="loss")
        loss = sum(
            v.sum() if torch.is_tensor(v) else sum(v) for k, v in losses.items() if "loss" in k
        )
        optim.zero_grad()
        loss.backward()
        optim.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    assert any(not torch.equal(after[k], v) for k, v in patch_before.items() if "fc_cls" in k)


def test_class_change_errors(faster_rcnn):
    model = copy.deepcopy(faster_rcnn[0])
    keys = set(model.state_dict())
    with pytest.raises(DeltaPatchConfigError, match="base_classes has 79 names"):
        apply_delta_patch(model, dict(classes=NEW, base_classes=COCO[:79]))
    with pytest.raises(DeltaPatchConfigError, match="must own them"):
        apply_delta_patch(
            model,
            dict(classes=NEW, base_classes=COCO, trainable=["roi_head.bbox_head.fc_cls"]),
        )
    assert set(model.state_dict()) == keys and not patch_names(model)


def test_retinanet_anchor_major_class_layout():
    model, base = build_pair("retinanet_r18_fpn")
    new = ["coco5", "x", "coco1"]
    apply_delta_patch(model, dict(classes=new, base_classes=COCO))
    head = model.bbox_head
    owned = head.retina_cls.delta["default"]
    anchors = head.num_base_priors
    assert owned.own_weight.shape[0] == anchors * 3 and head.cls_out_channels == 3
    for a in range(anchors):
        assert torch.equal(owned.own_weight[a * 3 + 0], head.retina_cls.weight[a * 80 + 5])
        assert torch.equal(owned.own_weight[a * 3 + 2], head.retina_cls.weight[a * 80 + 1])
        assert torch.equal(owned.own_bias[a * 3 + 1], head.retina_cls.bias.mean())
    # the class-agnostic regressor is owned with its base shape
    assert torch.equal(head.retina_reg.delta["default"].own_weight, head.retina_reg.weight)
    batch = make_batch("retinanet_r18_fpn")
    with delta_disabled(model):
        assert same(tensor_outputs(model, batch), tensor_outputs(base, batch))


def test_segmenter_class_change_switches_decode_and_auxiliary_heads():
    model, base = build_pair("deeplabv3_r18_v1c")
    k = model.decode_head.num_classes
    meta = dict(classes=tuple(f"b{i}" for i in range(k)), palette=[[i, i, i] for i in range(k)])
    model.dataset_meta = meta
    apply_delta_patch(model, dict(classes=["a", "b", "c"]))
    assert model.decode_head.num_classes == 3 and model.decode_head.out_channels == 3
    # the segmentor copies its head's counts (slide inference reads them)
    assert model.num_classes == 3 and model.out_channels == 3
    assert model.dataset_meta["classes"] == ("a", "b", "c") and "palette" not in model.dataset_meta
    heads = [n for n in ("decode_head", "auxiliary_head") if hasattr(model, n)]
    for name in heads:
        assert getattr(model, name).conv_seg.delta["default"].own_weight.shape[0] == 3
    batch = make_batch("deeplabv3_r18_v1c")
    assert tensor_outputs(model, batch)[0].shape[1] == 3
    with delta_disabled(model):
        assert model.decode_head.num_classes == k and model.num_classes == k
        assert model.dataset_meta is meta
        assert same(tensor_outputs(model, batch), tensor_outputs(base, batch))


def test_weight_space_inference_equals_the_branch_form(faster_rcnn):
    """In eval + no_grad a LowRankDelta layer runs W + ΔW in the layer's own kernel; with
    grad enabled it runs W x + Δ(x). The two agree up to float rounding on every continuous
    output: the neck's features, the RPN's maps and the RoI head's scores and box deltas on
    one fixed set of proposals. (mode='tensor' would pick the proposals again in each form
    by top-k and NMS, where a rounding-level difference can swap near-tied boxes and change
    the RoI outputs wholesale; that made this test fail on some CPUs and thread counts.)"""
    model, _, batch, _ = faster_rcnn
    model = copy.deepcopy(model)
    apply_delta_patch(model, dict(name="a"))
    randomise(model, "a", seed=4)
    model.eval()
    data = model.data_preprocessor(batch, False)
    samples = data["data_samples"]
    with torch.no_grad():
        feats = model.extract_feat(data["inputs"])
        proposals = model.rpn_head.predict(feats, samples, rescale=False)

    def continuous_outputs() -> list[torch.Tensor]:
        x = model.extract_feat(data["inputs"])
        out = (x, model.rpn_head(x), model.roi_head.forward(x, proposals, samples))
        return [t.detach() for t in flat_tensors(out)]

    with torch.no_grad():
        fast = continuous_outputs()  # W + ΔW in the layer's own kernel
    with torch.enable_grad():
        slow = continuous_outputs()  # W x + Δ(x)
    assert len(fast) == len(slow) == 5 + 2 * 5 + 2
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    assert not identical(fast, slow), "both runs took the same form: nothing was compared"


def test_remove_patch_gives_back_the_plain_model(faster_rcnn):
    model, _, batch, base_out = faster_rcnn
    model = copy.deepcopy(model)
    keys = list(model.state_dict())
    apply_delta_patch(model, dict(name="a", task_norm=True))
    apply_delta_patch(model, dict(name="b", classes=NEW, base_classes=COCO))
    remove_patch(model, "b")
    assert model.roi_head.bbox_head.num_classes == 80 and patch_names(model) == ["a"]
    remove_patch(model, "a")
    assert list(model.state_dict()) == keys and not patch_names(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert "train" not in model.__dict__
    assert same(tensor_outputs(model, batch), base_out)
