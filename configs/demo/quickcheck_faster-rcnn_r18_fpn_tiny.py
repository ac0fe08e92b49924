# A small Faster R-CNN (ResNet-18, 64-channel FPN, light RPN/RoI settings) for the quick
# self-check (tools/quickcheck.py): an ordinary mmdet config plus the `delta_patch` key (and
# the runner settings every patched config carries, at the end).
_base_ = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"

classes = ("square", "disc", "bar")
model = dict(
    backbone=dict(depth=18, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=128, num_classes=len(classes)),
    ),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=128)),
    ),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100)),
)

# The Δ patch: rank-8 low-rank branches on the backbone and the neck (the default targets).
delta_patch = dict(name="shapes", branch=dict(type="LowRankDelta", rank=8))

# What any tool needs to run this config as a patch: mmdet's own tools/train.py builds
# `runner_type` (and would otherwise train every base weight of an unpatched model); the
# hook stops tools that ignore runner_type.
runner_type = "DeltaRunner"
custom_imports = dict(imports=["mmdelta"], allow_failed_imports=False)
custom_hooks = [dict(type="DeltaPatchHook")]
