"""The real-data configs in configs/: they load offline, carry a patch that resolves against
the real (full-size) architecture, use official checkpoints, match their fine-tuning twins,
and `check_dataset_paths` explains missing data before any dataset class runs."""

import copy
import functools
import os
import os.path as osp
import time
from pathlib import Path

import pytest
import yaml
from mmengine.config import Config
from mmengine.registry import DefaultScope

import mmdelta
from mmdelta.datasets.paths import DatasetPathError, check_dataset_paths

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
ALL_CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.py"))
DELTA_CONFIGS = [n for n in ALL_CONFIGS if n.startswith("delta_")]
TWINS = {n: n.replace("delta_", "finetune_", 1) for n in DELTA_CONFIGS}

#: config -> (new dataset class, base dataset class), as "scope.Class"
DATASETS = {
    "delta_faster_rcnn_voc.py": ("mmdet.VOCDataset", "mmdet.CocoDataset"),
    "delta_retinanet_voc.py": ("mmdet.VOCDataset", "mmdet.CocoDataset"),
    "delta_mask_rcnn_convnext-t_cityscapes.py": ("mmdet.CityscapesDataset", "mmdet.CocoDataset"),
    "delta_deeplabv3_r50-d8_ade20k-to-cityscapes.py": (
        "mmseg.CityscapesDataset",
        "mmseg.ADE20KDataset",
    ),
    "delta_upernet_convnext-t_ade20k-to-cityscapes.py": (
        "mmseg.CityscapesDataset",
        "mmseg.ADE20KDataset",
    ),
}

#: what each dataset family reads under data/ (folders end with '/'), i.e. the layout
#: `check_dataset_paths` expects and reports when missing
LAYOUTS = {
    "voc": [
        "VOCdevkit/",
        "VOCdevkit/VOC2007/",
        "VOCdevkit/VOC2007/Annotations/",
        "VOCdevkit/VOC2007/JPEGImages/",
        "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt",
        "VOCdevkit/VOC2007/ImageSets/Main/test.txt",
        "VOCdevkit/VOC2012/",
        "VOCdevkit/VOC2012/Annotations/",
        "VOCdevkit/VOC2012/JPEGImages/",
        "VOCdevkit/VOC2012/ImageSets/Main/trainval.txt",
    ],
    "cityscapes_instance": [
        "cityscapes/",
        "cityscapes/leftImg8bit/train/",
        "cityscapes/leftImg8bit/val/",
        "cityscapes/gtFine/val/",  # CityScapesMetric's seg_prefix
        "cityscapes/annotations/instancesonly_filtered_gtFine_train.json",
        "cityscapes/annotations/instancesonly_filtered_gtFine_val.json",
    ],
    "cityscapes_semantic": [
        "cityscapes/",
        "cityscapes/leftImg8bit/train/",
        "cityscapes/leftImg8bit/val/",
        "cityscapes/gtFine/train/",
        "cityscapes/gtFine/val/",
    ],
}
LAYOUT_OF = {
    "voc": "voc",
    "ade20k-to-cityscapes.py": "cityscapes_semantic",
    "cityscapes.py": "cityscapes_instance",
}


def layout_of(name: str) -> str:
    return next(v for k, v in LAYOUT_OF.items() if k in name)


@functools.cache
def _load(name: str) -> Config:
    return Config.fromfile(str(CONFIG_DIR / name))


def load(name: str) -> Config:
    return copy.deepcopy(_load(name))


