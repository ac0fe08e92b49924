# Tiny end-to-end segmentation run on generated mmseg-layout data
# (mmdelta.datasets.synthetic.write_seg_dataset(data_root, classes, ..., image_size=(64, 64))):
# mmseg's FCN on ResNetV1c-18 (dilated, output stride 8) with BN instead of SyncBN, thin
# heads, 64-px images, batch 2, 6 iterations with validation and a checkpoint every 3.
# Point it at generated data by overriding the dataloaders' dataset.data_root, e.g.
#   --cfg-options train_dataloader.dataset.data_root=D val_dataloader.dataset.data_root=D
#                 test_dataloader.dataset.data_root=D
_base_ = "mmseg::fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py"

data_root = "data/e2e_seg/"
classes = ("square", "disc", "bar")  # object classes; label 0 is the background
# = mmdelta.datasets.synthetic.seg_metainfo(classes)
metainfo = dict(
    classes=("background", *classes),
    palette=[[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25]],
)
image_size = (64, 64)  # (h, w)

norm_cfg = dict(type="BN", requires_grad=True)
model = dict(
    data_preprocessor=dict(size=image_size),
    pretrained=None,
    backbone=dict(norm_cfg=norm_cfg, init_cfg=None),
    decode_head=dict(in_channels=512, channels=32, num_classes=len(classes) + 1, norm_cfg=norm_cfg),
    auxiliary_head=dict(
        in_channels=256, channels=16, num_classes=len(classes) + 1, norm_cfg=norm_cfg
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
    batch_size=2,
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
    batch_size=1,
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

max_iters = 6
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=3)
param_scheduler = [
    dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=1, log_metric_by_epoch=False),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=3),
    visualization=dict(type="SegVisualizationHook", draw=False),
)
randomness = dict(seed=0)

delta_patch = dict(name="tiny")
runner_type = "DeltaRunner"
custom_hooks = [dict(type="DeltaPatchHook")]  # stops runners that ignore runner_type
custom_imports = dict(
    imports=["mmdelta", "mmseg.datasets", "mmseg.evaluation", "mmseg.models"],
    allow_failed_imports=False,
)
