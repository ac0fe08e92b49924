"""Generated VOC / mmseg datasets: determinism, valid annotations, loading, caching."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
from mmengine.config import Config

from mmdelta.datasets import synthetic
from mmdelta.datasets.synthetic import (
    MARKER,
    SHAPE_KINDS,
    DatasetExistsError,
    class_shapes,
    dataset_info,
    seg_metainfo,
    write_seg_dataset,
    write_voc_dataset,
)

CONFIGS = Path(__file__).parent / "configs"
DET_CFG = CONFIGS / "e2e_det_voc_tiny.py"
SEG_CFG = CONFIGS / "e2e_seg_tiny.py"
CLASSES = ("square", "disc", "bar")
VOC_ARGS = dict(classes=CLASSES, num_train=8, num_test=4, image_size=(64, 80))
SEG_ARGS = dict(classes=CLASSES, num_train=8, num_test=4, image_size=(64, 80))


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _voc_objects(root: Path, img_id: str):
    ann = ET.parse(root / "VOC2007" / "Annotations" / f"{img_id}.xml").getroot()
    size = ann.find("size")
    w, h = int(size.find("width").text), int(size.find("height").text)
    objs = [
        (
            o.find("name").text,
            int(o.find("difficult").text),
            [int(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")],
        )
        for o in ann.findall("object")
    ]
    return (h, w), objs


def _ids(root: Path, split: str) -> list[str]:
    return (root / "VOC2007" / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return Path(write_voc_dataset(tmp_path_factory.mktemp("voc") / "data", **VOC_ARGS))


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    return Path(write_seg_dataset(tmp_path_factory.mktemp("seg") / "data", **SEG_ARGS))


# --------------------------------------------------------------------------- determinism


def test_voc_same_seed_is_byte_identical_other_seed_differs(voc, tmp_path):
    again = Path(write_voc_dataset(tmp_path / "again", **VOC_ARGS))
    assert _files(again) == _files(voc)
    other = _files(Path(write_voc_dataset(tmp_path / "other", **VOC_ARGS, seed=1)))
    assert other.keys() == _files(voc).keys()
    jpgs = [k for k in other if k.endswith(".jpg")]
    assert all(other[k] != _files(voc)[k] for k in jpgs)


def test_seg_same_seed_is_byte_identical_other_seed_differs(seg, tmp_path):
    assert _files(Path(write_seg_dataset(tmp_path / "again", **SEG_ARGS))) == _files(seg)
    other = _files(Path(write_seg_dataset(tmp_path / "other", **SEG_ARGS, seed=1)))
    pngs = [k for k in other if k.endswith(".png")]
    assert pngs and all(other[k] != _files(seg)[k] for k in pngs)


def test_style_changes_appearance_not_layout(voc, tmp_path):
    shifted = Path(write_voc_dataset(tmp_path / "shifted", **VOC_ARGS, style="shifted"))
    for img_id in _ids(voc, "trainval") + _ids(voc, "test"):
        assert _voc_objects(shifted, img_id) == _voc_objects(voc, img_id)
        base = cv2.imread(str(voc / "VOC2007" / "JPEGImages" / f"{img_id}.jpg"))
        new = cv2.imread(str(shifted / "VOC2007" / "JPEGImages" / f"{img_id}.jpg"))
        assert np.abs(base.astype(int) - new.astype(int)).mean() > 30


# --------------------------------------------------------------------------- annotations


def test_voc_annotations_are_valid(voc):
    trainval, test = _ids(voc, "trainval"), _ids(voc, "test")
    assert len(trainval) == 8 and len(test) == 4 and not set(trainval) & set(test)
    for split in (trainval, test):
        counts, seen = [], set()
        for img_id in split:
            img = cv2.imread(str(voc / "VOC2007" / "JPEGImages" / f"{img_id}.jpg"))
            (h, w), objs = _voc_objects(voc, img_id)
            assert img.shape == (h, w, 3) == (64, 80, 3)
            counts.append(len(objs))
            for name, difficult, (x0, y0, x1, y1) in objs:
                assert name in CLASSES and difficult == 0
                assert 1 <= x0 < x1 <= w and 1 <= y0 < y1 <= h  # VOC: 1-based, inclusive
                assert x1 - x0 >= 2 and y1 - y0 >= 2
                seen.add(name)
        assert np.mean(counts) >= 2 and min(counts) >= 1
        assert seen == set(CLASSES)


def test_seg_label_maps_are_valid(seg):
    for split, n in (("train", 8), ("val", 4)):
        imgs = sorted((seg / "img_dir" / split).iterdir())
        anns = sorted((seg / "ann_dir" / split).iterdir())
        assert [p.stem for p in imgs] == [p.stem for p in anns] and len(imgs) == n
        present = set()
        for img_path, ann_path in zip(imgs, anns, strict=True):
            img = cv2.imread(str(img_path))
            label = cv2.imread(str(ann_path), cv2.IMREAD_UNCHANGED)
            assert label.dtype == np.uint8 and label.shape == img.shape[:2] == (64, 80)
            values = set(np.unique(label).tolist())
            assert values <= {0, 1, 2, 3, 255}
            present |= values
        assert {0, 1, 2, 3} <= present


def test_seg_ignore_border(tmp_path):
    root = Path(write_seg_dataset(tmp_path / "d", CLASSES, 3, 1, (48, 48), ignore_border=1))
    label = cv2.imread(str(root / "ann_dir" / "train" / "000001.png"), cv2.IMREAD_UNCHANGED)
    assert 255 in label and set(np.unique(label).tolist()) <= {0, 1, 2, 3, 255}


def test_class_shapes():
    assert class_shapes(SHAPE_KINDS) == {k: k for k in SHAPE_KINDS}
    mixed = class_shapes(["cat", "square", "dog", "disc"])
    assert mixed["square"] == "square" and mixed["disc"] == "disc"
    assert len(set(mixed.values())) == 4 and set(mixed.values()) <= set(SHAPE_KINDS)
    assert class_shapes(["cat", "square", "dog", "disc"]) == mixed  # deterministic
    assert class_shapes(["cat"], shapes={"cat": "star"}) == {"cat": "star"}
    with pytest.raises(ValueError, match="share a shape"):
        class_shapes(["square", "cat"], shapes={"cat": "square"})
    with pytest.raises(ValueError, match="duplicate"):
        class_shapes(["a", "a"])
    with pytest.raises(ValueError, match="at most"):
        class_shapes([f"c{i}" for i in range(len(SHAPE_KINDS) + 1)])


# --------------------------------------------------------------------------- loading


def _build(scope: str, ds_cfg):
    # the pipeline's transforms are looked up in the default scope when the dataset is built
    from mmengine.registry import DATASETS, DefaultScope

    with DefaultScope.overwrite_default_scope(scope):
        return DATASETS.build(ds_cfg)


def _dataset_cfg(cfg_path: Path, loader: str, root: Path):
    cfg = Config.fromfile(str(cfg_path), import_custom_modules=False)
    ds = cfg[loader].dataset
    ds.data_root = str(root)
    return cfg, ds


def test_loads_through_mmdet_voc_dataset(voc):
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    cfg, ds_cfg = _dataset_cfg(DET_CFG, "train_dataloader", voc)
    cfg.val_dataloader.dataset.data_root = str(voc)
    assert tuple(cfg.classes) == CLASSES
    train = _build("mmdet", ds_cfg)
    assert type(train).__name__ == "VOCDataset" and len(train) == 8
    assert tuple(train.metainfo["classes"]) == CLASSES
    info = train.get_data_info(0)
    _, objs = _voc_objects(voc, info["img_id"])
    assert [i["bbox"] for i in info["instances"]] == [[v - 1 for v in b] for _, _, b in objs]
    assert all(i["ignore_flag"] == 0 for i in info["instances"])
    for k in range(3):
        item = train[k]
        assert item["inputs"].shape == (3, 77, 96)  # Resize to fit 96×96, ratio kept: 64×80 ×1.2
        gt = item["data_samples"].gt_instances
        assert len(gt) >= 1 and gt.labels.max() < len(CLASSES)
    test = _build("mmdet", cfg.val_dataloader.dataset)
    assert len(test) == 4 and test[0]["data_samples"].gt_instances.bboxes.shape[1] == 4


def test_loads_through_mmseg_base_seg_dataset(seg):
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    cfg, ds_cfg = _dataset_cfg(SEG_CFG, "train_dataloader", seg)
    meta = seg_metainfo(cfg.classes)
    assert tuple(cfg.metainfo.classes) == meta["classes"]
    assert [list(c) for c in cfg.metainfo.palette] == meta["palette"]
    assert dataset_info(seg)["classes"] == list(meta["classes"])
    train = _build("mmseg", ds_cfg)
    assert type(train).__name__ == "BaseSegDataset" and len(train) == 8
    assert tuple(train.metainfo["classes"]) == meta["classes"]
    for k in range(3):
        item = train[k]
        sem = item["data_samples"].gt_sem_seg.data
        assert item["inputs"].shape[1:] == sem.shape[1:]
        assert set(sem.unique().tolist()) <= {0, 1, 2, 3, 255}
    cfg.val_dataloader.dataset.data_root = str(seg)
    val = _build("mmseg", cfg.val_dataloader.dataset)
    assert len(val) == 4
    assert val[0]["data_samples"].gt_sem_seg.data.shape[1:] == (64, 80)


# --------------------------------------------------------------------------- caching


def test_cached_call_returns_without_rewriting(voc, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in voc.rglob("*")}

    def fail(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(synthetic, "_scene", fail)
    assert write_voc_dataset(voc, **VOC_ARGS) == str(voc)
    assert {p: p.stat().st_mtime_ns for p in voc.rglob("*")} == before
    info = json.loads((voc / MARKER).read_text())
    assert info["seed"] == 0 and info["classes"] == list(CLASSES) and info["format"] == "voc"


def test_a_concurrent_writer_that_finishes_first_wins(tmp_path, monkeypatch):
    root, real, raced = tmp_path / "d", synthetic._scene, []

    def racing(*args, **kwargs):
        if not raced:  # another process writes the same dataset while this one runs
            raced.append(True)
            monkeypatch.setattr(synthetic, "_scene", real)
            write_seg_dataset(root, CLASSES, 2, 1, (32, 32))
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_scene", racing)
    assert write_seg_dataset(root, CLASSES, 2, 1, (32, 32)) == str(root)
    assert raced and dataset_info(root)["num_train"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_mismatch_or_foreign_root_raises_and_is_left_alone(voc, tmp_path):
    before = _files(voc)
    with pytest.raises(DatasetExistsError, match="seed"):
        write_voc_dataset(voc, **VOC_ARGS, seed=3)
    with pytest.raises(DatasetExistsError, match="format"):
        write_seg_dataset(voc, **SEG_ARGS)
    assert _files(voc) == before

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("user data")
    with pytest.raises(DatasetExistsError, match="not written by"):
        write_voc_dataset(foreign, **VOC_ARGS)
    assert _files(foreign) == {"notes.txt": b"user data"}

    empty = tmp_path / "empty"
    empty.mkdir()
    write_seg_dataset(empty, CLASSES, 2, 1, (32, 32))
    assert dataset_info(empty)["format"] == "mmseg"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine"]  # no temp dirs left


def test_bad_arguments():
    with pytest.raises(ValueError, match="style"):
        write_voc_dataset("/nonexistent/x", CLASSES, 1, 1, style="fancy")
    with pytest.raises(ValueError, match="background"):
        write_seg_dataset("/nonexistent/x", ("background", "disc"), 1, 1)
    with pytest.raises(TypeError):
        write_voc_dataset("/nonexistent/x", "square", 1, 1)


def test_voc_folder_name_and_the_demo_config_load_it(tmp_path):
    """The main job's data: sub-root 'shapes' (not VOC2007), read by its own base config."""
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    root = Path(write_voc_dataset(tmp_path / "d", **VOC_ARGS, folder="shapes"))
    assert not (root / "VOC2007").exists()
    assert dataset_info(root)["folder"] == "shapes"
    ann = ET.parse(next((root / "shapes" / "Annotations").glob("*.xml"))).getroot()
    assert ann.find("folder").text == "shapes"
    demo_cfg = Path(__file__).parents[1] / "configs/demo/det_shapes_base.py"
    _, ds_cfg = _dataset_cfg(demo_cfg, "train_dataloader", root)
    train = _build("mmdet", ds_cfg)
    assert len(train) == 8 and train.metainfo["dataset_type"] is None  # own class names
    assert len(train[0]["data_samples"].gt_instances) >= 1
    # the default stays VOC2007 (and older caches of it stay valid: no 'folder' entry)
    assert "folder" not in dataset_info(write_voc_dataset(tmp_path / "v", **VOC_ARGS))
    with pytest.raises(ValueError, match="plain folder name"):
        write_voc_dataset(tmp_path / "x", **VOC_ARGS, folder="a/b")
