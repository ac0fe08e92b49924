_base_ = "mmdet::retinanet/retinanet_r18_fpn_1x_coco.py"
model = dict(
    backbone=dict(init_cfg=None),
    neck=dict(out_channels=64),
    bbox_head=dict(in_channels=64, feat_channels=64),
)
