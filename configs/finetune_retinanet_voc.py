# Full fine-tuning twin of delta_retinanet_voc.py: mmdet's own VOC 07+12 RetinaNet config
# (20-class head, same data and schedule: x3 repeat, 4 epochs, step at 3, SGD lr 0.01),
# started from the same COCO checkpoint. Plain upstream behaviour: every parameter trains;
# `retina_cls` does not match the 80-class checkpoint and starts fresh.
_base_ = "mmdet::pascal_voc/retinanet_r50_fpn_1x_voc0712.py"

# retinanet_r50_fpn_1x_coco (box AP 36.5), from mmdet/.mim/configs/retinanet/metafile.yml
load_from = "https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_r50_fpn_1x_coco/retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth"

# load_from replaces every backbone weight: no ImageNet download first (upstream's VOC config
# would fetch torchvision://resnet50 only to overwrite it, and fails offline)
model = dict(backbone=dict(init_cfg=None))
