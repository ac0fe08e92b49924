"""Build a label-free patch (AdaBN) from unlabelled images of a new environment.

    .venv/bin/python tools/adapt_norm.py --config C --checkpoint BASE
        --images DIR_OR_FILES [...] --out PATCH.safetensors [--name adabn]
        [--max-images K] [--batch-size B] [--targets GLOB ...] [--exclude GLOB ...]
        [--cfg-options k=v ...] [--force]

Loads the plain base of ``--config`` from ``--checkpoint`` (every key checked; the config's
``delta_patch``, if any, is ignored), reads the images (a folder's .jpg/.jpeg/.png/.bmp
files, or image files) through the config's test pipeline without its annotation loading,
re-estimates the running statistics of every BatchNorm under the targets on them
(``mmdelta.label_free.adapt_norm_stats``: no labels, no gradients, the base unchanged) and
writes the patch atomically. Use it like any patch::

    model = mmdelta.apis.init_patched_model(C, BASE, patch="PATCH.safetensors")

An existing ``--out`` is replaced only with ``--force``. Exit status 2 with a message that
names the problem for: a missing or empty image folder, a model without BatchNorm layers
under the targets, a bad checkpoint or config.
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

from mmengine.config import Config, DictAction

from mmdelta import DeltaPatchConfigError, save_patch
from mmdelta.apis import init_base_model
from mmdelta.label_free import (
    LabelFreeError,
    NoImagesError,
    adapt_norm_stats,
    list_images,
    stats_layers,
)
from mmdelta.runner.checkpoint import CheckpointError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the base model's mmdet / mmseg config")
    parser.add_argument("--checkpoint", required=True, help="the base checkpoint")
    parser.add_argument(
        "--images", nargs="+", required=True, help="a folder of images, or image files"
    )
    parser.add_argument("--out", required=True, help="the patch file to write (.safetensors)")
    parser.add_argument("--name", default="adabn", help="patch name (default: adabn)")
    parser.add_argument("--max-images", type=int, help="use the first K images only")
    parser.add_argument("--batch-size", type=int, default=4, help="images per batch (4)")
    parser.add_argument("--targets", nargs="+", help="module globs (default: backbone, neck, …)")
    parser.add_argument("--exclude", nargs="+", default=[], help="module globs to leave out")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="config overrides")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def run(args) -> Path:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; name the patch file to write")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be ≥ 1, got {args.max_images}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    files = list_images(args.images)  # fails fast, before the model is built
    if args.max_images is not None:
        files = files[: args.max_images]
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"config file {args.config} does not exist")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    model = init_base_model(cfg, args.checkpoint)
    layers = stats_layers(model, args.targets, args.exclude)
    start = time.perf_counter()
    name = adapt_norm_stats(
        model,
        files,
        name=args.name,
        targets=args.targets,
        exclude=args.exclude,
        cfg=cfg,
        batch_size=args.batch_size,
    )
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    save_patch(model, out, name, overwrite=args.force)
    print(
        f"adapt_norm: patch {name!r}: running statistics of {len(layers)} normalisation "
        f"layer(s) re-estimated on {len(files)} unlabelled image(s) in {seconds:.1f} s -> "
        f"{out} ({out.stat().st_size:,} bytes)"
    )
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (
        LabelFreeError,
        NoImagesError,
        DeltaPatchConfigError,
        CheckpointError,
        FileNotFoundError,
        FileExistsError,
        IsADirectoryError,
        ValueError,
    ) as err:
        print(f"adapt_norm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
