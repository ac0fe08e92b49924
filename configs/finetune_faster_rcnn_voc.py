# Full fine-tuning twin of delta_faster_rcnn_voc.py: mmdet's own VOC 07+12 Faster R-CNN
# config (20-class bbox head, same data and schedule: x3 repeat, 4 epochs, step at 3,
# SGD lr 0.01), started from the same COCO checkpoint. Plain upstream behaviour: every
# parameter trains; fc_cls / fc_reg do not match the 80-class checkpoint and start fresh
# (mmengine loads with strict=False and warns about the size mismatch).
_base_ = "mmdet::pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py"

# faster-rcnn_r50_fpn_1x_coco (box AP 37.4), from mmdet/.mim/configs/faster_rcnn/metafile.yml
load_from = "https://download.openmmlab.com/mmdetection/v2.0/faster_rcnn/faster_rcnn_r50_fpn_1x_coco/faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth"

# load_from replaces every backbone weight: no ImageNet download first (upstream's VOC config
# would fetch torchvision://resnet50 only to overwrite it, and fails offline)
model = dict(backbone=dict(init_cfg=None))
