"""Tiny datasets in the real VOC0712 / COCO / Cityscapes / ADE20K formats: they load through
the upstream dataset classes with the upstream dataset configs' settings, evaluate to a
perfect score with the upstream metrics (ground truth as predictions), match what the
official converters derive, and cache like the synthetic writers."""

import copy
import importlib.util
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from mmdelta.datasets import (
    DatasetExistsError,
    rehearsal_data,
    write_ade20k,
    write_cityscapes,
    write_coco,
    write_voc0712,
)
from mmdelta.datasets import real_formats as rf

SITE = Path(torch.__file__).parents[1]
MMDET_CFG = SITE / "mmdet" / ".mim" / "configs" / "_base_" / "datasets"
MMSEG_CFG = SITE / "mmseg" / ".mim" / "configs" / "_base_" / "datasets"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Each tree at its writer's default size (rehearsal_data writes smaller ones)."""
    root = tmp_path_factory.mktemp("real_formats")
    return {
        "voc": Path(write_voc0712(root / "VOCdevkit")),
        "coco": Path(write_coco(root / "coco", splits=("train2017", "val2017"))),
        "cityscapes": Path(write_cityscapes(root / "cityscapes")),
        "ade20k": Path(write_ade20k(root / "ade" / "ADEChallengeData2016")),
    }


def _dataset_cfg(cfg_file: Path, loader: str, data_root: Path, pipeline: list) -> dict:
    """The upstream config's dataset settings with our data_root and a load-only pipeline."""
    cfg = Config.fromfile(cfg_file)
    ds = copy.deepcopy(cfg[loader]["dataset"].to_dict())
    inner = [ds]
    while inner:
        d = inner.pop()
        if "data_root" in d:
            d["data_root"] = str(data_root) + "/"
            d["pipeline"] = pipeline
        inner += [d["dataset"]] if "dataset" in d else d.get("datasets", [])
    return ds


def _build(scope: str, ds_cfg: dict):
    init_default_scope(scope)
    if scope == "mmdet":
        from mmdet.registry import DATASETS
    else:
        from mmseg.registry import DATASETS
    return DATASETS.build(ds_cfg)


def _gt_as_pred(sample) -> dict:
    """A packed DetDataSample whose predictions are its ground truth (score 1)."""
    from mmengine.structures import InstanceData

    gt = sample.gt_instances
    pred = InstanceData(bboxes=gt.bboxes.tensor, labels=gt.labels, scores=torch.ones(len(gt)))
    if "masks" in gt:
        pred.masks = torch.from_numpy(gt.masks.to_ndarray()).bool()
    sample.pred_instances = pred
    out = sample.to_dict()
    out["gt_instances"]["bboxes"] = gt.bboxes.tensor
    out["ignored_instances"]["bboxes"] = sample.ignored_instances.bboxes.tensor
    return out


def _evaluate(metric, dataset) -> dict:
    metric.dataset_meta = dataset.metainfo
    for k in range(len(dataset)):
        metric.process({}, [_gt_as_pred(dataset[k]["data_samples"])])
    return metric.evaluate(len(dataset))


DET_LOAD = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape")),
]
INST_LOAD = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape")),
]


# --------------------------------------------------------------------------- VOC0712


