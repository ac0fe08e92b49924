# Faster R-CNN R-50 FPN as shipped (stock neck and heads), offline: no pretrained init.
_base_ = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
model = dict(backbone=dict(init_cfg=None))
