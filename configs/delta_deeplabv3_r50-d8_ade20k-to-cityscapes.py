# Δ-patch the ADE20K-trained DeepLabV3 (ResNetV1c R-50-D8, 512x512, 160k iterations;
# mmseg model zoo) to Cityscapes (19 classes, 512x1024 crops).
#
# Inherits mmseg's own Cityscapes DeepLabV3 R-50-D8 config (data, 40k schedule); its model
# is the same architecture as the ADE20K model (`_base_/models/deeplabv3_r50-d8.py`), here
# with the checkpoint's 150 ADE20K classes in the decode and auxiliary heads: the
# Cityscapes class set is the patch's own (`delta_patch.classes`), which switches both.
# The backbone and the ASPP decode head stay frozen with low-rank Δ branches; the patch owns
# the 19-class `conv_seg` of both heads, rows started from the matching ADE20K classes.
_base_ = "mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024.py"

# deeplabv3_r50-d8_4xb4-160k_ade20k-512x512 (mIoU 42.66), from
# mmseg/.mim/configs/deeplabv3/metafile.yaml
load_from = "https://download.openmmlab.com/mmsegmentation/v0.5/deeplabv3/deeplabv3_r50-d8_512x512_160k_ade20k/deeplabv3_r50-d8_512x512_160k_ade20k_20200615_123227-5d0ee427.pth"

runner_type = "DeltaRunner"
custom_imports = dict(imports=["mmdelta"], allow_failed_imports=False)
# stops tools that ignore `runner_type` (mmseg's tools/test.py) from running an unpatched model
custom_hooks = [dict(type="DeltaPatchHook")]

model = dict(decode_head=dict(num_classes=150), auxiliary_head=dict(num_classes=150))

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

# Schedule (inherited, shared with the fine-tuning twin): mmseg's 40k-iteration Cityscapes
# schedule -- poly decay (power 0.9) to 1e-4, 8 images per iteration (4 GPUs x 2), the
# shorter of mmseg's two Cityscapes schedules, against which its published Cityscapes
# results are also reported.
# Δ optimiser: SGD lr 0.01, momentum 0.9, wd 5e-4 -- the rate the ADE20K base itself was
# trained with (and the twin's): the frozen base cannot drift, so no reduced rate is needed.
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=0.0005),
    clip_grad=None,
)
