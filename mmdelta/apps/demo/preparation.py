"""What the main job and the benchmark prepare before patching: each task's data, its
config at a size, and the base (trained once, then cached under its key)."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path

import torch
from mmengine.config import Config

from ...fileio import write_atomic, write_text_atomic
from ...runner.cli import build_runner
from .stories import Size, Story, Task

LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")


def write_task_data(story: Story, task: Task, size: Size, data: Path) -> str:
    """Generates (or reuses) the data of ``story``'s ``task`` at ``size`` under ``data``;
    returns its root."""
    root = (
        data / f"{story.name}_{task.name}"
        if size.name == "full"
        else (data / f"{story.name}_{task.name}_{size.name}")
    )
    return story.writer(
        root,
        task.classes,
        size.num_train,
        size.num_test,
        seed=task.seed,
        style=task.style,
        **story.data,
    )


def task_config(story: Story, task: Task, configs: Path, root: str, size: Size, out: Path):
    """The config of ``task`` (from ``configs``) on the data at ``root``, with ``size``'s
    iterations and its work_dir under ``out``."""
    path = configs / task.config
    if not path.is_file():
        raise FileNotFoundError(f"config {path} of the {story.name} story's task {task.name!r}")
    cfg = Config.fromfile(str(path))
    options = {f"{key}.dataset.data_root": root for key in LOADERS}
    iters = size.base_iters if task is story.base else size.patch_iters
    if iters is not None:
        options.update(
            {
                "train_cfg.max_iters": iters,
                "train_cfg.val_interval": iters,
                "default_hooks.logger.interval": min(iters, 20),
            }
        )
    cfg.merge_from_dict(options)
    # mmengine reuses a visualiser instance of the same name: each run gets its own, so its
    # scalars land in its own work_dir
    cfg.visualizer.name = f"mmdelta-demo-{story.name}-{task.name}-{uuid.uuid4().hex[:8]}"
    cfg.work_dir = str(out / ("base/train" if task is story.base else task.name))
    return cfg


def base_key(cfg, data_root: str) -> str:
    """What a cached base must match: the resolved base config, its data's generator
    parameters and the torch version."""
    keyed = copy.deepcopy(cfg)
    keyed.visualizer.name = ""  # unique per run (see task_config), not part of the base
    marker = (Path(data_root) / ".mmdelta-dataset.json").read_text()
    return hashlib.sha256((keyed.pretty_text + marker + torch.__version__).encode()).hexdigest()


def base_checkpoint(cfg, folder: Path, data_root: str, retrain: bool, log) -> dict:
    """The cached base (``folder/base.pth``) or a freshly trained one; returns its record."""
    key = base_key(cfg, data_root)
    record_file, checkpoint = folder / "base.json", folder / "base.pth"
    if not retrain and record_file.is_file() and checkpoint.is_file():
        record = json.loads(record_file.read_text())
        if record.get("key") == key:
            log(f"== base: cached {checkpoint} (trained in {record['train_seconds']:.0f} s)")
            return dict(record, cached=True)
        log(f"== base: {checkpoint} was trained with another config or data: retraining")
    for stale in (record_file, checkpoint):
        stale.unlink(missing_ok=True)
    shutil.rmtree(folder / "train", ignore_errors=True)  # the previous base run's logs
    log(f"== base: training {cfg.train_cfg.max_iters} iterations (cached afterwards)")
    t = time.perf_counter()
    runner = build_runner(cfg)
    model = runner.train()
    seconds = time.perf_counter() - t
    meta = dict(dataset_meta=dict(runner.train_dataloader.dataset.metainfo))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_atomic(checkpoint, lambda tmp: torch.save(dict(state_dict=state, meta=meta), tmp))
    record = dict(
        key=key,
        checkpoint=str(checkpoint),
        train_seconds=seconds,
        scalars=scalars_file(runner),
    )
    write_text_atomic(record_file, json.dumps(record, indent=2))
    return dict(record, cached=False)


def scalars_file(runner) -> str:
    """The run's training / validation scalars (mmengine's LocalVisBackend)."""
    return str(Path(runner.log_dir) / "vis_data" / "scalars.json")
