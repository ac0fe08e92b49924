# Tiny end-to-end detection run on generated PASCAL VOC data
# (mmdelta.datasets.synthetic.write_voc_dataset(data_root, classes, ..., image_size=(96, 96))):
# mmdet's VOC Faster R-CNN shrunk to ResNet-18, a 64-channel FPN, light RPN/RoI settings,
# 96-px images, batch 2, 6 iterations with validation and a checkpoint every 3.
# Point it at generated data by overriding the dataloaders' dataset.data_root, e.g.
#   --cfg-options train_dataloader.dataset.data_root=D val_dataloader.dataset.data_root=D
#                 test_dataloader.dataset.data_root=D
_base_ = "mmdet::pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py"

data_root = "data/e2e_det/"
classes = ("square", "disc", "bar")
image_size = (96, 96)  # (h, w) of the generated images; Resize takes (w, h)

model = dict(
    backbone=dict(depth=18, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=128, num_classes=len(classes)),
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
    batch_size=2,
    num_workers=0,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(
        type="VOCDataset",
        data_root=data_root,
        ann_file="VOC2007/ImageSets/Main/trainval.txt",
        data_prefix=dict(sub_data_root="VOC2007/"),
        metainfo=dict(classes=classes),
        # no bbox_min_size: upstream's 32 px would mark most small shapes as ignored
        filter_cfg=dict(filter_empty_gt=True, min_size=16),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    _delete_=True,
    batch_size=2,
    num_workers=0,
    drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type="VOCDataset",
        data_root=data_root,
        ann_file="VOC2007/ImageSets/Main/test.txt",
        data_prefix=dict(sub_data_root="VOC2007/"),
        metainfo=dict(classes=classes),
        test_mode=True,
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="VOCMetric", metric="mAP", eval_mode="11points")
test_evaluator = val_evaluator

max_iters = 6
train_cfg = dict(_delete_=True, type="IterBasedTrainLoop", max_iters=max_iters, val_interval=3)
param_scheduler = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=3)]
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=1),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=3),
    visualization=dict(type="DetVisualizationHook", draw=False),
)
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)

delta_patch = dict(name="tiny")
runner_type = "DeltaRunner"
custom_hooks = [dict(type="DeltaPatchHook")]  # stops runners that ignore runner_type
custom_imports = dict(imports=["mmdelta"], allow_failed_imports=False)
