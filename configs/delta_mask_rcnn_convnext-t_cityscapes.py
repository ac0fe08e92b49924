# Δ-patch the COCO-trained Mask R-CNN ConvNeXt-T (mmdet model zoo,
# `mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py`) to Cityscapes
# instance segmentation (8 classes).
#
# Data, evaluation and schedule are mmdet's `cityscapes/mask-rcnn_r50_fpn_1x_cityscapes.py`
# (inherited); its R-50 backbone is replaced by the zoo model's ConvNeXt-T exactly as the
# COCO config builds it, and the heads keep the checkpoint's 80 COCO classes: the
# Cityscapes class set is the patch's own (`delta_patch.classes`). Backbone, FPN, the RPN's
# 3x3 conv, the box head's shared FCs and the mask head's four convs stay frozen with
# low-rank Δ branches; the patch owns 8-class `fc_cls` / `fc_reg` / `conv_logits`.
_base_ = "mmdet::cityscapes/mask-rcnn_r50_fpn_1x_cityscapes.py"

# mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco (box AP 46.2, mask AP 41.7), from
# mmdet/.mim/configs/convnext/metafile.yml
load_from = "https://download.openmmlab.com/mmdetection/v2.0/convnext/mask_rcnn_convnext-t_p4_w7_fpn_fp16_ms-crop_3x_coco/mask_rcnn_convnext-t_p4_w7_fpn_fp16_ms-crop_3x_coco_20220426_154953-050731f4.pth"

runner_type = "DeltaRunner"
custom_imports = dict(imports=["mmdelta", "mmpretrain.models"], allow_failed_imports=False)
# stops tools that ignore `runner_type` (mmseg's tools/test.py) from running an unpatched model
custom_hooks = [dict(type="DeltaPatchHook")]

# the zoo model's ConvNeXt-T, without its ImageNet init: every backbone weight comes from
# the COCO checkpoint (load_from), as in mmdet's Cityscapes config (`init_cfg=None`)
model = dict(
    backbone=dict(
        _delete_=True,
        type="mmpretrain.ConvNeXt",
        arch="tiny",
        out_indices=[0, 1, 2, 3],
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,
        gap_before_final_norm=False,
        init_cfg=None,
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
    roi_head=dict(bbox_head=dict(num_classes=80), mask_head=dict(num_classes=80)),
)

# (the class lists stay compact)
# fmt: off
delta_patch = dict(
    name="cityscapes",
    targets=[
        "backbone",
        "neck",
        "rpn_head.rpn_conv",
        "roi_head.bbox_head.shared_fcs",
        "roi_head.mask_head.convs",
    ],
    branch=dict(type="LowRankDelta", rank=8),
    # mmdet CityscapesDataset.METAINFO order
    classes=("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"),
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
    # 7 of the 8 names are COCO names; a rider starts from COCO's person rows
    class_map=dict(rider="person"),
)
# fmt: on

# Schedule (inherited, shared with the fine-tuning twin): mmdet's Cityscapes schedule --
# the training set repeated 8 times, 8 epochs (= 64 passes), 500-iteration linear warm-up,
# lr x0.1 after epoch 7, 8 images per iteration (8 GPUs x 1).
# Optimiser: the ConvNeXt zoo's (AMP, AdamW lr 1e-4, wd 0.05, layer-wise lr decay 0.95),
# the same as the twin's: AdamW's step size does not scale with the number of trainable
# parameters, and its weight decay pulls the Δ branches towards zero, i.e. towards the
# base. The runner falls back to fp32 where there is no GPU.
optim_wrapper = dict(
    type="AmpOptimWrapper",
    constructor="LearningRateDecayOptimizerConstructor",
    paramwise_cfg={"decay_rate": 0.95, "decay_type": "layer_wise", "num_layers": 6},
    optimizer=dict(_delete_=True, type="AdamW", lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
)
