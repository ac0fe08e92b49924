# mmpretrain's ConvNeXt image classifier, shrunk. As mmpretrain's runner does, the
# top-level data_preprocessor goes into the model (with the test's 10 classes). Layer scale
# starts at 1.0 (as in mmseg's ConvNeXt configs): with the classifier's 1e-6 a randomly
# initialised block is nearly switched off, unlike any trained base model, and its Δ
# updates vanish below float32 resolution within a few test steps.
_base_ = "mmpretrain::convnext/convnext-tiny_32xb128_in1k.py"
model = dict(
    data_preprocessor=dict(
        num_classes=10, mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True
    ),
    backbone=dict(
        arch=dict(_delete_=True, depths=[1, 1, 2, 1], channels=[16, 32, 64, 128]),
        layer_scale_init_value=1.0,
    ),
    head=dict(in_channels=128, num_classes=10),
)
