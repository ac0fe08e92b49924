# Patching task 2 of the main job (tools/demo.py): three new object classes (new shapes) in
# the base's appearance. The patch carries its own classification/regression rows for them
# (`classes`); the base's three classes are untouched and come back when the patch is off.
_base_ = "./det_shapes_shifted.py"

data_root = "data/demo/det_newclasses/"
new_classes = ("triangle", "ring", "cross")

train_dataloader = dict(dataset=dict(data_root=data_root, metainfo=dict(classes=new_classes)))
val_dataloader = dict(dataset=dict(data_root=data_root, metainfo=dict(classes=new_classes)))
test_dataloader = val_dataloader

# Δ where the shifted task has it; the patch owns the box head's classifier and regressor
# (rows for the new classes)
delta_patch = dict(
    _delete_=True,
    name="newclasses",
    branch=dict(type="LowRankDelta", rank=8),
    targets=["backbone", "neck", "rpn_head.rpn_conv", "roi_head.bbox_head.shared_fcs"],
    classes=new_classes,
)

# new shapes in a familiar look: half the shift task's schedule
max_iters = 120
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=20),
    dict(type="CosineAnnealingLR", by_epoch=False, begin=0, end=max_iters, eta_min=2e-5),
]
default_hooks = dict(
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=max_iters, max_keep_ckpts=1)
)
