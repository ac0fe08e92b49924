"""Where the benchmark's task comes from: the embedded appearance-shift task of the main job
(generated data, the cached base) or a user's real configs and data."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

from mmengine.config import Config

from ...datasets.data_root import move_data_root
from ...datasets.paths import DEFAULT_LOADERS, check_dataset_paths
from ...runner.cli import config_file
from ..demo.preparation import base_checkpoint, task_config, write_task_data
from ..demo.stories import SIZES, STORIES
from .methods import BenchmarkError
from .run import Setting


def embedded_setting(
    story: str = "det",
    size: str = "full",
    data: str | Path = "data/demo",
    configs: str | Path = "configs/demo",
    base_dir: str | Path = "work_dirs/demo/det",
    log: Callable[[str], None] = print,
) -> Setting:
    """The main job's appearance-shift task of ``story`` (head shared with the base): its
    generated data (cached), the base trained once and cached under ``base_dir/base`` (the
    demo's cache: same key, same file) and the shift task's patch config."""
    st, sz = STORIES[story], SIZES[size]
    configs, data, base_dir = Path(configs), Path(data), Path(base_dir)
    task = next(t for t in st.tasks if t.same_classes)
    roots = {t.name: write_task_data(st, t, sz, data) for t in (st.base, task)}
    base_cfg = task_config(st, st.base, configs, roots[st.base.name], sz, base_dir)
    base = base_checkpoint(base_cfg, base_dir / "base", roots[st.base.name], False, log)
    task_cfg = task_config(st, task, configs, roots[task.name], sz, base_dir)
    task_cfg.load_from = base["checkpoint"]
    return Setting(
        name=f"{st.name}_{task.name}",
        title=f"{st.title}: {task.title}",
        task_cfg=task_cfg,
        checkpoint=base["checkpoint"],
        base_cfg=base_cfg,
        metric_key=st.metric_key,
        metric_label=st.metric_label,
    )


def _load(path: str | Path, what: str, cfg_options: dict | None) -> Config:
    file = config_file(path)
    if not Path(file).is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist ({file})")
    cfg = Config.fromfile(file)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def real_setting(
    config: str | Path,
    checkpoint: str | None = None,
    base_config: str | Path | None = None,
    finetune_config: str | Path | None = None,
    data_root: str | None = None,
    base_data_root: str | None = None,
    metric: str | None = None,
    cfg_options: dict | None = None,
    base_cfg_options: dict | None = None,
) -> Setting:
    """A user's task: ``config`` is the Δ training config of the new task (``delta_patch`` =
    the default to compare, ``load_from`` = the base unless ``checkpoint``), ``base_config``
    the base's own config (its test set scores the base task), ``finetune_config`` the full
    fine-tuning config (required when the patch has its own classes). ``data_root`` /
    ``base_data_root`` replace the datasets' roots. Missing data is reported before any
    training starts."""
    task_cfg = _load(config, "--config", cfg_options)
    if task_cfg.get("delta_patch") is None:
        raise BenchmarkError(
            f"--config {config} has no `delta_patch`: pass the Δ training config of the new "
            "task (its delta_patch is the default compared), e.g. configs/delta_faster_rcnn_voc.py"
        )
    checkpoint = checkpoint or task_cfg.get("load_from")
    if not checkpoint:
        raise BenchmarkError(f"{config} has no load_from: pass --checkpoint (the base)")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"base checkpoint {checkpoint!r} does not exist (download it or pass --checkpoint)"
        )
    task_cfg.load_from = checkpoint
    # the base config is another task (its own datasets, pipelines, evaluators): the new
    # task's overrides would address keys it does not have
    base_cfg = _load(base_config, "--base-config", base_cfg_options) if base_config else None
    finetune_cfg = (
        _load(finetune_config, "--finetune-config", cfg_options) if finetune_config else None
    )
    for cfg, root in ((task_cfg, data_root), (finetune_cfg, data_root), (base_cfg, base_data_root)):
        if cfg is not None and root:
            # the datasets' roots and the evaluator paths written out under them
            moved = move_data_root(cfg, root)
            for key in DEFAULT_LOADERS:
                if cfg.get(key) is not None and not any(k.startswith(f"{key}.") for k in moved):
                    raise BenchmarkError(f"--data-root: {cfg.filename}'s {key} has no data_root")
    check_dataset_paths(task_cfg)
    if base_cfg is not None:
        check_dataset_paths(base_cfg, ("test_dataloader",), ("test_evaluator",))
    if task_cfg.delta_patch.get("classes") is not None and finetune_cfg is None:
        raise BenchmarkError(
            f"{config}'s patch has its own classes: full fine-tuning needs its own config with "
            "those classes; pass --finetune-config (e.g. configs/finetune_faster_rcnn_voc.py)"
        )
    name = Path(config).stem
    return Setting(
        name=name,
        title=name,
        task_cfg=task_cfg,
        checkpoint=str(checkpoint),
        base_cfg=base_cfg,
        finetune_cfg=copy.deepcopy(finetune_cfg),
        metric_key=metric,
        metric_label=metric,
    )
