# UPerNet on mmpretrain's ConvNeXt (depthwise 7x7 convs, Linear pointwise layers), shrunk.
_base_ = "mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py"
channels = [16, 32, 64, 128]
norm_cfg = dict(type="BN", requires_grad=True)
model = dict(
    data_preprocessor=dict(size=(64, 64)),
    # no stochastic depth (0.4 upstream): a block dropped for the whole batch in a training
    # step gets no gradient into its Δ, so gradient checks would depend on the random draws
    backbone=dict(
        arch=dict(_delete_=True, depths=[1, 1, 2, 1], channels=channels),
        drop_path_rate=0.0,
        init_cfg=None,
    ),
    decode_head=dict(in_channels=channels, channels=32, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=channels[2], channels=16, norm_cfg=norm_cfg),
)
