"""Tiny datasets in the REAL on-disk formats of VOC0712, COCO, Cityscapes and ADE20K.

Layouts (``root`` = the folder the upstream config's ``data_root`` names):

* :func:`write_voc0712` → ``data/VOCdevkit/`` (mmdet ``voc0712.py``)::
      VOC2007/{JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/{trainval,test}.txt}
      VOC2012/{JPEGImages, Annotations, ImageSets/Main/trainval.txt}
* :func:`write_coco` → ``data/coco/`` (mmdet ``coco_detection.py``/``coco_instance.py``)::
      annotations/instances_<split>.json, <split>/<12-digit id>.jpg
* :func:`write_cityscapes` → ``data/cityscapes/`` (mmdet ``cityscapes_instance.py``, mmseg
  ``cityscapes.py``)::
      leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
      gtFine/{train,val}/<city>/<...>_gtFine_{polygons.json,color.png,labelIds.png,
          labelTrainIds.png,instanceIds.png}
      annotations/instancesonly_filtered_gtFine_{train,val}.json, {train,val}.txt
* :func:`write_ade20k` → ``data/ade/ADEChallengeData2016/`` (mmseg ``ade20k.py``)::
      images/{training,validation}/ADE_{train,val}_<8 digits>.jpg, annotations/<same>.png

Every tree uses the full real class lists and ids in its metadata (VOC's 20 names, COCO's 80
categories with ids 1..90, Cityscapes' ``labels.py`` ids and train ids, ADE's 150 classes)
but draws only a few classes (≤ 10, one shape kind each, see :mod:`.synthetic`); each
writer's docstring names them. The files are what the upstream tools produce:
Cityscapes' ``labelIds``/``labelTrainIds``/``color``/``instanceIds`` are rasterised from
the ``polygons.json`` the way ``cityscapesscripts`` does (PIL polygons, in file order) and
the instance JSON is computed from ``instanceIds`` exactly as mmdet's
``tools/dataset_converters/cityscapes.py`` does (RLE via ``pycocotools``).

All writers are deterministic and cached like :mod:`.synthetic`'s: an atomic write into a
temporary folder, the parameters in ``root/.mmdelta-dataset.json``; a second call with the
same parameters returns at once, other parameters (or foreign files) raise
:class:`~.synthetic.DatasetExistsError`. :func:`rehearsal_data` writes all four.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from .synthetic import _common_params, _encode, _generate, _scene, _voc_xml

__all__ = [
    "ADE20K_CLASSES",
    "CITYSCAPES_LABELS",
    "COCO_CATEGORIES",
    "VOC_CLASSES",
    "rehearsal_data",
    "write_ade20k",
    "write_cityscapes",
    "write_coco",
    "write_voc0712",
]

# --------------------------------------------------------------------------- class tables

#: mmdet ``VOCDataset.METAINFO['classes']``.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

#: COCO 2017 categories ``(id, name, supercategory)``, in mmdet ``CocoDataset`` order.
COCO_CATEGORIES = (
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"), (5, "airplane", "vehicle"), (6, "bus", "vehicle"),
    (7, "train", "vehicle"), (8, "truck", "vehicle"), (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"),
    (19, "horse", "animal"), (20, "sheep", "animal"), (21, "cow", "animal"),
    (22, "elephant", "animal"), (23, "bear", "animal"), (24, "zebra", "animal"),
    (25, "giraffe", "animal"), (27, "backpack", "accessory"), (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"), (32, "tie", "accessory"), (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"), (41, "skateboard", "sports"),
    (42, "surfboard", "sports"), (43, "tennis racket", "sports"), (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"), (47, "cup", "kitchen"), (48, "fork", "kitchen"),
    (49, "knife", "kitchen"), (50, "spoon", "kitchen"), (51, "bowl", "kitchen"),
    (52, "banana", "food"), (53, "apple", "food"), (54, "sandwich", "food"),
    (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
    (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"),
    (61, "cake", "food"), (62, "chair", "furniture"), (63, "couch", "furniture"),
    (64, "potted plant", "furniture"), (65, "bed", "furniture"),
    (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"),
    (73, "laptop", "electronic"), (74, "mouse", "electronic"), (75, "remote", "electronic"),
    (76, "keyboard", "electronic"), (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"), (79, "oven", "appliance"), (80, "toaster", "appliance"),
    (81, "sink", "appliance"), (82, "refrigerator", "appliance"), (84, "book", "indoor"),
    (85, "clock", "indoor"), (86, "vase", "indoor"), (87, "scissors", "indoor"),
    (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
)  # fmt: skip

#: ``cityscapesscripts.helpers.labels.labels``:
#: ``(name, id, trainId, hasInstances, ignoreInEval, color RGB)``.
CITYSCAPES_LABELS = (
    ("unlabeled", 0, 255, False, True, (0, 0, 0)),
    ("ego vehicle", 1, 255, False, True, (0, 0, 0)),
    ("rectification border", 2, 255, False, True, (0, 0, 0)),
    ("out of roi", 3, 255, False, True, (0, 0, 0)),
    ("static", 4, 255, False, True, (0, 0, 0)),
    ("dynamic", 5, 255, False, True, (111, 74, 0)),
    ("ground", 6, 255, False, True, (81, 0, 81)),
    ("road", 7, 0, False, False, (128, 64, 128)),
    ("sidewalk", 8, 1, False, False, (244, 35, 232)),
    ("parking", 9, 255, False, True, (250, 170, 160)),
    ("rail track", 10, 255, False, True, (230, 150, 140)),
    ("building", 11, 2, False, False, (70, 70, 70)),
    ("wall", 12, 3, False, False, (102, 102, 156)),
    ("fence", 13, 4, False, False, (190, 153, 153)),
    ("guard rail", 14, 255, False, True, (180, 165, 180)),
    ("bridge", 15, 255, False, True, (150, 100, 100)),
    ("tunnel", 16, 255, False, True, (150, 120, 90)),
    ("pole", 17, 5, False, False, (153, 153, 153)),
    ("polegroup", 18, 255, False, True, (153, 153, 153)),
    ("traffic light", 19, 6, False, False, (250, 170, 30)),
    ("traffic sign", 20, 7, False, False, (220, 220, 0)),
    ("vegetation", 21, 8, False, False, (107, 142, 35)),
    ("terrain", 22, 9, False, False, (152, 251, 152)),
    ("sky", 23, 10, False, False, (70, 130, 180)),
    ("person", 24, 11, True, False, (220, 20, 60)),
    ("rider", 25, 12, True, False, (255, 0, 0)),
    ("car", 26, 13, True, False, (0, 0, 142)),
    ("truck", 27, 14, True, False, (0, 0, 70)),
    ("bus", 28, 15, True, False, (0, 60, 100)),
    ("caravan", 29, 255, True, True, (0, 0, 90)),
    ("trailer", 30, 255, True, True, (0, 0, 110)),
    ("train", 31, 16, True, False, (0, 80, 100)),
    ("motorcycle", 32, 17, True, False, (0, 0, 230)),
    ("bicycle", 33, 18, True, False, (119, 11, 32)),
    ("license plate", -1, -1, False, True, (0, 0, 142)),
)

#: mmseg ``ADE20KDataset.METAINFO['classes']`` (label ``k`` = ``ADE20K_CLASSES[k-1]``;
#: note mmseg's ``'bed '`` with its trailing space).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea",
    "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe",
    "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike",
    "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

# Drawn classes. Polygon formats (COCO, Cityscapes) use only kinds without holes.
VOC_DRAWN = (
    "aeroplane",
    "bicycle",
    "bird",
    "bottle",
    "car",
    "chair",
    "dog",
    "horse",
    "person",
    "tvmonitor",
)
COCO_DRAWN = {
    "person": "bar",
    "car": "square",
    "bus": "hourglass",
    "bird": "triangle",
    "dog": "star",
    "bottle": "diamond",
    "chair": "cross",
    "clock": "disc",
}
CITYSCAPES_DRAWN = {
    "person": "bar",
    "rider": "hourglass",
    "car": "square",
    "truck": "cross",
    "bus": "diamond",
    "train": "triangle",
    "motorcycle": "star",
    "bicycle": "disc",
}
ADE20K_DRAWN = (
    "person",
    "table",
    "chair",
    "car",
    "painting",
    "sofa",
    "lamp",
    "bottle",
    "bicycle",
    "clock",
)

_HOLE_FREE = ("square", "disc", "triangle", "bar", "cross", "diamond", "star", "hourglass")
assert set(COCO_DRAWN.values()) <= set(_HOLE_FREE)
assert set(CITYSCAPES_DRAWN.values()) <= set(_HOLE_FREE)
_CS = {row[0]: row for row in CITYSCAPES_LABELS}


def _params(fmt, drawn, num_a, num_b, image_size, seed, objects, size, shapes=None) -> dict:
    params = _common_params(
        fmt, drawn, num_a, num_b, image_size, seed, "base", objects, size, 0.3, shapes
    )
    params["generator"] = "mmdelta.datasets.real_formats"
    return params


def _split_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Stream for layout beyond ``_scene`` (stuff regions); disjoint from ``_scene``'s."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index, 7])


def _full_mask(obj: dict, h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    a = obj["alpha"] >= 0.5
    mask[obj["y0"] : obj["y0"] + a.shape[0], obj["x0"] : obj["x0"] + a.shape[1]] = a
    return mask


def _contours(mask: np.ndarray) -> list[np.ndarray]:
    """External contours (``(n, 2)`` int x, y) with ≥ 3 points, largest first."""
    found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    found = sorted(found, key=lambda c: -cv2.contourArea(c))
    return [c.reshape(-1, 2) for c in found if len(c) >= 3]


def _paint_regions(label: np.ndarray, colours: Mapping[int, tuple], rng) -> np.ndarray:
    """A float32 BGR background: each label value in its RGB colour, softened, plus noise."""
    h, w = label.shape
    img = np.full((h, w, 3), 128.0, np.float32)
    for value, rgb in colours.items():
        bgr = np.array(rgb[::-1], np.float32) * 0.6 + 90 + rng.uniform(-12, 12, 3)
        img[label == value] = bgr
    return img + rng.normal(0, 4, (h, w, 3)).astype(np.float32)


# --------------------------------------------------------------------------- VOC0712


def write_voc0712(
    root: str | os.PathLike,
    *,
    num_train: Sequence[int] = (4, 4),
    num_test: int = 4,
    image_size: Sequence[int] = (96, 128),
    seed: int = 0,
) -> str:
    """PASCAL VOC 2007 + 2012 under ``root`` (``VOCdevkit/``); returns ``str(root)``.

    ``num_train`` = (VOC2007 trainval, VOC2012 trainval) images; ``num_test`` VOC2007 test
    images. Ids ``000005, 000007, …`` (2007) and ``2008_000008, 2008_000009, …`` (2012).
    Draws aeroplane, bicycle, bird, bottle, car, chair, dog, horse, person, tvmonitor
    (names and order of all 20 VOC classes are VOC's). Objects are large enough that most
    boxes pass ``voc0712.py``'s ``bbox_min_size=32``; the first object of an image is never
    difficult, each later one is ``<difficult>1</difficult>`` when ``(i + k) % 3 == 0``.
    """
    n07, n12 = (int(v) for v in num_train)
    if n07 < 0 or n12 < 0:
        raise ValueError(f"num_train {num_train} must be ≥ 0")
    params = _params(
        "voc0712", VOC_DRAWN, n07 + n12, num_test, image_size, seed, (1, 3), (0.4, 0.7)
    )
    params["num_train"] = [n07, n12]

    def write(tmp: Path) -> None:
        h, w = params["image_size"]
        lists = (
            ("VOC2007", "trainval", n07, [f"{5 + 2 * i:06d}" for i in range(n07)]),
            (
                "VOC2007",
                "test",
                params["num_test"],
                [f"{6 + 2 * i:06d}" for i in range(params["num_test"])],
            ),
            ("VOC2012", "trainval", n12, [f"2008_{8 + i:06d}" for i in range(n12)]),
        )
        for year, _, _, _ in lists:
            for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
                (tmp / year / sub).mkdir(parents=True, exist_ok=True)
        for year, list_name, _, ids in lists:
            voc = tmp / year
            for i, img_id in enumerate(ids):
                img, objects = _scene(params, params["shapes"], f"{year}/{list_name}", i)
                anns = [
                    (VOC_DRAWN[o["label"]], o["box"], int(k > 0 and (i + k) % 3 == 0))
                    for k, o in enumerate(objects)
                ]
                (voc / "JPEGImages" / f"{img_id}.jpg").write_bytes(_encode(".jpg", img))
                (voc / "Annotations" / f"{img_id}.xml").write_text(
                    _voc_xml(img_id, w, h, anns, year), encoding="utf-8"
                )
            (voc / "ImageSets" / "Main" / f"{list_name}.txt").write_text(
                "".join(f"{i}\n" for i in ids)
            )

    return _generate(Path(root), params, write)


# --------------------------------------------------------------------------- COCO


def write_coco(
    root: str | os.PathLike,
    *,
    splits: Sequence[str] = ("val2017",),
    num_images: int = 4,
    image_size: Sequence[int] = (96, 128),
    seed: int = 0,
) -> str:
    """COCO instances under ``root`` (``coco/``), ``num_images`` per split; returns ``str(root)``.

    Draws person, car, bus, bird, dog, bottle, chair, clock (ids 1, 3, 6, 16, 18, 44, 62,
    85); the JSON lists all 80 categories with their real ids and supercategories.
    Segmentations are polygons (the visible part's external contours through pixel
    centres), ``bbox``/``area`` those of the polygons' mask (``pycocotools``), ``iscrowd``
    0. Image ids run on across splits (``000000000001.jpg`` …), as do annotation ids.
    """
    from pycocotools import mask as mask_utils

    splits = [str(s) for s in splits]
    if not splits or len(set(splits)) != len(splits) or any("/" in s or not s for s in splits):
        raise ValueError(f"bad splits {splits}")
    params = _params(
        "coco",
        tuple(COCO_DRAWN),
        num_images,
        0,
        image_size,
        seed,
        (1, 4),
        (0.25, 0.55),
        COCO_DRAWN,
    )
    params["splits"] = splits
    cat_id = {name: cid for cid, name, _ in COCO_CATEGORIES}

    def write(tmp: Path) -> None:
        h, w = params["image_size"]
        (tmp / "annotations").mkdir()
        img_id = ann_id = 0
        for split in splits:
            (tmp / split).mkdir()
            images, annotations = [], []
            for i in range(params["num_train"]):
                img_id += 1
                img, objects = _scene(params, params["shapes"], split, i)
                file_name = f"{img_id:012d}.jpg"
                (tmp / split / file_name).write_bytes(_encode(".jpg", img))
                images.append(dict(license=1, file_name=file_name, height=h, width=w, id=img_id))
                covered = np.zeros((h, w), bool)
                anns = []
                for obj in reversed(objects):  # later objects are drawn on top
                    visible = _full_mask(obj, h, w) & ~covered
                    covered |= visible
                    polys = [
                        [round(float(v) + 0.5, 1) for v in c.reshape(-1)]
                        for c in _contours(visible)
                    ]
                    if not polys:
                        continue
                    rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
                    area = float(mask_utils.area(rle))
                    if area <= 0:
                        continue
                    anns.append(
                        dict(
                            segmentation=polys,
                            area=area,
                            iscrowd=0,
                            image_id=img_id,
                            bbox=[float(v) for v in mask_utils.toBbox(rle)],
                            category_id=cat_id[params["object_classes"][obj["label"]]],
                        )
                    )
                for ann in reversed(anns):
                    ann_id += 1
                    annotations.append({**ann, "id": ann_id})
            doc = dict(
                info=dict(
                    description="mmdelta tiny COCO-format rehearsal data (synthetic shapes)",
                    url="",
                    version="1.0",
                    year=2017,
                    contributor="mmdelta.datasets.real_formats",
                    date_created="2017/09/01",
                ),
                licenses=[dict(url="", id=1, name="synthetic")],
                images=images,
                annotations=annotations,
                categories=[
                    dict(supercategory=sup, id=cid, name=name) for cid, name, sup in COCO_CATEGORIES
                ],
            )
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))

    return _generate(Path(root), params, write)


# --------------------------------------------------------------------------- Cityscapes


def _cs_stuff(rng: np.random.Generator, h: int, w: int) -> list[tuple[str, list]]:
    """Street-scene stuff polygons in drawing order: sky, building, vegetation, sidewalk,
    road, ego vehicle (integer points, as in gtFine)."""
    horizon = int(h * rng.uniform(0.4, 0.55))
    xs = np.linspace(0, w - 1, int(rng.integers(4, 8))).round().astype(int)
    tops = (h * rng.uniform(0.08, 0.3, len(xs))).round().astype(int)
    skyline = []
    for k, x in enumerate(xs):
        nxt = xs[k + 1] if k + 1 < len(xs) else w - 1
        skyline += [(int(x), int(tops[k])), (int(nxt), int(tops[k]))]
    low = min(h - 1, horizon + int(0.12 * h))
    veg_x = int(rng.uniform(0.05, 0.6) * w)
    veg_w, veg_h = int(0.3 * w), int(0.25 * h)
    road_top = min(h - 1, horizon + int(0.08 * h))
    ego = h - 1 - max(2, int(0.06 * h))
    return [
        ("sky", [(0, 0), (w - 1, 0), (w - 1, h - 1), (0, h - 1)]),
        ("building", [(0, low), *skyline, (w - 1, low)]),
        (
            "vegetation",
            [
                (veg_x, horizon),
                (veg_x + veg_w // 2, horizon - veg_h),
                (veg_x + veg_w, horizon),
                (veg_x + veg_w, low),
                (veg_x, low),
            ],
        ),
        ("sidewalk", [(0, horizon), (w - 1, horizon), (w - 1, h - 1), (0, h - 1)]),
        (
            "road",
            [
                (int(0.35 * w), road_top),
                (int(0.65 * w), road_top),
                (w - 1, int(0.85 * h)),
                (w - 1, h - 1),
                (0, h - 1),
                (0, int(0.85 * h)),
            ],
        ),
        ("ego vehicle", [(0, ego), (w - 1, ego), (w - 1, h - 1), (0, h - 1)]),
    ]


def _cs_rasterise(objects: list[dict], h: int, w: int) -> dict[str, np.ndarray]:
    """``cityscapesscripts``' json2labelImg (ids, trainIds, color) and json2instanceImg
    (ids) on one ``polygons.json``'s objects: PIL polygons drawn in file order."""
    from PIL import Image, ImageDraw

    ids = Image.new("L", (w, h), _CS["unlabeled"][1])
    train = Image.new("L", (w, h), _CS["unlabeled"][2])
    colour = Image.new("RGBA", (w, h), _CS["unlabeled"][5])
    inst = Image.new("I", (w, h), _CS["unlabeled"][1])
    count: dict[str, int] = {}
    for obj in objects:
        name, _id, train_id, has_inst, _, rgb = _CS[obj["label"]]
        poly = [tuple(p) for p in obj["polygon"]]
        ImageDraw.Draw(ids).polygon(poly, fill=_id)
        ImageDraw.Draw(train).polygon(poly, fill=train_id)
        ImageDraw.Draw(colour).polygon(poly, fill=rgb)
        inst_id = _id
        if has_inst:
            inst_id = _id * 1000 + count.get(name, 0)
            count[name] = count.get(name, 0) + 1
        ImageDraw.Draw(inst).polygon(poly, fill=inst_id)
    return dict(
        labelIds=np.asarray(ids),
        labelTrainIds=np.asarray(train),
        color=np.asarray(colour),
        instanceIds=np.asarray(inst).astype(np.int32),
    )


def _cs_instances(inst: np.ndarray) -> list[dict]:
    """mmdet converter's ``load_img_info`` annotations for one instanceIds map."""
    from pycocotools import mask as mask_utils

    by_id = {row[1]: row for row in CITYSCAPES_LABELS}
    out = []
    for inst_id in np.unique(inst[inst >= 24]):
        label_id = inst_id // 1000 if inst_id >= 1000 else inst_id
        _, category_id, _, has_inst, ignore, _ = by_id[int(label_id)]
        if not has_inst or ignore:
            continue
        mask = np.asarray(inst == inst_id, dtype=np.uint8, order="F")
        rle = mask_utils.encode(mask[:, :, None])[0]
        area = mask_utils.area(rle)
        bbox = mask_utils.toBbox(rle)
        rle["counts"] = rle["counts"].decode()
        out.append(
            dict(
                iscrowd=int(inst_id < 1000),
                category_id=category_id,
                bbox=bbox.tolist(),
                area=area.tolist(),
                segmentation=rle,
            )
        )
    return out


def write_cityscapes(
    root: str | os.PathLike,
    *,
    num_train: int = 4,
    num_val: int = 2,
    image_size: Sequence[int] = (128, 256),
    seed: int = 0,
    cities: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Cityscapes fine annotations plus mmdet's instance JSON under ``root`` (``cityscapes/``).

    ``cities`` maps ``'train'``/``'val'`` to city names (default aachen, bochum /
    frankfurt, munster); images go round-robin over them, named
    ``<city>_<seq 6 digits>_000019``. Each scene: stuff polygons sky, building,
    vegetation, sidewalk, road and an ego-vehicle band (id 1, train id 255), then 2–5
    objects of the 8 instance classes (person, rider, car, truck, bus, train, motorcycle,
    bicycle; all drawn), back to front. ``polygons.json`` is the source; the PNGs are its
    ``cityscapesscripts`` rasterisation, ``annotations/instancesonly_filtered_gtFine_*.json``
    mmdet's converter output (image ids from 0 in file-name order), and ``{train,val}.txt``
    mmseg's converter lists. Returns ``str(root)``.
    """
    cities = {k: [str(c) for c in v] for k, v in (cities or {}).items()} or {
        "train": ["aachen", "bochum"],
        "val": ["frankfurt", "munster"],
    }
    if set(cities) != {"train", "val"} or not all(cities.values()):
        raise ValueError(f"cities must map 'train' and 'val' to city names, got {cities}")
    params = _params(
        "cityscapes",
        tuple(CITYSCAPES_DRAWN),
        num_train,
        num_val,
        image_size,
        seed,
        (2, 5),
        (0.15, 0.4),
        CITYSCAPES_DRAWN,
    )
    params["cities"] = cities
    colours = {row[1]: row[5] for row in CITYSCAPES_LABELS if row[1] >= 0}

    def write(tmp: Path) -> None:
        from PIL import Image

        h, w = params["image_size"]
        for split, count in (("train", params["num_train"]), ("val", params["num_test"])):
            names, infos = [], []
            for i in range(count):
                city = cities[split][i % len(cities[split])]
                stem = f"{city}_{i // len(cities[split]):06d}_000019"
                rng = _split_rng(params["seed"], split, i)
                polys = [dict(label=n, polygon=p) for n, p in _cs_stuff(rng, h, w)]
                stuff = _cs_rasterise(polys, h, w)["labelIds"]
                img, objects = _scene(
                    params, params["shapes"], split, i, _paint_regions(stuff, colours, rng)
                )
                for obj in objects:
                    contours = _contours(_full_mask(obj, h, w))
                    if contours:
                        polys.append(
                            dict(
                                label=params["object_classes"][obj["label"]],
                                polygon=contours[0].tolist(),
                            )
                        )
                maps = _cs_rasterise(polys, h, w)
                img_dir = tmp / "leftImg8bit" / split / city
                gt_dir = tmp / "gtFine" / split / city
                img_dir.mkdir(parents=True, exist_ok=True)
                gt_dir.mkdir(parents=True, exist_ok=True)
                (img_dir / f"{stem}_leftImg8bit.png").write_bytes(_encode(".png", img))
                doc = dict(imgHeight=h, imgWidth=w, objects=polys)
                (gt_dir / f"{stem}_gtFine_polygons.json").write_text(json.dumps(doc, indent=4))
                for key in ("labelIds", "labelTrainIds", "color"):
                    Image.fromarray(maps[key]).save(gt_dir / f"{stem}_gtFine_{key}.png")
                ok, buf = cv2.imencode(".png", maps["instanceIds"].astype(np.uint16))
                assert ok
                (gt_dir / f"{stem}_gtFine_instanceIds.png").write_bytes(buf.tobytes())
                names.append(f"{city}/{stem}")
                infos.append((f"{city}/{stem}", _cs_instances(maps["instanceIds"])))
            (tmp / f"{split}.txt").write_text("".join(f"{n}\n" for n in sorted(names)))
            out: dict = dict(images=[], categories=[], annotations=[])
            ann_id = 0
            for img_id, (name, anns) in enumerate(sorted(infos)):
                out["images"].append(
                    dict(
                        file_name=f"{name}_leftImg8bit.png",
                        height=h,
                        width=w,
                        segm_file=f"{name}_gtFine_labelIds.png",
                        id=img_id,
                    )
                )
                for ann in anns:
                    out["annotations"].append({**ann, "image_id": img_id, "id": ann_id})
                    ann_id += 1
            out["categories"] = [
                dict(id=row[1], name=row[0]) for row in CITYSCAPES_LABELS if row[3] and not row[4]
            ]
            if not out["annotations"]:
                out.pop("annotations")
            (tmp / "annotations").mkdir(exist_ok=True)
            (tmp / "annotations" / f"instancesonly_filtered_gtFine_{split}.json").write_text(
                json.dumps(out)
            )

    return _generate(Path(root), params, write)


# --------------------------------------------------------------------------- ADE20K


def write_ade20k(
    root: str | os.PathLike,
    *,
    num_train: int = 4,
    num_val: int = 2,
    image_size: Sequence[int] = (96, 128),
    seed: int = 0,
) -> str:
    """ADEChallengeData2016 under ``root`` (``ade/ADEChallengeData2016/``); returns it.

    Annotations are uint8 PNGs: 0 = other (mmseg's ``reduce_zero_label`` ignores it), ``k``
    = ``ADE20K_CLASSES[k-1]``. Backgrounds alternate between indoor (ceiling / wall /
    floor) and outdoor (sky / building / road) stuff with an unlabelled (0) patch; objects
    of person, table, chair, car, painting, sofa, lamp, bottle, bicycle, clock (labels 13,
    16, 20, 21, 23, 24, 37, 99, 128, 149) are drawn on top.
    """
    params = _params(
        "ade20k", ADE20K_DRAWN, num_train, num_val, image_size, seed, (2, 4), (0.2, 0.45)
    )
    label_of = {name: ADE20K_CLASSES.index(name) + 1 for name in ADE20K_CLASSES}
    palette = {
        0: (40, 40, 40),
        1: (120, 120, 120),
        2: (180, 120, 120),
        3: (6, 230, 230),
        4: (80, 50, 50),
        6: (120, 120, 80),
        7: (140, 140, 140),
    }

    def write(tmp: Path) -> None:
        h, w = params["image_size"]
        for split, folder, prefix, count in (
            ("train", "training", "ADE_train", params["num_train"]),
            ("val", "validation", "ADE_val", params["num_test"]),
        ):
            img_dir, ann_dir = tmp / "images" / folder, tmp / "annotations" / folder
            img_dir.mkdir(parents=True)
            ann_dir.mkdir(parents=True)
            for i in range(count):
                rng = _split_rng(params["seed"], split, i)
                top, middle, bottom = (
                    ("ceiling", "wall", "floor") if i % 2 == 0 else ("sky", "building", "road")
                )
                label = np.empty((h, w), np.uint8)
                y1, y2 = int(h * rng.uniform(0.15, 0.3)), int(h * rng.uniform(0.6, 0.75))
                label[:y1], label[y1:y2], label[y2:] = (
                    label_of[top],
                    label_of[middle],
                    label_of[bottom],
                )
                px, pw = int(rng.uniform(0, 0.8) * w), max(4, int(0.15 * w))
                label[y1:y2, px : px + pw] = 0  # "other": ignored by the metric
                img, objects = _scene(
                    params, params["shapes"], split, i, _paint_regions(label, palette, rng)
                )
                for obj in objects:
                    label[_full_mask(obj, h, w)] = label_of[ADE20K_DRAWN[obj["label"]]]
                name = f"{prefix}_{i + 1:08d}"
                (img_dir / f"{name}.jpg").write_bytes(_encode(".jpg", img))
                (ann_dir / f"{name}.png").write_bytes(_encode(".png", label))

    return _generate(Path(root), params, write)


# --------------------------------------------------------------------------- all four


def rehearsal_data(root: str | os.PathLike, *, larger: bool = False) -> dict[str, str]:
    """All four trees under ``root``, laid out as the upstream configs' ``data_root`` expects
    below ``data/``: ``{'voc': root/VOCdevkit, 'coco': root/coco, 'cityscapes':
    root/cityscapes, 'ade20k': root/ade/ADEChallengeData2016}``. COCO gets ``train2017`` and
    ``val2017`` (the COCO configs train on the first).

    Sizes, at their smallest useful: VOC 1 + 1 trainval images (VOC2007, VOC2012) and 2
    test; COCO 2 images per split; Cityscapes 1 train image and 2 val (two cities); ADE20K
    2 + 2 (a rehearsal trains through the configs' repeat wrappers, ×3 VOC, ×8 Cityscapes, so
    every training image costs several iterations). ``larger``: each writer's default sizes
    (VOC 4 + 4 and 4, COCO 4, Cityscapes 4 and 2, ADE20K 4 and 2), enough training images
    for the benchmark to hold some out as its validation split."""
    root = Path(root)
    if larger:
        return dict(
            voc=write_voc0712(root / "VOCdevkit"),
            coco=write_coco(root / "coco", splits=("train2017", "val2017")),
            cityscapes=write_cityscapes(root / "cityscapes"),
            ade20k=write_ade20k(root / "ade" / "ADEChallengeData2016"),
        )
    return dict(
        voc=write_voc0712(root / "VOCdevkit", num_train=(1, 1), num_test=2),
        coco=write_coco(root / "coco", splits=("train2017", "val2017"), num_images=2),
        cityscapes=write_cityscapes(root / "cityscapes", num_train=1, num_val=2),
        ade20k=write_ade20k(root / "ade" / "ADEChallengeData2016", num_train=2, num_val=2),
    )
