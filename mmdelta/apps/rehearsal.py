"""Rehearse the real-data configs without the real data (``tools/rehearse.py``).

The configs in ``configs/`` (``delta_*.py`` and their ``finetune_*.py`` twins) point at
PASCAL VOC, COCO, Cityscapes and ADE20K and at official model-zoo checkpoints. A rehearsal
runs them as they are, on stand-ins that have the same *formats*:

* data: :func:`mmdelta.datasets.rehearsal_data` writes tiny copies of each dataset in its
  real on-disk layout, with the real class names and ids;
* base: :func:`write_base_checkpoint` builds each base model's real architecture and class
  count (80 COCO / 150 ADE20K classes) from the checkpoint's own config, randomly
  initialised, and saves it in the official checkpoint layout (``meta`` with the old
  ``CLASSES``, ``state_dict`` with the same keys);
* :func:`rehearsal_options`: the only changes to a config, as ``--cfg-options``: every data
  root (and evaluator file under it) points at the stand-in, ``load_from`` at the stand-in
  base, image scales and crops are divided by :data:`SCALE_DIVISOR`, the schedule is cut to
  one epoch (epoch-based) or :data:`REHEARSAL_ITERS` iterations with a checkpoint at the end,
  and loaders run in the main process. Dataset wrappers, pipelines, metrics, evaluators,
  class maps, optimisers and hooks stay as written.

:func:`plan` turns one config into the commands a user would run (train, resume, test with
the patch, the twin), which ``tools/rehearse.py`` prints or runs and the slow tests run.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.logging import MMLogger

from ..datasets import rehearsal_data
from ..datasets.data_root import dotted_items, leaf_datasets, move_data_root
from ..datasets.paths import DEFAULT_EVALUATORS, DEFAULT_LOADERS
from ..fileio import write_atomic
from ..runner.cli import config_file
from ..runner.model_setup import null_pretrained
from ..version import __version__

ROOT = Path(__file__).resolve().parents[2]

#: image scales, crop sizes and the seg data preprocessor's size are divided by this
SCALE_DIVISOR = 8
#: iterations of an iteration-based schedule in a rehearsal (a checkpoint at the end)
REHEARSAL_ITERS = 2
_SCALE_KEYS = ("scale", "scales", "img_scale", "crop_size")


@dataclass(frozen=True)
class Rehearsal:
    """One real config and what rehearsing it needs.

    ``data`` / ``base_data``: keys of :func:`~mmdelta.datasets.rehearsal_data` for the new
    task's data and the base task's (the base config's test set).
    """

    config: str  # configs/delta_*.py (repository-relative)
    twin: str  # its full fine-tuning twin
    base_config: str  # the official checkpoint's own config (mmdet::… / mmseg::…)
    data: str
    base_data: str

    @property
    def name(self) -> str:
        return Path(self.config).stem


REHEARSALS = (
    Rehearsal(
        "configs/delta_faster_rcnn_voc.py",
        "configs/finetune_faster_rcnn_voc.py",
        "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
        "voc",
        "coco",
    ),
    Rehearsal(
        "configs/delta_retinanet_voc.py",
        "configs/finetune_retinanet_voc.py",
        "mmdet::retinanet/retinanet_r50_fpn_1x_coco.py",
        "voc",
        "coco",
    ),
    Rehearsal(
        "configs/delta_mask_rcnn_convnext-t_cityscapes.py",
        "configs/finetune_mask_rcnn_convnext-t_cityscapes.py",
        "mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py",
        "cityscapes",
        "coco",
    ),
    Rehearsal(
        "configs/delta_deeplabv3_r50-d8_ade20k-to-cityscapes.py",
        "configs/finetune_deeplabv3_r50-d8_ade20k-to-cityscapes.py",
        "mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-160k_ade20k-512x512.py",
        "cityscapes",
        "ade20k",
    ),
    Rehearsal(
        "configs/delta_upernet_convnext-t_ade20k-to-cityscapes.py",
        "configs/finetune_upernet_convnext-t_ade20k-to-cityscapes.py",
        "mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py",
        "cityscapes",
        "ade20k",
    ),
)


def rehearsal(config: str | Path) -> Rehearsal:
    """The :class:`Rehearsal` of ``config`` (a path or a file name in ``configs/``)."""
    name = Path(config).stem
    for r in REHEARSALS:
        if name in (r.name, Path(r.twin).stem):
            return r
    raise KeyError(f"{config}: no rehearsal; rehearsed configs: {[r.config for r in REHEARSALS]}")


# --------------------------------------------------------------------------- base checkpoints


def _base_classes(cfg: Config) -> tuple[list[str], list | None]:
    """The classes (and seg palette) a checkpoint of ``cfg.model`` was trained with: the
    patch's ``base_classes`` for a Δ config, else the test dataset's (its ``metainfo`` or its
    class's ``METAINFO``)."""
    base_classes = (cfg.get("delta_patch") or {}).get("base_classes")
    registry = importlib.import_module(f"{cfg.default_scope}.registry").DATASETS
    dataset = cfg.test_dataloader.dataset
    while "dataset" in dataset:  # wrappers
        dataset = dataset.dataset
    meta = dict(registry.get(dataset.type).METAINFO)
    meta.update(dataset.get("metainfo") or {})
    palette = meta.get("palette")
    classes = list(base_classes or meta["classes"])
    if palette is not None and len(palette) != len(classes):
        palette = None
    return classes, (None if palette is None else [list(c) for c in palette])


def write_base_checkpoint(config: str | Path, path: str | Path, seed: int = 0) -> Path:
    """A stand-in for the official checkpoint of ``config``'s model: its real architecture
    and class count, randomly initialised with ``seed``, in the layout the model zoo
    publishes (``{'meta': {<pkg>_version, CLASSES[, PALETTE], config, …}, 'state_dict'}``: the
    pre-mmengine ``meta`` form with ``CLASSES``, not ``dataset_meta``). ``config``: the
    checkpoint's own config (``mmdet::…``) or a Δ config (its model is the base). Written
    atomically; an existing ``path`` built from the same config and seed is reused.
    """
    from mmengine.registry import MODELS, init_default_scope

    path = Path(path)
    stamp = dict(config=str(config), seed=seed, mmdelta_version=__version__)
    if path.is_file():
        meta = torch.load(path, map_location="cpu", weights_only=False).get("meta", {})
        if meta.get("mmdelta_rehearsal") == stamp:
            return path
    cfg = Config.fromfile(config_file(config))
    model_cfg = copy.deepcopy(cfg.model)
    null_pretrained(model_cfg)  # random weights: nothing is downloaded
    init_default_scope(cfg.default_scope)
    torch.manual_seed(seed)
    model = MODELS.build(model_cfg)
    with _quiet_logger():  # init_weights logs every parameter
        model.init_weights()
    classes, palette = _base_classes(cfg)
    package = cfg.default_scope
    meta = {
        f"{package}_version": {"mmdet": "2.0.0", "mmseg": "0.5.0"}.get(package, "1.0.0"),
        "CLASSES": classes,
        "config": cfg.pretty_text,
        "mmdelta_rehearsal": stamp,
    }
    if palette is not None:
        meta["PALETTE"] = palette
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_atomic(path, lambda tmp: torch.save({"meta": meta, "state_dict": state}, tmp))
    return path


@contextlib.contextmanager
def _quiet_logger():
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------- cfg-options


def _shrunk(value):
    if isinstance(value, int | float) and not isinstance(value, bool):
        return max(8, int(value) // SCALE_DIVISOR)
    if isinstance(value, list | tuple):
        return type(value)(_shrunk(v) for v in value)
    return value


def rehearsal_options(
    cfg: Config,
    data_root: str | Path,
    checkpoint: str | Path | None = None,
    *,
    loaders: tuple[str, ...] = DEFAULT_LOADERS,
    evaluators: tuple[str, ...] = DEFAULT_EVALUATORS,
    epochs: int = 1,
    iters: int = REHEARSAL_ITERS,
    validate: bool = True,
    save: bool = True,
) -> dict[str, object]:
    """The ``--cfg-options`` that rehearse ``cfg`` on the stand-in data at ``data_root``.

    Every leaf dataset of ``loaders`` gets ``data_root``; every string under them or under
    ``evaluators`` that starts with a dataset's old root (``CocoMetric.ann_file``,
    ``CityScapesMetric.seg_prefix``) is moved with it. Image scales and crops in the
    pipelines, ``model.data_preprocessor.size`` and a sliding-window ``model.test_cfg`` are
    divided by :data:`SCALE_DIVISOR`. The schedule: ``epochs`` epochs (epoch-based loops) or
    ``iters`` iterations, with one validation at the end (none: ``validate=False``, which
    moves ``train_cfg.val_begin`` past the end) and the checkpoint the config's hook saves
    there (none: ``save=False``); loaders use no worker processes. ``checkpoint`` replaces
    ``load_from``.
    """
    options: dict[str, object] = dict(
        move_data_root(copy.deepcopy(cfg), str(data_root), loaders, evaluators)
    )
    for loader in loaders:
        if cfg.get(loader) is None:
            continue
        options[f"{loader}.num_workers"] = 0
        options[f"{loader}.persistent_workers"] = False
        for key, dataset in leaf_datasets(cfg[loader]["dataset"], f"{loader}.dataset"):
            for step_key, value in dotted_items(dataset.get("pipeline", []), f"{key}.pipeline"):
                if step_key.rsplit(".", 1)[-1] in _SCALE_KEYS:
                    options[step_key] = _shrunk(value)
    model = cfg.get("model", {})
    if model.get("data_preprocessor", {}).get("size") is not None:
        options["model.data_preprocessor.size"] = _shrunk(model.data_preprocessor.size)
    test_cfg = model.get("test_cfg") or {}
    if test_cfg.get("mode") == "slide":
        options["model.test_cfg.crop_size"] = _shrunk(test_cfg.crop_size)
        options["model.test_cfg.stride"] = _shrunk(test_cfg.stride)
    if "train_dataloader" in loaders and cfg.get("train_cfg") is not None:
        by_epoch = (
            cfg.train_cfg.get("type") == "EpochBasedTrainLoop" or "max_epochs" in cfg.train_cfg
        )
        end = epochs if by_epoch else iters
        options["train_cfg.max_epochs" if by_epoch else "train_cfg.max_iters"] = end
        options["train_cfg.val_interval"] = end
        if not validate:  # (mmengine's loops always validate at the end from val_begin on)
            options["train_cfg.val_begin"] = end + 1
        if not save:  # (CheckpointHook's save_last saves the end whatever the interval)
            options["default_hooks.checkpoint.save_last"] = False
            options["default_hooks.checkpoint.interval"] = end + 1
    if checkpoint is not None:
        options["load_from"] = str(checkpoint)
    return options


def keep_every_box(cfg: Config) -> dict[str, float]:
    """``--cfg-options`` that set every ``score_thr`` of ``cfg.model.test_cfg`` to 0: a
    random base scores each of 80 classes near 1/81, below the configs' 0.05, and would
    predict nothing (``CocoMetric`` then returns no metric at all)."""
    test_cfg = cfg.get("model", {}).get("test_cfg") or {}
    return {
        key: 0.0
        for key, _ in dotted_items(test_cfg, "model.test_cfg")
        if key.endswith(".score_thr")
    }


def _cli_value(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, list | tuple):
        inner = ",".join(_cli_value(v) for v in value)
        return (
            f"[{inner}]"
            if isinstance(value, list)
            else f"({inner}{',' if len(value) == 1 else ''})"
        )
    return str(value)


def cli_options(options: Mapping[str, object]) -> list[str]:
    """``options`` as ``--cfg-options`` arguments (``key=value``, as ``DictAction`` parses)."""
    return [f"{k}={_cli_value(v)}" for k, v in options.items()]


# --------------------------------------------------------------------------- plans


@dataclass
class Plan:
    """The commands that rehearse one real config (``argv`` lists, run from ``work``)."""

    rehearsal: Rehearsal
    base_checkpoint: Path
    work: Path
    commands: dict[str, list[str]] = field(default_factory=dict)

    @property
    def patch_file(self) -> Path:
        return self.work / "delta" / f"{_patch_name(self.rehearsal.config)}.patch.safetensors"

    def shell(self, step: str) -> str:
        return shlex.join(self.commands[step])


def _patch_name(config: str) -> str:
    return Config.fromfile(str(ROOT / config)).delta_patch.get("name", "delta")


def prepare(
    out: str | Path, rehearsals: tuple[Rehearsal, ...] = REHEARSALS, seed: int = 0
) -> tuple[dict[str, str], dict[str, Path]]:
    """Writes (or reuses) the stand-in data under ``out/data`` and a base checkpoint per
    base config of ``rehearsals`` under ``out/checkpoints``; returns ``(data roots,
    {base config: checkpoint})``."""
    out = Path(out)
    roots = rehearsal_data(out / "data")
    checkpoints = {}
    for r in rehearsals:
        name = Path(config_file(r.base_config)).stem
        checkpoints[r.base_config] = write_base_checkpoint(
            r.base_config, out / "checkpoints" / f"{name}.pth", seed
        )
    return roots, checkpoints


def plan(r: Rehearsal, roots: Mapping[str, str], checkpoint: Path, work: str | Path) -> Plan:
    """The train / resume / test / twin / base-task commands of ``r``, run in ``work``."""
    work = Path(work)
    python, tools = sys.executable, ROOT / "tools"
    cfg = Config.fromfile(str(ROOT / r.config))
    first = rehearsal_options(cfg, roots[r.data], checkpoint)
    # resume: one more epoch / REHEARSAL_ITERS more iterations (the validation was rehearsed)
    extended = rehearsal_options(
        cfg, roots[r.data], checkpoint, epochs=2, iters=2 * REHEARSAL_ITERS, validate=False
    )
    # the twin: one epoch of the tiny data, or one iteration; it trains, nothing more
    twin = rehearsal_options(
        Config.fromfile(str(ROOT / r.twin)),
        roots[r.data],
        checkpoint,
        iters=1,
        validate=False,
        save=False,
    )
    base_cfg = Config.fromfile(config_file(r.base_config))
    base = rehearsal_options(
        base_cfg, roots[r.base_data], loaders=("test_dataloader",), evaluators=("test_evaluator",)
    )
    base.update(keep_every_box(base_cfg))
    delta_dir = work / "delta"
    p = Plan(r, checkpoint, work)
    p.commands = {
        "train": [
            python,
            str(tools / "train.py"),
            str(ROOT / r.config),
            "--work-dir",
            str(delta_dir),
            "--cfg-options",
            *cli_options(first),
        ],
        "resume": [
            python,
            str(tools / "train.py"),
            str(ROOT / r.config),
            "--work-dir",
            str(delta_dir),
            "--resume",
            "--cfg-options",
            *cli_options(extended),
        ],
        "test": [
            python,
            str(tools / "test.py"),
            str(ROOT / r.config),
            str(checkpoint),
            "--patch",
            str(p.patch_file),
            "--work-dir",
            str(work / "test"),
            "--metrics-out",
            str(work / "test" / "metrics.json"),
            "--cfg-options",
            *cli_options(first),
        ],
        "twin": [
            python,
            str(tools / "train.py"),
            str(ROOT / r.twin),
            "--work-dir",
            str(work / "twin"),
            "--cfg-options",
            *cli_options(twin),
        ],
        "base": [
            python,
            str(tools / "test.py"),
            r.base_config,
            str(checkpoint),
            "--work-dir",
            str(work / "base"),
            "--metrics-out",
            str(work / "base" / "metrics.json"),
            "--out",
            str(work / "base" / "predictions.pkl"),
            "--cfg-options",
            *cli_options(base),
        ],
    }
    return p


def benchmark_command(
    r: Rehearsal, roots: Mapping[str, str], checkpoint: Path, out: str | Path, iters: int = 4
) -> list[str]:
    """``tools/benchmark.py`` on the stand-ins of ``r`` (``roots``: the larger stand-ins,
    ``rehearsal_data(…, larger=True)``; a short protocol: ``iters`` iterations per run, one
    lr per method, one seed, no equal-time rows, a quarter of the training images held out
    as the validation split)."""

    def shrink(cfg: Config, root: str, loaders: tuple[str, ...]) -> dict[str, object]:
        keep = (*_SCALE_KEYS, "size", "num_workers", "persistent_workers")
        options = rehearsal_options(cfg, root, loaders=loaders, evaluators=())
        return {k: v for k, v in options.items() if k.rsplit(".", 1)[-1] in keep}

    task = shrink(Config.fromfile(str(ROOT / r.config)), roots[r.data], DEFAULT_LOADERS)
    base = shrink(
        Config.fromfile(config_file(r.base_config)), roots[r.base_data], ("test_dataloader",)
    )
    return [
        sys.executable,
        str(ROOT / "tools" / "benchmark.py"),
        "--config", str(ROOT / r.config),
        "--checkpoint", str(checkpoint),
        "--base-config", r.base_config,
        "--finetune-config", str(ROOT / r.twin),
        "--data-root", roots[r.data],
        "--base-data-root", roots[r.base_data],
        "--iters", str(iters),
        "--val-fraction", "0.25",
        "--lr-scales", "1",
        "--seeds", "1",
        "--no-equal-time",
        "--cost-repeats", "1",
        "--latency-images", "2",
        "--out", str(out),
        "--cfg-options", *cli_options(task),
        "--base-cfg-options", *cli_options(base),
    ]  # fmt: skip
