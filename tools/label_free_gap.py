"""How much of the labelled patch's gain a label-free (AdaBN) patch recovers, on the main job's
appearance-shift task.

    .venv/bin/python tools/label_free_gap.py [--task det seg] [--max-images 64 600]
        [--batch-size 4] [--demo-out work_dirs/demo] [--out work_dirs/label_free]

Uses what ``tools/demo.py`` left (it never trains a base): the cached base
``<demo-out>/<task>/base/base.pth``, the labelled shift patch's score from
``<demo-out>/<task>/report.json`` and the generated data it names. Per task:

1. the base on its own test set (kept for the exactness check) and on the shifted test set;
2. for each ``--max-images`` K: a label-free patch from the first K shifted *training*
   images, read without their labels (``mmdelta.label_free.adapt_norm_stats``), scored on
   the shifted test set; with the patch off, the base test set's predictions compared with
   the base's, bit for bit; the patch saved as ``<out>/<task>/adabn_<K>.safetensors``;
3. gap closed = (label-free − base) / (labelled − base) on the shifted test set.

Writes ``<out>/<task>/label_free_gap.json`` and prints a Markdown table (the README's);
the logic is ``mmdelta.apps.label_free_gap``.
"""

import argparse
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

from mmdelta.apps.demo.stories import STORIES
from mmdelta.apps.label_free_gap import DemoOutputMissing, patch_off_identical, run_label_free_gap

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", nargs="+", choices=sorted(STORIES), default=["det", "seg"])
    parser.add_argument(
        "--max-images",
        nargs="+",
        type=int,
        default=[600],
        help="unlabelled images per label-free patch (one patch per value; default 600 = all)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--own-domain-check",
        action="store_true",
        help="also adapt on the base's own training images (as many as the largest "
        "--max-images) and score on the base test set: a sanity check of the statistics "
        "pass (it should about keep the base's score)",
    )
    parser.add_argument("--demo-out", default=str(ROOT / "work_dirs/demo"))
    parser.add_argument("--configs", default=str(ROOT / "configs/demo"))
    parser.add_argument("--out", default=str(ROOT / "work_dirs/label_free"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        options = vars(args)  # the flags are its parameters
        results = run_label_free_gap(options.pop("task"), **options)
    except DemoOutputMissing as err:
        raise SystemExit(str(err)) from None
    return 0 if patch_off_identical(results) else 1


if __name__ == "__main__":
    sys.exit(main())
