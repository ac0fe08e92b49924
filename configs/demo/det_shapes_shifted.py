# Patching task 1 of the main job (tools/demo.py): the base detector's classes under a strong
# appearance shift (light shapes on coloured, striped / checkered, cluttered backgrounds with
# noise and blur; mmdelta.datasets.synthetic style 'shifted'). The base config plus a
# `delta_patch` key, the project's runner and the new data; `load_from` is the base.
_base_ = "./det_shapes_base.py"

data_root = "data/demo/det_shifted/"
load_from = "work_dirs/demo/det/base/base.pth"  # tools/demo.py sets its own

train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader

# rank-8 Δ branches on the backbone, the FPN, the RPN's shared conv and the box head's shared
# FC layers, and the patch's own BatchNorm statistics
delta_patch = dict(
    name="shifted",
    branch=dict(type="LowRankDelta", rank=8),
    targets=["backbone", "neck", "rpn_head.rpn_conv", "roi_head.bbox_head.shared_fcs"],
    task_norm=True,
)
runner_type = "DeltaRunner"
custom_hooks = [dict(type="DeltaPatchHook")]  # stops runners that ignore runner_type
custom_imports = dict(imports=["mmdelta"], allow_failed_imports=False)

max_iters = 240
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(
    _delete_=True, optimizer=dict(type="AdamW", lr=5e-3, weight_decay=0.0), clip_grad=None
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=20),
    dict(type="CosineAnnealingLR", by_epoch=False, begin=0, end=max_iters, eta_min=2e-5),
]
default_hooks = dict(
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=max_iters, max_keep_ckpts=1)
)
