# Full fine-tuning twin of delta_upernet_convnext-t_ade20k-to-cityscapes.py: the zoo's
# UPerNet ConvNeXt-T with 19-class heads on mmseg's Cityscapes data, the same schedule and
# optimiser, started from the same ADE20K checkpoint. Plain upstream behaviour: every
# parameter trains; the heads' `conv_seg` do not match the 150-class checkpoint and start
# fresh (mmengine loads with strict=False and warns about the size mismatch).
_base_ = [
    "mmseg::_base_/models/upernet_convnext.py",
    "mmseg::_base_/datasets/cityscapes.py",
    "mmseg::_base_/default_runtime.py",
    "mmseg::_base_/schedules/schedule_40k.py",
]

# convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512 (mIoU 46.11), from
# mmseg/.mim/configs/convnext/metafile.yaml
load_from = "https://download.openmmlab.com/mmsegmentation/v0.5/convnext/upernet_convnext_tiny_fp16_512x512_160k_ade20k/upernet_convnext_tiny_fp16_512x512_160k_ade20k_20220227_124553-cad485de.pth"

custom_imports = dict(imports=["mmpretrain.models"], allow_failed_imports=False)

crop_size = (512, 1024)
data_preprocessor = dict(size=crop_size)
# the ADE20K zoo model's ConvNeXt-T UPerNet (convnext-tiny_upernet_8xb2-amp-160k_ade20k),
# without its ImageNet init: every weight comes from the ADE20K checkpoint (load_from)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type="mmpretrain.ConvNeXt",
        arch="tiny",
        out_indices=[0, 1, 2, 3],
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,
        gap_before_final_norm=False,
        init_cfg=None,
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=19),
    auxiliary_head=dict(in_channels=384, num_classes=19),
)

# Schedule (shared with the Δ config): mmseg's 40k-iteration Cityscapes length, 8 images
# per iteration (4 GPUs x 2, as mmseg's Cityscapes configs), with the ConvNeXt zoo
# schedule's shape -- 1500-iteration linear warm-up, then linear (power 1) decay to 0.
train_cfg = dict(type="IterBasedTrainLoop", max_iters=40000, val_interval=4000)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", power=1.0, begin=1500, end=40000, eta_min=0.0, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader

# the ConvNeXt zoo's optimiser (AMP, AdamW, stage-wise lr decay)
optim_wrapper = dict(
    _delete_=True,
    type="AmpOptimWrapper",
    optimizer=dict(type="AdamW", lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg={"decay_rate": 0.9, "decay_type": "stage_wise", "num_layers": 6},
    constructor="LearningRateDecayOptimizerConstructor",
    loss_scale="dynamic",
)