def plain(obj):
    """A config value as plain dicts/lists, without mmengine's `_scope_` markers."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items() if k != "_scope_"}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def dataset_class(spec: str):
    scope, name = spec.split(".")
    if scope == "mmdet":
        import mmdet.datasets as module
    else:
        import mmseg.datasets as module
    return getattr(module, name)


def head_num_classes(model_cfg) -> list[int]:
    if "roi_head" in model_cfg:
        heads = [model_cfg.roi_head.bbox_head, model_cfg.roi_head.get("mask_head")]
    elif "decode_head" in model_cfg:
        heads = [model_cfg.decode_head, model_cfg.auxiliary_head]
    else:
        heads = [model_cfg.bbox_head]
    return [h.num_classes for h in heads if h is not None]


# -- the configs -----------------------------------------------------------------------------


def test_the_required_configs_exist():
    required = {
        "delta_faster_rcnn_voc.py",
        "delta_retinanet_voc.py",
        "delta_mask_rcnn_convnext-t_cityscapes.py",
        "delta_deeplabv3_r50-d8_ade20k-to-cityscapes.py",
        "delta_upernet_convnext-t_ade20k-to-cityscapes.py",
    }
    assert set(DELTA_CONFIGS) == required == set(DATASETS)
    assert set(ALL_CONFIGS) == required | set(TWINS.values())
    assert (CONFIG_DIR / "README.md").is_file()
    readme = (CONFIG_DIR / "README.md").read_text()
    assert all(name in readme for name in ALL_CONFIGS)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_loads_offline(name):
    cfg = load(name)
    assert cfg.model and cfg.train_dataloader and cfg.load_from.startswith("https://")
    assert cfg.default_scope in ("mmdet", "mmseg")


@pytest.mark.parametrize("name", DELTA_CONFIGS)
def test_delta_config_keys_and_classes(name):
    cfg = load(name)
    assert cfg.runner_type == "DeltaRunner"
    assert cfg.custom_imports.allow_failed_imports is False
    imports = cfg.custom_imports.imports
    assert "mmdelta" in imports
    if "convnext" in name:
        assert "mmpretrain.models" in imports
        assert cfg.model.backbone.type == "mmpretrain.ConvNeXt"
    assert [h["type"] for h in cfg.custom_hooks] == ["DeltaPatchHook"]

    patch = cfg.delta_patch
    new_cls, base_cls = (dataset_class(s) for s in DATASETS[name])
    assert tuple(patch.classes) == tuple(new_cls.METAINFO["classes"])
    assert tuple(patch.base_classes) == tuple(base_cls.METAINFO["classes"])
    assert set(patch.class_map) <= set(patch.classes)
    assert set(patch.class_map.values()) <= set(patch.base_classes)
    # every entry is needed: names already equal to a base name need no mapping
    assert not set(patch.class_map) & set(patch.base_classes)
    # the model is the base architecture: its heads count the base's classes
    assert set(head_num_classes(cfg.model)) == {len(patch.base_classes)}
    # the dataset the config trains on is the new one
    train = cfg.train_dataloader.dataset
    while "dataset" in train or "datasets" in train:
        train = train.get("dataset") or train.datasets[0]
    assert train.type == DATASETS[name][0].split(".")[1]


def test_class_maps():
    voc = load("delta_faster_rcnn_voc.py").delta_patch.class_map
    assert voc == {
        "aeroplane": "airplane",
        "diningtable": "dining table",
        "motorbike": "motorcycle",
        "pottedplant": "potted plant",
        "sofa": "couch",
        "tvmonitor": "tv",
    }
    assert load("delta_retinanet_voc.py").delta_patch.class_map == voc
    assert load("delta_mask_rcnn_convnext-t_cityscapes.py").delta_patch.class_map == {
        "rider": "person"
    }
    seg = load("delta_deeplabv3_r50-d8_ade20k-to-cityscapes.py").delta_patch
    assert seg.class_map == {
        "traffic sign": "signboard",
        "vegetation": "tree",
        "terrain": "grass",
        "rider": "person",
        "motorcycle": "minibike",
    }
    assert load("delta_upernet_convnext-t_ade20k-to-cityscapes.py").delta_patch == seg
    # every Cityscapes class but 'train' (ADE20K has none) starts from an ADE20K class
    unmatched = [c for c in seg.classes if seg.class_map.get(c, c) not in seg.base_classes]
    assert unmatched == ["train"]


@functools.cache
def _metafile_weights() -> dict[str, Path]:
    """Checkpoint URL -> the upstream config it belongs to, from the installed metafiles."""
    import mmdet
    import mmseg

    weights = {}
    for package in (mmdet, mmseg):
        mim = Path(package.__file__).parent / ".mim"
        for meta in (mim / "configs").glob("*/metafile.y*ml"):
            data = yaml.safe_load(meta.read_text())
            models = data.get("Models", []) if isinstance(data, dict) else data or []
            for model in models:
                urls = model.get("Weights") or []
                for url in [urls] if isinstance(urls, str) else urls:
                    weights[url] = mim / model["Config"]
    return weights


_TRAINING_ONLY = {"init_cfg", "pretrained", "train_cfg", "test_cfg", "size", "_scope_"}


def architecture(model_cfg) -> dict:
    """The model config without what does not shape the weights (losses, init, data size)."""

    def strip(obj):
        if isinstance(obj, dict):
            return {
                k: strip(v)
                for k, v in obj.items()
                if k not in _TRAINING_ONLY and not k.startswith("loss")
            }
        if isinstance(obj, (list, tuple)):
            return [strip(v) for v in obj]
        return obj

    return strip(plain(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg))


@pytest.mark.parametrize("name", DELTA_CONFIGS)
def test_load_from_is_an_official_checkpoint_of_the_same_architecture(name):
    cfg, twin = load(name), load(TWINS[name])
    weights = _metafile_weights()
    assert cfg.load_from in weights, f"{cfg.load_from} is not in an installed metafile"
    assert twin.load_from == cfg.load_from
    upstream = Config.fromfile(str(weights[cfg.load_from]))
    # the Δ config's model is exactly the checkpoint's architecture (80 / 150 classes)
    assert architecture(cfg.model) == architecture(upstream.model)


@pytest.mark.parametrize("name", DELTA_CONFIGS)
def test_twin_matches_its_delta_config(name):
    cfg, twin = load(name), load(TWINS[name])
    for key in ("runner_type", "delta_patch"):
        assert key not in twin
    assert "mmdelta" not in str(twin.get("custom_imports", ""))
    assert "DeltaPatchHook" not in str(twin.get("custom_hooks", ""))
    for key in (
        "train_cfg",
        "param_scheduler",
        "train_dataloader",
        "val_dataloader",
        "test_dataloader",
        "val_evaluator",
        "auto_scale_lr",
    ):
        assert plain(twin.get(key)) == plain(cfg.get(key)), key
    assert plain(twin.optim_wrapper).get("type") == plain(cfg.optim_wrapper).get("type")
    # the twin's heads have the new class count; otherwise the same model
    n_new = len(cfg.delta_patch.classes)
    assert set(head_num_classes(twin.model)) == {n_new}
    as_twin = copy.deepcopy(cfg.model)
    for head in (
        [as_twin.roi_head.bbox_head, as_twin.roi_head.get("mask_head")]
        if "roi_head" in as_twin
        else [as_twin.get("decode_head"), as_twin.get("auxiliary_head"), as_twin.get("bbox_head")]
    ):
        if head is not None:
            head.num_classes = n_new
    assert architecture(as_twin) == architecture(twin.model)


def test_schedules():
    voc = load("delta_faster_rcnn_voc.py")
    assert voc.train_cfg.max_epochs == 4
    assert plain(voc.param_scheduler) == [
        dict(type="MultiStepLR", begin=0, end=4, by_epoch=True, milestones=[3], gamma=0.1)
    ]
    assert voc.train_dataloader.dataset.type == "RepeatDataset"
    assert voc.train_dataloader.dataset.times == 3
    train_sets = voc.train_dataloader.dataset.dataset.datasets
    assert [d.ann_file for d in train_sets] == [
        "VOC2007/ImageSets/Main/trainval.txt",
        "VOC2012/ImageSets/Main/trainval.txt",
    ]
    assert voc.test_dataloader.dataset.ann_file == "VOC2007/ImageSets/Main/test.txt"
    assert voc.val_evaluator.type == "VOCMetric" and voc.val_evaluator.metric == "mAP"
    assert voc.val_evaluator.eval_mode in ("11points", "area")
    assert voc.optim_wrapper.optimizer == dict(
        type="SGD", lr=0.02, momentum=0.9, weight_decay=0.0001
    )
    for name in ("delta_deeplabv3_r50-d8_ade20k-to-cityscapes.py",):
        cfg = load(name)
        assert cfg.train_cfg.max_iters == 40000
        assert cfg.model.data_preprocessor.size == (512, 1024)
    for name in DELTA_CONFIGS:
        if "convnext" in name:
            wrapper = load(name).optim_wrapper
            assert wrapper.type == "AmpOptimWrapper"
            assert wrapper.constructor == "LearningRateDecayOptimizerConstructor"


# -- the patch against the real architectures -------------------------------------------------


def _null_pretrained(obj):
    if isinstance(obj, dict):
        if isinstance(obj.get("init_cfg"), dict) and obj["init_cfg"].get("type") == "Pretrained":
            obj["init_cfg"] = None
        if "pretrained" in obj:
            obj["pretrained"] = None
        for value in obj.values():
            _null_pretrained(value)
    elif isinstance(obj, list):
        for value in obj:
            _null_pretrained(value)


def _build(cfg):
    from mm_models import register_scopes

    register_scopes()
    if cfg.default_scope == "mmdet":
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    model_cfg = copy.deepcopy(cfg.model)
    _null_pretrained(model_cfg)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return MODELS.build(model_cfg).eval()


@pytest.mark.parametrize("name", DELTA_CONFIGS)
def test_delta_patch_resolves_against_the_real_model(name):
    cfg = load(name)
    start = time.perf_counter()
    model = _build(cfg)
    summary = mmdelta.apply_delta_patch(model, cfg.delta_patch)
    elapsed = time.perf_counter() - start
    patch = cfg.delta_patch
    assert mmdelta.patch_names(model) == [patch.name]
    assert mmdelta.active_patch(model) == patch.name
    assert mmdelta.patch_classes(model) == list(patch.classes)
    # every target patched something, and nothing outside the targets
    stages = list(summary.stages())
    for target in patch.targets:
        assert any(s == target or s.startswith(target + ".") or target.startswith(s + ".")
                   for s in stages), (target, stages)  # fmt: skip
    for stage in stages:
        assert any(stage.startswith(t.split(".")[0]) for t in patch.targets), stage
    # a small patch: Δ branches are a few % of the layers they patch
    assert 0 < summary.delta_fraction < 0.05
    assert 0 < summary.patch_fraction < 0.05
    # the heads switched to the new class set; switching the patch off restores the base
    n_new, n_base = len(patch.classes), len(patch.base_classes)
    heads = [m for _, m in model.named_modules() if m is not model and hasattr(m, "num_classes")]
    assert n_new in {h.num_classes for h in heads}
    mmdelta.set_active_patch(model, None)
    assert n_new not in {h.num_classes for h in heads if h.num_classes != 1}
    assert n_base in {h.num_classes for h in heads}
    print(f"{name}: built and patched in {elapsed:.2f} s")


# -- check_dataset_paths ---------------------------------------------------------------------


def redirect(cfg, old: str, new: str) -> None:
    """Rewrites every path under the dataloaders and evaluators that starts with ``old``."""

    def walk(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(v, str) and v.startswith(old):
                    obj[k] = new + v[len(old) :]
                else:
                    walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    for key in (
        "train_dataloader",
        "val_dataloader",
        "test_dataloader",
        "val_evaluator",
        "test_evaluator",
    ):
        walk(cfg.get(key))


def make_layout(root: Path, items) -> None:
    for item in items:
        path = root / item
        if item.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")


def missing_paths(err: DatasetPathError) -> set[str]:
    return {osp.normpath(m.path) for m in err.missing}


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_missing_data_is_reported_with_every_path(name, tmp_path):
    cfg = load(name)
    redirect(cfg, "data/", f"{tmp_path}/")
    expected = {osp.normpath(tmp_path / p) for p in LAYOUTS[layout_of(name)]}
    with pytest.raises(DatasetPathError) as info:
        check_dataset_paths(cfg)
    err = info.value
    assert isinstance(err, FileNotFoundError)
    assert missing_paths(err) == expected
    message = str(err)
    for path in expected:
        assert path in message
    assert "train_dataloader.dataset" in message
    family = layout_of(name)
    if family == "voc":
        assert "VOCtrainval_11-May-2012.tar" in message and "VOCtest_06-Nov-2007.tar" in message
        assert "VOCDataset" in message
        assert "train_dataloader.dataset.dataset.datasets[1].ann_file" in message
    else:
        assert "leftImg8bit_trainvaltest.zip" in message and "gtFine_trainvaltest.zip" in message
        assert "dataset_converters/cityscapes.py" in message
    if family == "cityscapes_instance":
        assert "instancesonly_filtered_gtFine" in message and "--out-dir" in message
        assert "val_evaluator[1].seg_prefix" in message
    if family == "cityscapes_semantic":
        assert "labelTrainIds" in message

    # only what is still missing is reported
    make_layout(tmp_path, LAYOUTS[family][:2])
    with pytest.raises(DatasetPathError) as info:
        check_dataset_paths(cfg)
    assert missing_paths(info.value) == expected - {
        osp.normpath(tmp_path / p) for p in LAYOUTS[family][:2]
    }
    # the full layout (empty files and folders) passes
    make_layout(tmp_path, LAYOUTS[family])
    check_dataset_paths(cfg)


def test_default_data_root_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load("delta_faster_rcnn_voc.py")
    with pytest.raises(DatasetPathError) as info:
        check_dataset_paths(cfg)
    assert "data/VOCdevkit/VOC2007/ImageSets/Main/test.txt" in str(info.value)
    assert str(tmp_path) in str(info.value)
    make_layout(tmp_path / "data", LAYOUTS["voc"])
    check_dataset_paths(cfg)
    # only the loaders asked for are checked
    os.remove(tmp_path / "data/VOCdevkit/VOC2007/ImageSets/Main/test.txt")
    check_dataset_paths(cfg, loaders=("train_dataloader",), evaluators=())
    with pytest.raises(DatasetPathError, match=r"test\.txt"):
        check_dataset_paths(cfg, loaders=("test_dataloader",))


def _ds(**kwargs):
    return dict(type="CocoDataset", **kwargs)


def test_wrappers_lists_and_path_rules(tmp_path):
    root = str(tmp_path)
    cfg = Config(
        dict(
            default_scope="mmdet",
            train_dataloader=dict(
                dataset=dict(
                    type="MultiImageMixDataset",
                    dataset=dict(
                        type="ClassBalancedDataset",
                        oversample_thr=0.1,
                        dataset=dict(
                            type="ConcatDataset",
                            datasets=[
                                _ds(data_root=root, ann_file="a.json", data_prefix=dict(img="i/")),
                                dict(
                                    type="RepeatDataset",
                                    times=2,
                                    dataset=_ds(
                                        data_root=root,
                                        ann_file=f"{root}/abs/b.json",  # absolute: not joined
                                        data_prefix=dict(img="", seg="s/"),  # '' = data_root
                                    ),
                                ),
                            ],
                        ),
                    ),
                )
            ),
            val_dataloader=dict(
                dataset=[
                    _ds(data_root=root, ann_file="", data_prefix=dict(img="v/")),  # '' = none
                    _ds(data_root="s3://bucket/coco/", ann_file="x.json"),  # remote: skipped
                    _ds(
                        data_root=f"{root}/petrel",
                        ann_file="y.json",
                        backend_args=dict(backend="petrel"),
                    ),
                    _ds(ann_file="https://host/z.json", data_prefix=dict(img="http://h/i/")),
                ]
            ),
            test_dataloader=None,
            val_evaluator=dict(type="CocoMetric", ann_file=f"{root}/eval.json"),
        )
    )
    with pytest.raises(DatasetPathError) as info:
        check_dataset_paths(cfg)
    expected = {
        f"{root}/a.json",
        f"{root}/i",
        f"{root}/abs/b.json",
        f"{root}/s",
        f"{root}/v",
        f"{root}/eval.json",
    }
    assert missing_paths(info.value) == expected
    message = str(info.value)
    assert "train_dataloader.dataset.dataset.dataset.datasets[1].dataset.data_prefix.seg" in message
    assert "val_dataloader.dataset[0].data_prefix.img" in message
    assert "val_evaluator.ann_file" in message
    assert "annotations_trainval2017.zip" in message  # the COCO instructions
    make_layout(tmp_path, ["a.json", "i/", "abs/b.json", "s/", "v/", "eval.json"])
    check_dataset_paths(cfg)


def test_a_file_where_a_folder_belongs(tmp_path):
    (tmp_path / "img").write_text("")
    cfg = dict(
        train_dataloader=dict(
            dataset=dict(type="MyDataset", data_root=str(tmp_path), data_prefix=dict(img="img"))
        )
    )
    with pytest.raises(DatasetPathError, match="is a file, not a folder"):
        check_dataset_paths(cfg)


def test_ade20k_and_generic_instructions(tmp_path):
    import mmseg

    ade = Config.fromfile(
        str(Path(mmseg.__file__).parent / ".mim/configs/_base_/datasets/ade20k.py")
    )
    redirect(ade, "data/", f"{tmp_path}/")
    with pytest.raises(DatasetPathError) as info:
        check_dataset_paths(ade)
    message = str(info.value)
    assert "ADEChallengeData2016.zip" in message
    assert f"{tmp_path}/ade/ADEChallengeData2016/images/training" in message
    assert "annotations/validation" in message

    generic = dict(
        default_scope="mmseg",
        train_dataloader=dict(dataset=dict(type="LoveDADataset", data_root=f"{tmp_path}/loveDA")),
    )
    with pytest.raises(DatasetPathError) as info:
        check_dataset_paths(generic)
    message = str(info.value)
    assert f"{tmp_path}/loveDA" in message
    assert "no instructions for LoveDADataset" in message
    assert "mmsegmentation.readthedocs.io" in message and "mmdetection" not in message
