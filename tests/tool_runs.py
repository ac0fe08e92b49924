"""Running the project's tools in subprocesses, as a user would, for the end-to-end tests."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

from mmdelta.runner import read_checkpoint

TESTS = Path(__file__).resolve().parent


def run_tool(*args, check=True, launcher=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [*(launcher or [sys.executable]), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def derived_config(tmp: Path, name: str, base: Path, extra: str) -> Path:
    """A config inheriting ``base`` (by absolute path) plus ``extra`` lines."""
    path = tmp / f"{name}.py"
    path.write_text(f"_base_ = {str(base)!r}\n{extra}\n")
    return path


def data_options(root: Path) -> list[str]:
    return [f"{split}_dataloader.dataset.data_root={root}" for split in ("train", "val", "test")]


def write_base_checkpoint(config: Path, path: Path, classes) -> Path:
    """An mmengine-style checkpoint of the config's model (random weights) with its classes."""
    cfg = Config.fromfile(str(config))
    init_default_scope(cfg.default_scope)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    torch.save(
        {"meta": {"dataset_meta": {"classes": classes}}, "state_dict": model.state_dict()}, path
    )
    return path


def predictions(path: Path) -> list:
    with open(path, "rb") as f:  # written by this test's own tools/test.py run
        return pickle.load(f)


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if hasattr(a, "shape"):  # numpy
        return a.shape == b.shape and (a == b).all()
    return a == b


def base_part(checkpoint: Path) -> dict:
    state = read_checkpoint(str(checkpoint))["state_dict"]
    return {k: v for k, v in state.items() if ".delta." not in k}