def test_voc0712_layout_and_xml(data):
    root = data["voc"]
    main07 = root / "VOC2007" / "ImageSets" / "Main"
    assert main07.joinpath("trainval.txt").read_text().split() == [
        "000005", "000007", "000009", "000011"
    ]  # fmt: skip
    assert len(main07.joinpath("test.txt").read_text().split()) == 4
    ids12 = (root / "VOC2012" / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    assert ids12[0] == "2008_000008" and len(ids12) == 4
    assert not (root / "VOC2012" / "ImageSets" / "Main" / "test.txt").exists()
    ann = ET.parse(root / "VOC2012" / "Annotations" / f"{ids12[0]}.xml").getroot()
    assert ann.findtext("folder") == "VOC2012" and ann.findtext("filename") == f"{ids12[0]}.jpg"
    assert ann.findtext("size/width") == "128" and ann.findtext("size/height") == "96"
    assert ann.findtext("segmented") == "0"
    difficult = []
    for xml in root.glob("VOC20*/Annotations/*.xml"):
        objs = ET.parse(xml).getroot().findall("object")
        flags = [int(o.findtext("difficult")) for o in objs]
        assert 0 in flags  # at least one non-difficult object per image
        difficult += flags
        for o in objs:
            assert o.findtext("name") in rf.VOC_DRAWN and o.findtext("pose") == "Unspecified"
            x0, y0, x1, y1 = (int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))  # fmt: skip
            assert 1 <= x0 < x1 <= 128 and 1 <= y0 < y1 <= 96  # 1-based, inside
    assert 1 in difficult


