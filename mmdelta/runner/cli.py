"""What ``tools/train.py`` and ``tools/test.py`` share: config loading and runner choice."""

import os
import os.path as osp
from pathlib import Path

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .delta_runner import PATCH_FILE_KEY, DeltaRunner


def config_file(path: str | Path) -> str:
    """``path``, or the installed file a ``package::relative/path.py`` name stands for
    (``mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py``: mmdet's own configs, as
    ``_base_`` names them)."""
    if "::" not in str(path):
        return str(path)
    from mmengine.config.utils import _get_package_and_cfg_path
    from mmengine.utils import get_installed_path

    try:
        package, relative = _get_package_and_cfg_path(str(path))
    except ValueError as err:
        raise FileNotFoundError(f"config {str(path)!r}: {err}") from err
    return str(Path(get_installed_path(package)) / ".mim" / "configs" / relative)


def load_config(path: str, cfg_options: dict | None, work_dir: str | None, launcher: str):
    """The config at ``path`` (a file, or ``mmdet::…`` / ``mmseg::…`` for an installed one)
    with command-line overrides; ``work_dir`` defaults as upstream."""
    file = config_file(path)
    if not osp.isfile(file):
        raise SystemExit(
            f"config file {path!r} does not exist" + (f" ({file})" if file != path else "")
        )
    cfg = Config.fromfile(file)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(file))[0])
    return cfg


def set_local_rank(local_rank: int) -> None:
    os.environ.setdefault("LOCAL_RANK", str(local_rank))


def resolve_resume(cfg, resume: str | None) -> None:
    """``--resume`` (latest checkpoint of the work_dir) or ``--resume PATH``.

    Unlike upstream, ``--resume`` without a checkpoint in the work_dir keeps ``load_from``
    (the base) and starts afresh, instead of silently starting from an unloaded base.
    """
    if resume is None:
        return
    if resume != "auto":
        cfg.resume, cfg.load_from = True, resume
        return
    last = osp.join(cfg.work_dir, "last_checkpoint")
    if osp.exists(last):
        with open(last) as f:
            cfg.resume, cfg.load_from = True, f.read().strip()
    else:
        print(f"mmdelta: nothing to resume in {cfg.work_dir}; starting from the base")


def _fp32_without_gpu(cfg) -> None:
    """``AmpOptimWrapper`` asserts a GPU (the ConvNeXt zoo configs use it): without one the
    config trains with ``OptimWrapper`` in fp32, and says so."""
    wrapper = cfg.get("optim_wrapper")
    if (
        wrapper is None
        or torch.cuda.is_available()
        or str(wrapper.get("type", "")).split(".")[-1] != "AmpOptimWrapper"
    ):
        return
    for key in ("loss_scale", "dtype", "use_fsdp"):
        wrapper.pop(key, None)
    wrapper["type"] = "OptimWrapper"
    print_log("mmdelta: AmpOptimWrapper needs a GPU; training in fp32 with OptimWrapper")


def add_tta(cfg) -> None:
    """Wraps the model in the config's ``tta_model`` and uses its ``tta_pipeline``."""
    missing = [k for k in ("tta_model", "tta_pipeline") if k not in cfg]
    if missing:
        raise SystemExit(f"--tta needs {' and '.join(missing)} in the config")
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def build_runner(cfg) -> Runner:
    """``DeltaRunner`` when the config carries a patch; otherwise what upstream would build
    (on a machine without a GPU, an ``AmpOptimWrapper`` trains in fp32, as DeltaRunner's)."""
    if cfg.get("delta_patch") is not None or cfg.get(PATCH_FILE_KEY):
        cfg.pop("runner_type", None)
        return DeltaRunner.from_cfg(cfg)
    _fp32_without_gpu(cfg)
    if "runner_type" in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)
