# Δ-patch the COCO-trained Faster R-CNN R-50 FPN (mmdet model zoo) to PASCAL VOC 07+12.
#
# The model below is the COCO model exactly as its checkpoint has it (80 classes, the same
# model file `mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py` uses); the VOC class set
# is the patch's own (`delta_patch.classes`). Backbone, FPN, the RPN's 3x3 conv and the RoI
# head's shared FCs stay frozen and get low-rank Δ branches; the patch owns a 20-class
# `fc_cls` / `fc_reg`, whose rows start from the COCO rows of the same (or mapped) class.
# Data: train on VOC2007 trainval + VOC2012 trainval (x3 repeat), test on VOC2007 test,
# 11-point mAP -- mmdet's `_base_/datasets/voc0712.py`, as its VOC configs use it.
_base_ = [
    "mmdet::_base_/models/faster-rcnn_r50_fpn.py",
    "mmdet::_base_/datasets/voc0712.py",
    "mmdet::_base_/default_runtime.py",
]

# faster-rcnn_r50_fpn_1x_coco (box AP 37.4), from mmdet/.mim/configs/faster_rcnn/metafile.yml
load_from = "https://download.openmmlab.com/mmdetection/v2.0/faster_rcnn/faster_rcnn_r50_fpn_1x_coco/faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth"

runner_type = "DeltaRunner"
custom_imports = dict(imports=["mmdelta"], allow_failed_imports=False)
# stops tools that ignore `runner_type` (mmseg's tools/test.py) from running an unpatched model
custom_hooks = [dict(type="DeltaPatchHook")]

# (the class lists stay compact)
# fmt: off
delta_patch = dict(
    name="voc",
    targets=["backbone", "neck", "rpn_head.rpn_conv", "roi_head.bbox_head.shared_fcs"],
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

# Schedule: mmdet's VOC 07+12 schedule (faster-rcnn_r50_fpn_1x_voc0712): the training set
# is repeated 3 times, 4 epochs (= 12 passes), lr x0.1 after epoch 3 -- shared with the full
# fine-tuning twin (finetune_faster_rcnn_voc.py) so the two are compared like for like.
max_epochs = 4
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
param_scheduler = [
    dict(type="MultiStepLR", begin=0, end=max_epochs, by_epoch=True, milestones=[3], gamma=0.1)
]
# Δ optimiser: SGD at the COCO base's own rate (0.02 for 16 images/iteration) rather than
# the fine-tuning twin's 0.01. The trainable set is small (~0.9 M of 41.8 M parameters) and
# starts at zero (Δ up-projections) or at the COCO rows (the owned class head), and the
# frozen base cannot drift, so the rate the head was trained with is safe; it moves the
# zero-initialised branches off zero faster than fine-tuning's reduced rate.
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="SGD", lr=0.02, momentum=0.9, weight_decay=0.0001),
)
# batch 16 = 8 GPUs x 2 images
auto_scale_lr = dict(enable=False, base_batch_size=16)
