# The base segmenter of the main job (tools/demo.py --task seg): mmseg's Semantic FPN on a
# ResNetV1c-18 (trained from scratch: no download) with BN instead of SyncBN, a 64-channel
# FPN and head, on generated mmseg-layout data (mmdelta.datasets.synthetic, style 'base':
# dark shapes on light backgrounds; label 0 is the background). An ordinary mmseg config:
# no delta_patch here. tools/demo.py writes the data and overrides data_root.
_base_ = "mmseg::sem_fpn/fpn_r50_4xb2-80k_cityscapes-512x1024.py"

data_root = "data/demo/seg_base/"
classes = ("square", "disc", "bar")  # object classes; label 0 is the background
# = mmdelta.datasets.synthetic.seg_metainfo(classes)
metainfo = dict(
    classes=("background", *classes),
    palette=[[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25]],
)
image_size = (128, 128)  # (h, w)

norm_cfg = dict(type="BN", requires_grad=True)
model = dict(
    data_preprocessor=dict(size=image_size),
    pretrained=None,
    backbone=dict(depth=18, norm_cfg=norm_cfg, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64),
    decode_head=dict(
        in_channels=[64, 64, 64, 64], channels=64, num_classes=len(classes) + 1, norm_cfg=norm_cfg
    ),
)

train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="Resize", scale=(image_size[1], image_size[0]), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(image_size[1], image_size[0]), keep_ratio=True),
    dict(type="LoadAnnotations"),
    dict(type="PackSegInputs"),
]
dataset_common = dict(
    type="BaseSegDataset",
    data_root=data_root,
    metainfo=metainfo,
    img_suffix=".jpg",
    seg_map_suffix=".png",
    reduce_zero_label=False,
)
train_dataloader = dict(
    _delete_=True,
    batch_size=8,
    num_workers=0,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(
        **dataset_common,
        data_prefix=dict(img_path="img_dir/train", seg_map_path="ann_dir/train"),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    _delete_=True,
    batch_size=4,
    num_workers=0,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        **dataset_common,
        data_prefix=dict(img_path="img_dir/val", seg_map_path="ann_dir/val"),
        test_mode=True,
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
test_evaluator = val_evaluator

max_iters = 400
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=100)
optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=2e-3, weight_decay=1e-4),
    clip_grad=None,
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.05, by_epoch=False, begin=0, end=30),
    dict(type="PolyLR", eta_min=1e-5, power=0.9, begin=0, end=max_iters, by_epoch=False),
]
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=20, log_metric_by_epoch=False),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=max_iters, max_keep_ckpts=1),
    visualization=dict(type="SegVisualizationHook", draw=False),
)
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
custom_imports = dict(
    imports=["mmseg.datasets", "mmseg.evaluation", "mmseg.models"], allow_failed_imports=False
)
