# Δ-patch the COCO-trained RetinaNet R-50 FPN (mmdet model zoo) to PASCAL VOC 07+12.
#
# The model is the COCO model exactly as its checkpoint has it (80 classes, the model file
# `mmdet::retinanet/retinanet_r50_fpn_1x_coco.py` uses); the VOC class set is the patch's
# own. Backbone, FPN and the head's four-conv classification and regression towers stay
# frozen with low-rank Δ branches; the patch owns the final `retina_cls` (9 anchors x 20
# classes, rows started from the COCO rows) and the class-agnostic `retina_reg` (a copy of
# the base's). Data: mmdet's `_base_/datasets/voc0712.py` (VOC07+12 trainval x3 / VOC07
# test, 11-point mAP).
_base_ = [
    "mmdet::_base_/models/retinanet_r50_fpn.py",
    "mmdet::_base_/datasets/voc0712.py",
    "mmdet::_base_/default_runtime.py",
]

# retinanet_r50_fpn_1x_coco (box AP 36.5), from mmdet/.mim/configs/retinanet/metafile.yml
load_from = "https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_r50_fpn_1x_coco/retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth"

runner_type = "DeltaRunner"
custom_imports = dict(imports=["mmdelta"], allow_failed_imports=False)
# stops tools that ignore `runner_type` (mmseg's tools/test.py) from running an unpatched model
custom_hooks = [dict(type="DeltaPatchHook")]

# (the class lists stay compact)
# fmt: off
delta_patch = dict(
    name="voc",
    targets=["backbone", "neck", "bbox_head.cls_convs", "bbox_head.reg_convs"],
    branch=dict(type="LowRankDelta", rank=8),
    # mmdet VOCDataset.METAINFO order
    classes=(
        "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
        "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
        "sofa", "train", "tvmonitor",
    ),
    # mmdet CocoDataset.METAINFO order (the checkpoint's label order)
    base_classes=(
        "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
        "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
        "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
        "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
        "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
        "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife",
        "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
        "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
        "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
        "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
        "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
    ),
    # the VOC names that differ from their COCO counterparts (the other 14 are equal)
    class_map=dict(
        aeroplane="airplane",
        diningtable="dining table",
        motorbike="motorcycle",
        pottedplant="potted plant",
        sofa="couch",
        tvmonitor="tv",
    ),
)
# fmt: on

# Schedule: mmdet's VOC 07+12 schedule (retinanet_r50_fpn_1x_voc0712): training set
# repeated 3 times, 4 epochs, lr x0.1 after epoch 3 -- shared with the fine-tuning twin.
max_epochs = 4
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
param_scheduler = [
    dict(type="MultiStepLR", begin=0, end=max_epochs, by_epoch=True, milestones=[3], gamma=0.1)
]
# Δ optimiser: SGD at the COCO base's own rate, which for RetinaNet is 0.01 (16 images per
# iteration; the focal-loss head is less tolerant of high rates than Faster R-CNN's, and
# the VOC schedule has no warm-up), the same rate as the twin.
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=0.0001),
)
# batch 16 = 8 GPUs x 2 images
auto_scale_lr = dict(enable=False, base_batch_size=16)
