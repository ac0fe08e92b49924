"""A label-free patch file from a config, a base checkpoint and unlabelled images (what
``tools/adapt_norm.py`` runs): the inputs checked before the model is built, the plain base
loaded (``delta_patch`` ignored), :func:`~mmdelta.label_free.adapt_norm_stats` run on the
images and the patch written atomically."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mmengine.config import Config

from ..apis import init_base_model
from ..datasets.images import list_images
from ..patching import save_patch
from .norm_stats import adapt_norm_stats, stats_layers


def write_norm_patch(
    config: str | os.PathLike,
    checkpoint: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    name: str = "adabn",
    max_images: int | None = None,
    batch_size: int = 4,
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    cfg_options: dict | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Writes the label-free patch ``name`` of ``config``'s base (``checkpoint``) adapted on
    ``images`` (folders and/or image files; the first ``max_images`` only) to ``out``; logs
    one line; returns ``out``. An existing ``out`` is replaced only with ``force``.

    Raises:
        FileExistsError, IsADirectoryError, ValueError: bad arguments (before any work).
        NoImagesError: a missing or empty image folder, or a file that is not an image.
        FileNotFoundError: no config or checkpoint there.
        LabelFreeError, DeltaPatchConfigError, CheckpointError: as their messages say.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; name the patch file to write")
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be ≥ 1, got {max_images}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {batch_size}")
    files = list_images(images)  # fails fast, before the model is built
    if max_images is not None:
        files = files[:max_images]
    if not Path(config).is_file():
        raise FileNotFoundError(f"config file {config} does not exist")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    cfg = Config.fromfile(str(config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    model = init_base_model(cfg, str(checkpoint))
    layers = stats_layers(model, targets, exclude)
    start = time.perf_counter()
    name = adapt_norm_stats(
        model, files, name=name, targets=targets, exclude=exclude, cfg=cfg, batch_size=batch_size
    )
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    save_patch(model, out, name, overwrite=force)
    log(
        f"adapt_norm: patch {name!r}: running statistics of {len(layers)} normalisation "
        f"layer(s) re-estimated on {len(files)} unlabelled image(s) in {seconds:.1f} s -> "
        f"{out} ({out.stat().st_size:,} bytes)"
    )
    return out
