_base_ = "mmseg::upernet/upernet_r18_4xb2-40k_cityscapes-512x1024.py"
norm_cfg = dict(type="BN", requires_grad=True)
model = dict(
    data_preprocessor=dict(size=(64, 64)),
    pretrained=None,
    backbone=dict(norm_cfg=norm_cfg, init_cfg=None),
    decode_head=dict(norm_cfg=norm_cfg, channels=32),
    auxiliary_head=dict(norm_cfg=norm_cfg, channels=16),
)
