"""Build a label-free patch from unlabelled images of a new domain, by one of three methods.

    .venv/bin/python tools/adapt_label_free.py --config C --checkpoint BASE
        --images DIR_OR_FILES [...] --method {adabn,self-training,entropy}
        --out PATCH.safetensors [--rounds 1] [--score-thr T] [--trainable norm|patch]
        [--max-iters N] [--lr LR] [--max-images K] [--work-dir W] [--name NAME]
        [--cfg-options k=v ...] [--force]

* ``adabn``: the running statistics of the base's BatchNorm layers re-estimated on the
  images (``tools/adapt_norm.py``; no training; seconds).
* ``self-training``: confidence-thresholded pseudo-labels from the base with an AdaBN patch
  (the teacher, weak view: the test pipeline) written as a dataset in the config's format, then an ordinary Δ
  patch trained on them by the project's runner (student, strong view: the training
  pipeline plus photometric distortion); ``--rounds 2`` makes the patched model the next
  round's teacher. ``--config`` must be a patch recipe (a config with ``delta_patch``:
  branches, targets, schedule), e.g. ``configs/demo/det_shapes_shifted.py``. Each round
  prints what can be seen without labels (pseudo-label count, mean confidence, teacher
  entropy); stopping rule in ``docs/serving.md``.
* ``entropy`` (segmentation): the patch trained to minimise the per-pixel prediction entropy
  on the images (TENT); ``--trainable norm`` (default: the norm layers' affine parameters
  and statistics) or ``patch`` (the recipe's ``delta_patch``). Prints the mean entropy,
  confidence and predicted share per class before and after, and flags vanishing classes.

The base checkpoint is only read (checked: its SHA-256 before and after). Exit status 2 with a
message that names what to fix for a missing or empty image folder, a base config given for
self-training, an existing ``--out`` without ``--force``, a missing config or checkpoint.
"""

import argparse
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

from mmengine.config import Config, DictAction

from mmdelta.label_free import USER_ERRORS, list_images, write_norm_patch
from mmdelta.label_free.entropy import TRAINABLE, minimise_entropy
from mmdelta.label_free.self_training import self_train

METHODS = ("adabn", "self-training", "entropy")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        required=True,
        help="adabn: the base's config; self-training: a patch recipe (config with delta_patch)",
    )
    parser.add_argument("--checkpoint", required=True, help="the base checkpoint")
    parser.add_argument("--images", nargs="+", required=True, help="a folder of images, or files")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--out", required=True, help="the patch file to write (.safetensors)")
    parser.add_argument("--name", help="patch name (default: the method's)")
    parser.add_argument("--max-images", type=int, help="use the first K images only")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="self-training rounds (1)")
    parser.add_argument(
        "--score-thr",
        type=float,
        help="self-training: pseudo-label confidence threshold (det 0.7, seg 0.9)",
    )
    parser.add_argument(
        "--trainable",
        choices=TRAINABLE,
        default="norm",
        help="entropy: what trains (norm: the norm layers, TENT; patch: the recipe's patch)",
    )
    parser.add_argument(
        "--max-iters", type=int, help="self-training, entropy: iterations (the recipe's)"
    )
    parser.add_argument("--lr", type=float, help="entropy: learning rate (the recipe's)")
    parser.add_argument("--no-strong-aug", action="store_true", help="no photometric distortion")
    parser.add_argument(
        "--base-teacher", action="store_true", help="round 1's teacher: the base without AdaBN"
    )
    parser.add_argument(
        "--work-dir", help="self-training, entropy: pseudo-labels, linked images and logs"
    )
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="config overrides")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def run(args) -> Path:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if args.method == "adabn":
        return write_norm_patch(
            args.config,
            args.checkpoint,
            args.images,
            out,
            name=args.name or "adabn",
            max_images=args.max_images,
            batch_size=args.batch_size,
            cfg_options=args.cfg_options,
            force=args.force,
        )
    list_images(args.images)  # fails fast, before any model is built
    for what, path in (("config file", args.config), ("checkpoint", args.checkpoint)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what} {path} does not exist")
    recipe = Config.fromfile(args.config)
    if args.cfg_options:
        recipe.merge_from_dict(args.cfg_options)
    work_dir = (
        Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="label-free-"))
    )
    print(f"adapt_label_free: logs, linked images and checkpoints in {work_dir}")
    if args.method == "entropy":
        patch, stats = minimise_entropy(
            recipe,
            args.checkpoint,
            args.images,
            work_dir,
            name=args.name or "entropy",
            trainable=args.trainable,
            max_iters=args.max_iters,
            lr=args.lr,
            max_images=args.max_images,
            batch_size=args.batch_size,
        )
        return _deliver(patch, out, [stats.line()])
    patch, history = self_train(
        recipe,
        args.checkpoint,
        args.images,
        work_dir,
        name=args.name or "self_training",
        rounds=args.rounds,
        score_thr=args.score_thr,
        max_iters=args.max_iters,
        max_images=args.max_images,
        strong_aug=not args.no_strong_aug,
        adabn_teacher=not args.base_teacher,
        batch_size=args.batch_size,
    )
    return _deliver(patch, out, [stats.line() for stats in history])


def _deliver(patch: Path, out: Path, lines: list[str]) -> Path:
    """Copies the trained patch to ``out`` (written beside it, then renamed: never half a
    file) and prints the run's statistics."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    shutil.copyfile(patch, partial)
    os.replace(partial, out)
    for line in lines:
        print(f"adapt_label_free: {line}")
    print(f"adapt_label_free: patch -> {out} ({out.stat().st_size:,} bytes)")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except USER_ERRORS as err:
        print(f"adapt_label_free: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
