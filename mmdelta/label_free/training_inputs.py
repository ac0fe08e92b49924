"""What the trained label-free methods (``self_training``, ``entropy``) share: reading a
patch recipe, the base checkpoint and the unlabelled images, checking that the base file
never changes, predicting over the images, linking images into generated datasets, and
turning a recipe into a training-only run."""

from __future__ import annotations

import copy
import hashlib
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..datasets.images import list_images
from .norm_stats import LabelFreeError, unlabelled_loader


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def require_recipe(cfg, method: str, example: str) -> None:
    """Raises :class:`LabelFreeError` unless ``cfg`` is a patch recipe (has ``delta_patch``)."""
    if cfg.get("delta_patch") is None:
        raise LabelFreeError(
            f"{method} trains a Δ patch: pass a patch recipe config (one with a `delta_patch` "
            f"key, e.g. {example}), not a base config"
        )


@dataclass
class TrainingInputs:
    """A label-free training run's inputs, checked: ``recipe`` (with ``delta_patch``),
    ``base_cfg`` (the recipe without it: the base's config), the image ``files``, the base
    ``checkpoint`` and its SHA-256 when read."""

    recipe: object
    base_cfg: object
    files: list[Path]
    checkpoint: Path
    base_sha: str

    def check_base_unchanged(self) -> None:
        if file_sha256(self.checkpoint) != self.base_sha:
            raise RuntimeError(f"the base checkpoint {self.checkpoint} changed")  # a bug

    @classmethod
    def read(
        cls,
        recipe,
        checkpoint: str | os.PathLike,
        images: str | os.PathLike | Sequence[str | os.PathLike],
        max_images: int | None,
        method: str,
        example: str,
    ) -> TrainingInputs:
        """``recipe``: a Config or its file. Raises :class:`LabelFreeError` for a base config,
        ``NoImagesError`` for no images, ``FileNotFoundError`` for no checkpoint."""
        from mmengine.config import Config

        if not isinstance(recipe, Config):
            recipe = Config.fromfile(str(recipe))
        require_recipe(recipe, method, example)
        files = list_images(images)
        if max_images is not None:
            files = files[:max_images]
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"base checkpoint {checkpoint} does not exist")
        base_cfg = copy.deepcopy(recipe)
        base_cfg.pop("delta_patch")
        return cls(recipe, base_cfg, files, checkpoint, file_sha256(checkpoint))


@torch.no_grad()
def predict(model, cfg, files: Sequence[Path], batch_size: int) -> Iterator:
    """``model``'s output samples over ``files`` (eval mode, the config's test pipeline
    without annotation loading)."""
    model.eval()
    for batch in unlabelled_loader(cfg, list(files), batch_size=batch_size):
        yield from model.test_step(batch)


def link(src: Path, dst: Path) -> None:
    """``dst`` becomes a symbolic link to ``src`` (resolved), replacing what was there."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    os.symlink(Path(src).resolve(), dst)


def training_only(cfg, max_iters: int | None, name: str) -> None:
    """In place: ``cfg`` trains without validation (its val loader, loop and evaluator
    removed), for ``max_iters`` iterations if given (scheduler ends clipped to it, one
    checkpoint at the end), with a visualizer instance named ``name`` plus a unique suffix."""
    if max_iters is not None:
        cfg.train_cfg.max_iters = max_iters
        for s in cfg.get("param_scheduler", []):
            if s.get("end", 0) > max_iters:
                s["end"] = max_iters
        cfg.default_hooks.checkpoint.interval = max_iters
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.train_cfg.val_interval = cfg.train_cfg.max_iters + 1
    cfg.visualizer.name = f"{name}-{uuid.uuid4().hex[:8]}"
