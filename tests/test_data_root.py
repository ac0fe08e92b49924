"""Moving a config's data root (mmdelta.datasets.data_root): datasets and evaluator paths."""

from pathlib import Path

from mmengine.config import Config

from mmdelta.datasets.data_root import dotted_items, leaf_datasets, move_data_root

ROOT = Path(__file__).resolve().parents[1]


def test_evaluator_paths_move_with_the_datasets():
    # mmdet's Cityscapes instance evaluators hold data_root + '…' written out in full
    cfg = Config.fromfile(str(ROOT / "configs/delta_mask_rcnn_convnext-t_cityscapes.py"))
    changes = move_data_root(cfg, "/elsewhere/cityscapes/")
    for part in ("val_evaluator", "test_evaluator"):
        coco, cityscapes = cfg[part]
        assert (
            coco.ann_file
            == "/elsewhere/cityscapes/annotations/instancesonly_filtered_gtFine_val.json"
        )
        assert cityscapes.seg_prefix == "/elsewhere/cityscapes/gtFine/val"
        assert cityscapes.outfile_prefix.startswith("./work_dirs")  # not under the data root
    assert cfg.train_dataloader.dataset.dataset.data_root == "/elsewhere/cityscapes/"
    assert changes["val_evaluator.1.seg_prefix"] == "/elsewhere/cityscapes/gtFine/val"
    # the changes are what --cfg-options would set: every key exists and holds the value
    for key, value in changes.items():
        node = cfg
        for part in key.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert node == value
    no_old = [k for k, v in dotted_items(cfg.test_evaluator, "e") if str(v).startswith("data/")]
    assert not no_old


def test_wrapped_datasets_and_a_config_without_roots():
    cfg = Config.fromfile(str(ROOT / "configs/delta_faster_rcnn_voc.py"))
    keys = [k for k, _ in leaf_datasets(cfg.train_dataloader.dataset, "t")]
    assert keys == ["t.dataset.datasets.0", "t.dataset.datasets.1"]  # Repeat(Concat(07, 12))
    changes = move_data_root(cfg, "/v")
    assert sorted(k for k in changes if k.startswith("train_")) == [
        "train_dataloader.dataset.dataset.datasets.0.data_root",
        "train_dataloader.dataset.dataset.datasets.1.data_root",
    ]
    bare = Config(dict(test_dataloader=dict(dataset=dict(type="X", ann_file="/a/b.json"))))
    assert move_data_root(bare, "/v") == {}
    assert bare.test_dataloader.dataset.ann_file == "/a/b.json"