def test_voc0712_loads_with_the_upstream_config_and_scores_map_1(data):
    from mmdet.datasets import VOCDataset
    from mmdet.evaluation import VOCMetric

    assert VOCDataset.METAINFO["classes"] == rf.VOC_CLASSES
    cfg_file = MMDET_CFG / "voc0712.py"
    train = _build("mmdet", _dataset_cfg(cfg_file, "train_dataloader", data["voc"], DET_LOAD))
    assert type(train).__name__ == "RepeatDataset" and len(train) == 3 * 8
    assert tuple(train.metainfo["classes"]) == rf.VOC_CLASSES
    inner = train.dataset.datasets
    assert [d.metainfo["dataset_type"] for d in inner] == ["VOC2007", "VOC2012"]
    # bbox_min_size=32 ignores small boxes in training; most are large enough
    flags = [i["ignore_flag"] for d in inner for k in range(len(d)) for i in d.get_data_info(k)["instances"]]  # fmt: skip
    assert flags.count(0) > flags.count(1) > 0
    item = train[0]["data_samples"]
    assert len(item.gt_instances) >= 1 and item.gt_instances.labels.max() < 20

    val = _build("mmdet", _dataset_cfg(cfg_file, "val_dataloader", data["voc"], DET_LOAD))
    assert len(val) == 4 and val.metainfo["dataset_type"] == "VOC2007"
    labels = {int(v) for k in range(len(val)) for v in val[k]["data_samples"].gt_instances.labels}
    assert {rf.VOC_CLASSES[v] for v in labels} <= set(rf.VOC_DRAWN)
    assert sum(len(val[k]["data_samples"].ignored_instances) for k in range(len(val))) >= 1
    cfg = Config.fromfile(cfg_file).val_evaluator
    assert cfg.eval_mode == "11points"
    metric = VOCMetric(metric="mAP", eval_mode="11points")
    assert _evaluate(metric, val)["pascal_voc/mAP"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- COCO


def test_coco_json_has_the_real_categories(data):
    from mmdet.datasets import CocoDataset

    doc = json.loads((data["coco"] / "annotations" / "instances_val2017.json").read_text())
    assert set(doc) == {"info", "licenses", "images", "annotations", "categories"}
    cats = doc["categories"]
    assert tuple(c["name"] for c in cats) == CocoDataset.METAINFO["classes"]
    ids = [c["id"] for c in cats]
    assert len(ids) == 80 and ids[0] == 1 and ids[-1] == 90 and len(set(ids)) == 80
    assert sorted(set(range(1, 91)) - set(ids)) == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert {c["name"]: c["supercategory"] for c in cats}["tv"] == "electronic"
    assert [im["file_name"] for im in doc["images"]] == [
        f"{k:012d}.jpg" for k in range(5, 9)
    ]  # after train2017's
    for im in doc["images"]:
        assert (data["coco"] / "val2017" / im["file_name"]).is_file()
        assert (im["height"], im["width"]) == (96, 128)
    anns = doc["annotations"]
    assert len({a["id"] for a in anns}) == len(anns) >= 4
    names = {c["id"]: c["name"] for c in cats}
    for a in anns:
        assert names[a["category_id"]] in rf.COCO_DRAWN and a["iscrowd"] == 0
        assert a["area"] > 0 and all(len(p) >= 6 for p in a["segmentation"])
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 96


def test_coco_loads_and_scores_bbox_and_segm_1(data):
    from mmdet.evaluation import CocoMetric

    cfg_file = MMDET_CFG / "coco_instance.py"
    val = _build("mmdet", _dataset_cfg(cfg_file, "val_dataloader", data["coco"], INST_LOAD))
    assert len(val) == 4 and len(val.metainfo["classes"]) == 80
    assert val.cat_ids[:3] == [1, 2, 3] and val.cat_ids[-1] == 90
    sample = val[0]["data_samples"]
    assert sample.gt_instances.masks.to_ndarray().any(axis=(1, 2)).all()
    train = _build("mmdet", _dataset_cfg(cfg_file, "train_dataloader", data["coco"], INST_LOAD))
    assert len(train) == 4  # train2017 (other scenes, ids 1..4); filter_cfg keeps them all
    assert train.get_data_info(0)["img_id"] == 1 and val.get_data_info(0)["img_id"] == 5
    metric = CocoMetric(
        ann_file=str(data["coco"] / "annotations" / "instances_val2017.json"),
        metric=["bbox", "segm"],
    )
    res = _evaluate(metric, val)
    assert res["coco/bbox_mAP"] == pytest.approx(1.0)
    assert res["coco/segm_mAP"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- Cityscapes


def test_cityscapes_label_tables_match_cityscapesscripts():
    from cityscapesscripts.helpers.labels import labels

    assert rf.CITYSCAPES_LABELS == tuple(
        (lb.name, lb.id, lb.trainId, lb.hasInstances, lb.ignoreInEval, lb.color) for lb in labels
    )


def test_cityscapes_layout_and_label_maps(data):
    import cv2

    root = data["cityscapes"]
    imgs = sorted(p.relative_to(root).as_posix() for p in root.glob("leftImg8bit/*/*/*.png"))
    assert imgs[0] == "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    assert len(imgs) == 6 and sum("/val/" in p for p in imgs) == 2
    assert (root / "val.txt").read_text().split() == [
        "frankfurt/frankfurt_000000_000019", "munster/munster_000000_000019"
    ]  # fmt: skip
    train_ids, inst_classes = set(), set()
    for p in root.glob("gtFine/*/*/*_gtFine_labelTrainIds.png"):
        tid = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        inst = cv2.imread(str(p).replace("labelTrainIds", "instanceIds"), cv2.IMREAD_UNCHANGED)
        assert tid.shape == inst.shape == (128, 256) and inst.dtype == np.uint16
        train_ids |= set(np.unique(tid).tolist())
        inst_classes |= {int(v) // 1000 for v in np.unique(inst) if v >= 1000}
    assert {0, 1, 2, 8, 10, 255} <= train_ids and len(train_ids - {255}) >= 8
    assert train_ids <= set(range(19)) | {255}
    assert len(inst_classes) >= 4 and inst_classes <= {24, 25, 26, 27, 28, 31, 32, 33}


def _load_converter(pkg: str):
    path = SITE / pkg / ".mim" / "tools" / "dataset_converters" / "cityscapes.py"
    spec = importlib.util.spec_from_file_location(f"_{pkg}_cityscapes_converter", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _by_file(doc: dict) -> dict:
    """An instance json keyed by file name; annotation order and ids dropped."""
    names = {im["id"]: im["file_name"] for im in doc["images"]}
    out = {"categories": doc["categories"], "images": {}}
    for im in doc["images"]:
        out["images"][im["file_name"]] = ({k: v for k, v in im.items() if k != "id"}, [])
    for a in doc.get("annotations", []):
        rest = {k: v for k, v in a.items() if k not in ("id", "image_id")}
        out["images"][names[a["image_id"]]][1].append(rest)
    for _, anns in out["images"].values():
        anns.sort(key=lambda a: json.dumps(a, sort_keys=True))
    return out


def test_cityscapes_derived_files_equal_the_official_converters(data, tmp_path):
    """labelIds / color / instanceIds (cityscapesscripts), labelTrainIds (mmseg's converter)
    and the instance JSON (mmdet's converter), rebuilt from the raw files, equal ours."""
    import cv2
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    ours = data["cityscapes"]
    copy_ = tmp_path / "cityscapes"
    shutil.copytree(ours, copy_)
    for p in copy_.glob("gtFine/*/*/*.png"):
        p.unlink()
    shutil.rmtree(copy_ / "annotations")

    mmseg_conv = _load_converter("mmseg")
    for poly in sorted(copy_.glob("gtFine/*/*/*_gtFine_polygons.json")):
        mmseg_conv.convert_json_to_label(str(poly))  # labelTrainIds
        stem = str(poly)[: -len("polygons.json")]
        json2labelImg(str(poly), stem + "labelIds.png", "ids")
        json2labelImg(str(poly), stem + "color.png", "color")
        # json2instanceImg's own save fails on Pillow ≥ 11 (no 32-bit "I" PNGs): its image,
        # saved as the 16-bit PNG real Cityscapes ships
        ann = Annotation()
        ann.fromJsonFile(str(poly))
        inst = np.asarray(createInstanceImage(ann, "ids")).astype(np.uint16)
        cv2.imwrite(stem + "instanceIds.png", inst)
    theirs = sorted(p.relative_to(copy_) for p in copy_.glob("gtFine/*/*/*.png"))
    assert theirs == sorted(p.relative_to(ours) for p in ours.glob("gtFine/*/*/*.png"))
    assert len(theirs) == 6 * 4
    for rel in theirs:
        a = cv2.imread(str(ours / rel), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(copy_ / rel), cv2.IMREAD_UNCHANGED)
        assert a.shape == b.shape and np.array_equal(a, b), rel

    mmdet_conv = _load_converter("mmdet")
    for split in ("train", "val"):
        files = mmdet_conv.collect_files(
            str(copy_ / "leftImg8bit" / split), str(copy_ / "gtFine" / split)
        )
        infos = mmdet_conv.collect_annotations(files, nproc=1)
        name = f"instancesonly_filtered_gtFine_{split}.json"
        out = tmp_path / name
        mmdet_conv.cvt_annotations(infos, str(out))
        mine = json.loads((ours / "annotations" / name).read_text())
        assert _by_file(mine) == _by_file(json.loads(out.read_text()))
        assert [im["id"] for im in mine["images"]] == list(range(len(mine["images"])))


def test_cityscapes_loads_through_mmdet_and_mmseg_and_scores_1(data, tmp_path, monkeypatch):
    from mmdet.evaluation import CityScapesMetric

    root = data["cityscapes"]
    cfg_file = MMDET_CFG / "cityscapes_instance.py"
    train = _build("mmdet", _dataset_cfg(cfg_file, "train_dataloader", root, INST_LOAD))
    assert len(train) == 8 * 4 and len(train.metainfo["classes"]) == 8  # RepeatDataset ×8
    assert train.dataset.cat_ids == [24, 25, 26, 27, 28, 31, 32, 33]
    val = _build("mmdet", _dataset_cfg(cfg_file, "val_dataloader", root, INST_LOAD))
    assert len(val) == 2
    gt = val[0]["data_samples"].gt_instances
    assert len(gt) >= 1 and gt.masks.to_ndarray().shape[1:] == (128, 256)
    metric = CityScapesMetric(
        seg_prefix=str(root / "gtFine" / "val"), outfile_prefix=str(tmp_path / "cs")
    )
    if not hasattr(np, "in1d"):  # cityscapesscripts 2.3.0's evaluation on numpy ≥ 2.4
        monkeypatch.setattr(np, "in1d", np.isin, raising=False)
    res = _evaluate(metric, val)
    assert res["cityscapes/mAP"] == pytest.approx(1.0)

    seg_cfg = MMSEG_CFG / "cityscapes.py"
    seg_load = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]  # fmt: skip
    seg_train = _build("mmseg", _dataset_cfg(seg_cfg, "train_dataloader", root, seg_load))
    assert len(seg_train) == 4 and len(seg_train.metainfo["classes"]) == 19
    seg_val = _build("mmseg", _dataset_cfg(seg_cfg, "val_dataloader", root, seg_load))
    assert len(seg_val) == 2
    assert _seg_miou(seg_val) == pytest.approx(100.0)


def _seg_miou(dataset) -> float:
    from mmseg.evaluation import IoUMetric

    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = dataset.metainfo
    for k in range(len(dataset)):
        sample = dataset[k]["data_samples"]
        sample.pred_sem_seg = sample.gt_sem_seg
        metric.process({}, [sample.to_dict()])
    return metric.evaluate(len(dataset))["mIoU"]


# --------------------------------------------------------------------------- ADE20K


def test_ade20k_loads_and_scores_miou_100(data):
    import cv2
    from mmseg.datasets import ADE20KDataset

    assert ADE20KDataset.METAINFO["classes"] == rf.ADE20K_CLASSES
    root = data["ade20k"]
    assert sorted(p.name for p in (root / "images" / "validation").iterdir()) == [
        "ADE_val_00000001.jpg", "ADE_val_00000002.jpg"
    ]  # fmt: skip
    values = set()
    for p in root.glob("annotations/*/*.png"):
        ann = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert ann.dtype == np.uint8 and ann.shape == (96, 128)
        values |= set(np.unique(ann).tolist())
    assert 0 in values and values <= set(range(151))
    drawn = {rf.ADE20K_CLASSES.index(n) + 1 for n in rf.ADE20K_DRAWN}
    assert len(values & drawn) >= 4 and {1, 3, 4} <= values  # wall, sky, floor

    cfg_file = MMSEG_CFG / "ade20k.py"
    load = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", reduce_zero_label=True), dict(type="PackSegInputs")]  # fmt: skip
    train = _build("mmseg", _dataset_cfg(cfg_file, "train_dataloader", root, load))
    assert len(train) == 4 and len(train.metainfo["classes"]) == 150
    val = _build("mmseg", _dataset_cfg(cfg_file, "val_dataloader", root, load))
    assert len(val) == 2
    sem = val[0]["data_samples"].gt_sem_seg.data
    assert 255 in sem.unique().tolist()  # "other" is ignored
    assert _seg_miou(val) == pytest.approx(100.0)


# --------------------------------------------------------------------------- caching


@pytest.mark.parametrize(
    "key, write, same, other",
    [
        ("voc", write_voc0712, {}, dict(num_test=5)),
        ("coco", write_coco, dict(splits=["train2017", "val2017"]), dict(splits=("val2017",))),
        ("cityscapes", write_cityscapes, {}, dict(num_val=3)),
        ("ade20k", write_ade20k, {}, dict(image_size=(96, 96))),
    ],
)
def test_second_call_reuses_and_other_parameters_raise(data, key, write, same, other, monkeypatch):
    root = data[key]
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def fail(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(rf, "_scene", fail)
    assert write(root, **same) == str(root)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    with pytest.raises(DatasetExistsError):
        write(root, **other)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_rehearsal_data_is_deterministic(tmp_path):
    data = {k: Path(v) for k, v in rehearsal_data(tmp_path / "first").items()}
    again = rehearsal_data(tmp_path)
    assert again == {
        "voc": str(tmp_path / "VOCdevkit"),
        "coco": str(tmp_path / "coco"),
        "cityscapes": str(tmp_path / "cityscapes"),
        "ade20k": str(tmp_path / "ade" / "ADEChallengeData2016"),
    }
    for key, root in data.items():
        files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
        assert len(files) >= 5
        for rel in files:
            assert (root / rel).read_bytes() == (Path(again[key]) / rel).read_bytes(), rel
