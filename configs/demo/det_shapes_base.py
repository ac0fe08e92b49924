# The base detector of the main job (tools/demo.py): mmdet's PASCAL VOC Faster R-CNN shrunk
# to ResNet-18 (trained from scratch: no download), a 64-channel FPN and light RPN/RoI
# settings, on generated VOC-layout data (mmdelta.datasets.synthetic, style 'base': dark
# shapes on light backgrounds). An ordinary mmdet config: no delta_patch here.
# tools/demo.py writes the data and overrides data_root; `python tools/train.py` works too.
_base_ = "mmdet::pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py"

data_root = "data/demo/det_base/"  # write_voc_dataset(..., folder="shapes")
classes = ("square", "disc", "bar")
image_size = (192, 192)  # (h, w) of the generated images; Resize takes (w, h)

model = dict(
    # from scratch: every stage trains and BatchNorm learns its statistics
    backbone=dict(depth=18, init_cfg=None, frozen_stages=-1, norm_eval=False),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=256, num_classes=len(classes)),
    ),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=128)),
    ),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100)),
)

train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=(image_size[1], image_size[0]), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(image_size[1], image_size[0]), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(
        type="PackDetInputs",
        meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"),
    ),
]
train_dataloader = dict(
    _delete_=True,
    batch_size=4,
    num_workers=0,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(
        type="VOCDataset",
        data_root=data_root,
        ann_file="shapes/ImageSets/Main/trainval.txt",
        data_prefix=dict(sub_data_root="shapes/"),
        metainfo=dict(classes=classes),
        # no bbox_min_size: upstream's 32 px would mark the small shapes as ignored
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    _delete_=True,
    batch_size=4,
    num_workers=0,
    drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type="VOCDataset",
        data_root=data_root,
        ann_file="shapes/ImageSets/Main/test.txt",
        data_prefix=dict(sub_data_root="shapes/"),
        metainfo=dict(classes=classes),
        test_mode=True,
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
# mAP@0.5 over all points (VOC2010+ style)
val_evaluator = dict(type="VOCMetric", metric="mAP", iou_thrs=[0.5], eval_mode="area")
test_evaluator = val_evaluator

max_iters = 360
train_cfg = dict(_delete_=True, type="IterBasedTrainLoop", max_iters=max_iters, val_interval=120)
optim_wrapper = dict(optimizer=dict(lr=0.02, momentum=0.9, weight_decay=1e-4))
param_scheduler = [
    dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type="CosineAnnealingLR", by_epoch=False, begin=0, end=max_iters, eta_min=2e-4),
]
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=20, log_metric_by_epoch=False),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=max_iters, max_keep_ckpts=1),
    visualization=dict(type="DetVisualizationHook", draw=False),
)
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
