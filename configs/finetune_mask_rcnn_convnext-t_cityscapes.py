# Full fine-tuning twin of delta_mask_rcnn_convnext-t_cityscapes.py: mmdet's Cityscapes
# Mask R-CNN config with the zoo's ConvNeXt-T backbone, 8-class heads, the same data,
# schedule and optimiser, started from the same COCO checkpoint. Plain upstream behaviour:
# every parameter trains; the class layers do not match the 80-class checkpoint and start
# fresh (mmengine loads with strict=False and warns about the size mismatch).
_base_ = "mmdet::cityscapes/mask-rcnn_r50_fpn_1x_cityscapes.py"

# mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco (box AP 46.2, mask AP 41.7), from
# mmdet/.mim/configs/convnext/metafile.yml
load_from = "https://download.openmmlab.com/mmdetection/v2.0/convnext/mask_rcnn_convnext-t_p4_w7_fpn_fp16_ms-crop_3x_coco/mask_rcnn_convnext-t_p4_w7_fpn_fp16_ms-crop_3x_coco_20220426_154953-050731f4.pth"

custom_imports = dict(imports=["mmpretrain.models"], allow_failed_imports=False)

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
)

# the ConvNeXt zoo's optimiser (AMP, AdamW, layer-wise lr decay)
optim_wrapper = dict(
    type="AmpOptimWrapper",
    constructor="LearningRateDecayOptimizerConstructor",
    paramwise_cfg={"decay_rate": 0.95, "decay_type": "layer_wise", "num_layers": 6},
    optimizer=dict(_delete_=True, type="AdamW", lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
)
