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

Per method and shift (``--methods``; needs only the cached bases; the logic is
``mmdelta.apps.label_free_methods``):

    .venv/bin/python tools/label_free_gap.py --methods adabn self-training entropy
        [--shift fog shifted] [--task det seg] [--rounds 1] [--score-thr T] [--max-iters N]

For each task and shift (``fog``: the base's scenes through haze, the realistic case;
``shifted``: the demo's strong shift): the base on its own and on the shift's test set, the
labelled reference patch (the demo's shifted-task recipe on the shift's labelled training
images; trained once, cached under ``<out>/<task>/<shift>/labelled``), then one label-free
patch per method from the shift's first 500 training images without their labels
(``entropy``: segmentation only). The last 100 training images, with their labels, are the
validation split: self-training's threshold, entropy's trainable set (norm / patch) and the
method to use are chosen there, never on the test set. Gap closed = (label-free − base) /
(labelled − base) on the shift's test set; every patch switched off is compared with the
base on the base's test set, bit for bit, and the base checkpoint's SHA-256 before and
after. Writes ``<out>/<task>/<shift>/label_free_methods.json`` and prints the README's table.
"""

import argparse
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

from mmdelta.apps.demo.stories import STORIES
from mmdelta.apps.label_free_gap import DemoOutputMissing, patch_off_identical, run_label_free_gap
from mmdelta.apps.label_free_methods import METHODS, SHIFTS, measure_shift, methods_table

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
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, help="measure these methods per --shift"
    )
    parser.add_argument("--shift", nargs="+", choices=SHIFTS, default=list(SHIFTS))
    parser.add_argument("--rounds", type=int, default=1, help="self-training rounds")
    parser.add_argument("--score-thr", type=float, help="self-training threshold")
    parser.add_argument("--max-iters", type=int, help="self-training student iterations")
    parser.add_argument("--data-dir", default=str(ROOT / "data/label_free"))
    parser.add_argument("--demo-data", default=str(ROOT / "data/demo"))
    parser.add_argument("--demo-out", default=str(ROOT / "work_dirs/demo"))
    parser.add_argument("--configs", default=str(ROOT / "configs/demo"))
    parser.add_argument("--out", default=str(ROOT / "work_dirs/label_free"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.methods:
        return _methods(args)
    try:
        options = vars(args)
        for key in (
            "methods",
            "shift",
            "rounds",
            "score_thr",
            "max_iters",
            "data_dir",
            "demo_data",
        ):
            options.pop(key)  # the flags are its parameters
        results = run_label_free_gap(options.pop("task"), **options)
    except DemoOutputMissing as err:
        raise SystemExit(str(err)) from None
    return 0 if patch_off_identical(results) else 1


def _methods(args) -> int:
    import time

    start = time.perf_counter()
    try:
        results = [
            measure_shift(
                task,
                shift,
                args.methods,
                args.out,
                data_dir=args.data_dir,
                demo_data=args.demo_data,
                demo_out=args.demo_out,
                rounds=args.rounds,
                score_thr=args.score_thr,
                max_iters=args.max_iters,
                batch_size=args.batch_size,
            )
            for shift in args.shift
            for task in args.task
        ]
    except DemoOutputMissing as err:
        raise SystemExit(str(err)) from None
    print(methods_table(results))
    print(f"({results[0]['date']}, {time.perf_counter() - start:.0f} s)")
    ok = all(run["patch_off_identical"] for r in results for run in [r["labelled"], *r["runs"]])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
