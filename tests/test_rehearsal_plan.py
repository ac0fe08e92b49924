"""What a rehearsal changes in a real config, and nothing else (mmdelta.apps.rehearsal).

Fast checks of the options and the stand-in base; the runs themselves are
tests/test_rehearsal.py (slow)."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config, DictAction
from rehearsal_files import base_checkpoint, data_roots

from mmdelta.apps.rehearsal import (
    REHEARSALS,
    SCALE_DIVISOR,
    cli_options,
    plan,
    rehearsal,
    rehearsal_options,
)
from mmdelta.datasets.data_root import dotted_items
from mmdelta.datasets.paths import check_dataset_paths
from mmdelta.runner.cli import config_file

ROOT = Path(__file__).resolve().parents[1]


def _configs():
    for r in REHEARSALS:
        yield pytest.param(r.config, r.data, id=Path(r.config).stem)
        yield pytest.param(r.twin, r.data, id=Path(r.twin).stem)
        yield pytest.param(r.base_config, r.base_data, id=r.base_config.split("/")[-1])


def _exists(cfg: Config, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if isinstance(node, list | tuple):
            if not part.isdigit() or int(part) >= len(node):
                return False
            node = node[int(part)]
        elif part in node:
            node = node[part]
        else:
            return False
    return True


@pytest.mark.parametrize(("config", "data"), _configs())
def test_options_only_repoint_data_and_shrink_existing_settings(config, data, tmp_path_factory):
    roots = data_roots(tmp_path_factory)
    cfg = Config.fromfile(config_file(config) if "::" in config else str(ROOT / config))
    before = Config.fromfile(cfg.filename)
    options = rehearsal_options(
        cfg, roots[data], "/stand-in/base.pth", validate="finetune" not in config, save=False
    )
    # every option names a setting the config already has (nothing added), but load_from
    # and two loop / hook arguments left at their defaults in the configs (val_begin moved
    # past the end to skip a validation, CheckpointHook's save_last off to save nothing)
    defaults = ("load_from", "train_cfg.val_begin", "default_hooks.checkpoint.save_last")
    invented = [k for k in options if k not in defaults and not _exists(cfg, k)]
    assert not invented, invented
    renamed = {k.rsplit(".", 1)[-1] for k in options}
    assert renamed <= {
        "data_root", "num_workers", "persistent_workers", "scale", "scales", "crop_size",
        "size", "ann_file", "seg_prefix", "max_epochs", "max_iters", "val_interval",
        "interval", "load_from", "stride", "val_begin", "save_last",
    }, renamed  # fmt: skip
    # the command-line form parses back (mmengine's DictAction) to the same values
    namespace = argparse.Namespace()
    DictAction(option_strings=["--cfg-options"], dest="opts")(None, namespace, cli_options(options))
    assert namespace.opts == options
    cfg.merge_from_dict(options)
    # no string under the loaders / evaluators still points at the real data root
    for part in ("train_dataloader", "val_dataloader", "test_dataloader", "val_evaluator"):
        for key, value in dotted_items(cfg.get(part) or {}, part):
            assert not (isinstance(value, str) and value.startswith("data/")), (key, value)
    # scales are divided, and the stand-in data is what every dataset and evaluator reads
    for key, value in options.items():
        if key.endswith(".scale") and isinstance(value, tuple):
            old = before
            for part in key.split("."):
                old = old[int(part)] if isinstance(old, list | tuple) else old[part]
            assert value == tuple(max(8, v // SCALE_DIVISOR) for v in old), key
    check_dataset_paths(cfg)


def test_stand_in_base_has_the_official_layout(tmp_path_factory):
    r = rehearsal("delta_retinanet_voc")
    path = base_checkpoint(tmp_path_factory, r.config)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"meta", "state_dict"}
    meta = checkpoint["meta"]
    assert len(meta["CLASSES"]) == 80 and meta["CLASSES"][0] == "person"
    assert "dataset_meta" not in meta  # the pre-mmengine form the zoo's files have
    assert checkpoint["state_dict"]["bbox_head.retina_cls.weight"].shape[0] == 9 * 80
    # a second call reuses the file
    mtime = path.stat().st_mtime_ns
    assert base_checkpoint(tmp_path_factory, r.config) == path
    assert path.stat().st_mtime_ns == mtime


def test_plan_and_cli(tmp_path, tmp_path_factory):
    roots = data_roots(tmp_path_factory)
    r = rehearsal("configs/delta_upernet_convnext-t_ade20k-to-cityscapes.py")
    p = plan(r, roots, Path("/stand-in/base.pth"), tmp_path)
    assert set(p.commands) == {"train", "resume", "test", "twin", "base"}
    assert "--resume" in p.commands["resume"]
    assert "train_cfg.max_iters=4" in p.commands["resume"]
    assert "train_cfg.max_iters=1" in p.commands["twin"]
    assert "train_cfg.val_begin=2" in p.commands["twin"]  # trains only
    assert "default_hooks.checkpoint.save_last=False" in p.commands["twin"]
    assert "train_cfg.val_begin=5" in p.commands["resume"]  # validated in the first run
    assert p.commands["base"][2] == r.base_config
    with pytest.raises(KeyError, match="no rehearsal"):
        rehearsal("configs/demo/det_shapes_base.py")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/rehearse.py"), "--run", "bogus", "x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "no rehearsal" in proc.stderr
