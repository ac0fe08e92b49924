# Δ-patch the ADE20K-trained UPerNet ConvNeXt-T (512x512, 160k iterations; mmseg model
# zoo, `mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py`) to
# Cityscapes (19 classes, 512x1024 crops).
#
# Built from the same mmseg pieces as the zoo config, with mmseg's Cityscapes data: the
# model is the zoo model with the checkpoint's 150 ADE20K classes; the Cityscapes class set
# is the patch's own (`delta_patch.classes`), which switches the decode and auxiliary heads.
# The ConvNeXt backbone and the UPerNet decode head stay frozen with low-rank Δ branches;
# the patch owns the 19-class `conv_seg` of both heads. Inference is mmseg's Cityscapes
# default: whole 2048x1024 images.
_base_ = [
    "mmseg::_base_/models/upernet_convnext.py",
    "mmseg::_base_/datasets/cityscapes.py",
    "mmseg::_base_/default_runtime.py",
    "mmseg::_base_/schedules/schedule_40k.py",
]

# convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512 (mIoU 46.11), from
# mmseg/.mim/configs/convnext/metafile.yaml
load_from = "https://download.openmmlab.com/mmsegmentation/v0.5/convnext/upernet_convnext_tiny_fp16_512x512_160k_ade20k/upernet_convnext_tiny_fp16_512x512_160k_ade20k_20220227_124553-cad485de.pth"

runner_type = "DeltaRunner"
custom_imports = dict(imports=["mmdelta", "mmpretrain.models"], allow_failed_imports=False)
# stops tools that ignore `runner_type` (mmseg's tools/test.py) from running an unpatched model
custom_hooks = [dict(type="DeltaPatchHook")]

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
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150),
)

# (the class lists stay compact)
# fmt: off
delta_patch = dict(
    name="cityscapes",
    targets=["backbone", "decode_head"],
    branch=dict(type="LowRankDelta", rank=8),
    # mmseg CityscapesDataset.METAINFO order
    classes=(
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
        "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
        "bus", "train", "motorcycle", "bicycle",
    ),
    # mmseg ADE20KDataset.METAINFO order (the checkpoint's label order; "bed " is spelt
    # with its trailing space there)
    base_classes=(
        "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane",
        "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain",
        "plant", "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house",
        "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock",
        "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column",
        "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
        "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
        "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
        "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop",
        "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
        "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
        "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
        "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
        "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
        "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent",
        "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
        "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
        "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
        "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
        "glass", "clock", "flag",
    ),
    # Cityscapes names whose ADE20K counterpart is spelt differently (12 of the 19 names
    # are ADE20K names). ADE20K has no train/tram class: "train" starts fresh.
    class_map={
        "traffic sign": "signboard",
        "vegetation": "tree",
        "terrain": "grass",
        "rider": "person",
        "motorcycle": "minibike",
    },
)
# fmt: on

# Schedule (shared with the fine-tuning twin): mmseg's 40k-iteration Cityscapes length, 8 images
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

# Optimiser: the ConvNeXt zoo's (AMP, AdamW lr 1e-4, wd 0.05, stage-wise lr decay 0.9), the
# same as the twin's: AdamW's step size does not scale with the number of trainable
# parameters, and its weight decay pulls the Δ branches towards zero, i.e. towards the
# base. The runner falls back to fp32 where there is no GPU.
optim_wrapper = dict(
    _delete_=True,
    type="AmpOptimWrapper",
    optimizer=dict(type="AdamW", lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg={"decay_rate": 0.9, "decay_type": "stage_wise", "num_layers": 6},
    constructor="LearningRateDecayOptimizerConstructor",
    loss_scale="dynamic",
)
