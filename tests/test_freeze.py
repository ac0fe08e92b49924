"""Freezing survives OpenMMLab's own train() overrides; each guard has a negative control."""

import copy

import torch
from mm_models import build_model, make_batch, tensor_outputs

from mmdelta import apply_delta_patch, delta_disabled
from mmdelta.exactness import identical
from mmdelta.patching.slot import iter_slots


def branch_params(model, prefix):
    return [
        p for path, slot in iter_slots(model) if path.startswith(prefix) for p in slot.parameters()
    ]


def test_resnet_freeze_stages_does_not_refreeze_delta():
    model = build_model("faster_rcnn_r50_fpn")  # frozen_stages=1, norm_eval=True
    apply_delta_patch(model, {})
    stem_and_layer1 = branch_params(model, "backbone.conv1") + branch_params(
        model, "backbone.layer1"
    )
    assert stem_and_layer1

    # negative control: the class's own train() (mmdet ResNet._freeze_stages) freezes them
    type(model).train(model, True)
    assert not any(p.requires_grad for p in stem_and_layer1)

    model.train()
    assert all(p.requires_grad for p in stem_and_layer1)
    assert not any(
        p.requires_grad
        for p in model.backbone.layer1.parameters()
        if id(p) not in {id(q) for q in stem_and_layer1}
    )
    model.eval()
    assert all(p.requires_grad for p in stem_and_layer1)


def test_batchnorm_statistics_frozen_despite_norm_eval_false():
    name = "deeplabv3_r18_v1c"  # mmseg ResNetV1c: norm_eval=False
    batch = make_batch(name)

    # negative control: a frozen-by-requires_grad base still drifts in train mode
    control = build_model(name)
    control.requires_grad_(False)
    control.train()
    before = copy.deepcopy(control.state_dict())
    with torch.no_grad():
        control(**control.data_preprocessor(batch, True), mode="loss")
    assert not torch.equal(
        before["backbone.stem.1.running_mean"], control.state_dict()["backbone.stem.1.running_mean"]
    )

    model = build_model(name)
    apply_delta_patch(model, {})
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    assert model.backbone.layer1.training  # everything else follows train()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model(**model.data_preprocessor(batch, True), mode="loss")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_init_weights_never_reaches_delta():
    """FPN's init_cfg Xavier(layer='Conv2d') re-initialises every nn.Conv2d below it; the
    bbox head's init_cfg overrides by name ('fc_cls', 'fc_reg') re-initialise the whole
    named module, children included."""
    model = build_model("faster_rcnn_r50_fpn")
    apply_delta_patch(model, dict(classes=[f"c{i}" for i in range(80)]))
    lateral = model.neck.lateral_convs[0].conv
    before = lateral.weight.detach().clone()
    head = model.roi_head.bbox_head
    owned = {k: v.clone() for k, v in head.fc_cls.delta.state_dict().items()}
    base_cls = head.fc_cls.weight.detach().clone()
    model.neck.init_weights()
    head.init_weights()
    assert not torch.equal(before, lateral.weight)  # the initialisers really ran
    assert not torch.equal(base_cls, head.fc_cls.weight)
    for _, slot in iter_slots(model.neck):
        for branch in slot.values():
            assert not branch.up.any()
    assert all(torch.equal(v, head.fc_cls.delta.state_dict()[k]) for k, v in owned.items())


def test_deepcopy_keeps_each_dispatcher_on_its_own_layer():
    name = "retinanet_r18_fpn"
    model = build_model(name)
    batch = make_batch(name)
    base_out = tensor_outputs(model, batch)
    apply_delta_patch(model, {})
    clone = copy.deepcopy(model)
    for _, slot in iter_slots(clone):
        for branch in slot.values():
            torch.nn.init.normal_(branch.up, std=0.1)
    assert identical(tensor_outputs(model, batch), base_out)  # original untouched
    assert not identical(tensor_outputs(clone, batch), base_out)
    with delta_disabled(clone):
        assert identical(tensor_outputs(clone, batch), base_out)
    clone.train()
    assert all(p.requires_grad for _, s in iter_slots(clone) for p in s.parameters())
