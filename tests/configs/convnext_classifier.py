# mmpretrain's ConvNeXt image classifier, shrunk.
_base_ = "mmpretrain::convnext/convnext-tiny_32xb128_in1k.py"
model = dict(
    backbone=dict(arch=dict(depths=[1, 1, 2, 1], channels=[16, 32, 64, 128])),
    head=dict(in_channels=128, num_classes=10),
)
