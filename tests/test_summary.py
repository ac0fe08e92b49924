"""Placement and numbers of the default patch on real models."""

import torch
from mm_models import build_model

from mmdelta import apply_delta_patch


def test_faster_rcnn_default_placement_and_fractions():
    model = build_model("faster_rcnn_r50_fpn")
    total = sum(p.numel() for p in model.parameters())
    summary = apply_delta_patch(model, {})
    paths = [layer.path for layer in summary.layers]
    assert all(p.startswith(("backbone.", "neck.")) for p in paths)
    assert "backbone.conv1" in paths and "neck.fpn_convs.3.conv" in paths
    assert list(summary.stages()) == [
        "backbone.conv1",
        "backbone.layer1",
        "backbone.layer2",
        "backbone.layer3",
        "backbone.layer4",
        "neck.lateral_convs",
        "neck.fpn_convs",
    ]
    # ResNet-50: 53 convs (stem + 16 blocks x 3 + 4 downsample); FPN: 4 lateral + 4 output
    assert len(paths) == 53 + 8
    delta = sum(p.numel() for p in model.parameters()) - total
    assert summary.delta_params == delta
    assert summary.base_params == total
    targeted = sum(
        model.get_submodule(p).weight.numel()
        + (model.get_submodule(p).bias.numel() if model.get_submodule(p).bias is not None else 0)
        for p in paths
    )
    assert summary.targeted_params == targeted
    assert summary.delta_fraction == delta / targeted
    assert summary.patch_fraction == delta / total
    assert "Δ fraction" in summary.line() and "backbone.layer3" in str(summary)


def test_segmenter_default_patches_decode_head_but_not_classifier_or_auxiliary_head():
    model = build_model("upernet_r18")
    summary = apply_delta_patch(model, {})
    stages = list(summary.stages())
    assert {
        "decode_head.psp_modules",
        "decode_head.lateral_convs",
        "decode_head.fpn_convs",
        "decode_head.fpn_bottleneck",
        "decode_head.bottleneck",
    } <= set(stages)
    paths = [layer.path for layer in summary.layers]
    assert not any(p.endswith("conv_seg") or p.startswith("auxiliary_head") for p in paths)


def test_convnext_delta_names_work_with_layer_decay_optimizer():
    """mmseg's ConvNeXt layer-decay constructor reads stage/block ids from parameter names."""
    from mmseg.engine.optimizers import LearningRateDecayOptimizerConstructor

    model = build_model("upernet_convnext")
    summary = apply_delta_patch(model, {})
    forms = {layer.form for layer in summary.layers}
    assert forms == {"conv", "depthwise", "linear"}
    stages = list(summary.stages())
    assert stages[:8] == [
        f"backbone.{part}.{i}" for part in ("downsample_layers", "stages") for i in range(4)
    ]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.stages.2.1.pointwise_conv1.delta.default.up" in names

    constructor = LearningRateDecayOptimizerConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05)),
        dict(num_layers=6, decay_rate=0.9, decay_type="stage_wise"),
    )
    optimizer = constructor(model).optimizer
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert grouped == {id(p) for p in trainable}
    scales = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scales[id(p)] = group["lr_scale"]
    stage0 = model.backbone.stages[0][0].pointwise_conv1.delta.default.up
    stage3 = model.backbone.stages[3][0].pointwise_conv1.delta.default.up
    assert scales[id(stage0)] < scales[id(stage3)]  # decayed by depth, read from the name
    assert isinstance(optimizer, torch.optim.AdamW)
