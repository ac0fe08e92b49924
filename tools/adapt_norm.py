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
under the targets, a bad checkpoint or config. The logic is
``mmdelta.label_free.write_norm_patch``.
"""

import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

from mmengine.config import DictAction

from mmdelta.label_free import USER_ERRORS, write_norm_patch


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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        write_norm_patch(**vars(args))  # the flags are its parameters
    except USER_ERRORS as err:
        print(f"adapt_norm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
