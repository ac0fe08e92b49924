# Patching task 2 of the segmentation story (tools/demo.py --task seg): three new object
# classes (new shapes) in the base's appearance. The patch owns the decode head's classifier
# (rows for them); 'background' keeps the base's row as its start.
_base_ = "./seg_shapes_shifted.py"

data_root = "data/demo/seg_newclasses/"
new_classes = ("triangle", "ring", "cross")
# = mmdelta.datasets.synthetic.seg_metainfo(new_classes)
new_metainfo = dict(
    classes=("background", *new_classes),
    palette=[[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25]],
)

train_dataloader = dict(dataset=dict(data_root=data_root, metainfo=new_metainfo))
val_dataloader = dict(dataset=dict(data_root=data_root, metainfo=new_metainfo))
test_dataloader = val_dataloader

delta_patch = dict(
    _delete_=True,
    name="newclasses",
    branch=dict(type="LowRankDelta", rank=8),
    classes=new_metainfo["classes"],
)

# new shapes in a familiar look: half the shift task's schedule
max_iters = 200
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=20),
    dict(type="CosineAnnealingLR", by_epoch=False, begin=0, end=max_iters, eta_min=2e-5),
]
default_hooks = dict(
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=max_iters, max_keep_ckpts=1)
)
