"""Benchmark Δ-Patching against full fine-tuning, head-only, norm-only, LoRA-conv and PAINT.

Embedded task (generated data, the demo's cached base; offline, CPU):

    .venv/bin/python tools/benchmark.py [--story det|seg] [--size full|tiny] [--out DIR]

Real data (a Δ training config of the new task, e.g. configs/delta_faster_rcnn_voc.py):

    .venv/bin/python tools/benchmark.py --config DELTA_CONFIG [--checkpoint BASE.pth]
        [--base-config BASE_CONFIG] [--finetune-config FT_CONFIG] [--data-root DIR]
        [--base-data-root DIR] [--metric KEY] [--cfg-options …] [--base-cfg-options …]

Every method trains from the same base with the config's schedule (its own delta_patch is
Δ-Patching's default; variants change placement by stage, branch type and rank one at a
time). The protocol chooses nothing on the test set:

* validation split: --val-fraction of the new task's training images (a stable hash of each
  image's path, --split-seed; mmdelta.datasets.TrainValSplit) is held out; every method
  trains on the rest (*fit*) and is scored on the held-out *val* part (the test pipeline).
  A val image that is also a test image stops the run.
* lr chosen on validation for every method: full fine-tuning trains at each --ft-lr, each
  patch method at each of --lr-scales × the config's lr; the best val metric is kept and
  only that run is scored on the test sets (new task; base task with the patch off, checked
  prediction by prediction; inference latency unmerged / merged vs the base).
* seeds: the top rows (full_ft, delta, delta_fast where present) are retrained at the chosen
  lr with --seeds seeds (randomness.seed 0, 1, …): test mean, min, max and every seed.
* equal wall-clock: the top rows train once more for round(iters × full_ft step time / their
  step time) iterations (at most --equal-time-cap × iters; the schedule stretched alike);
  --no-equal-time skips it.
* costs side by side (step time, peak memory: a fresh process per method and repeat, order
  rotated); patch files compared with the base model's weights (its state dict's tensors);
  where the head is shared, PAINT interpolation α = 0 … 1 toward the chosen full_ft.

Writes OUT/benchmark.json, benchmark.md, tradeoff.png, frontier.png (new task vs step-time
and peak-memory ratio) and val_split.txt (the val part's images).
"""

import argparse
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

from mmengine.config import DictAction

ROOT = Path(__file__).resolve().parents[1]


def _csv(kind):
    def parse(text: str):
        return tuple(kind(v) for v in text.split(",") if v.strip())

    return parse


def _default_base_dir(story: str, size: str) -> Path:
    """The demo's cached base for the full size (shared with tools/demo.py); a tiny base
    elsewhere, so a smoke run never replaces the demo's."""
    if size == "full":
        return ROOT / "work_dirs/demo" / story
    return ROOT / "work_dirs/benchmark" / f"base_{story}_{size}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    embedded = parser.add_argument_group("embedded task (default)")
    embedded.add_argument("--story", choices=["det", "seg"], default="det")
    embedded.add_argument("--size", choices=["full", "tiny"], default="full")
    embedded.add_argument("--data", default=str(ROOT / "data/demo"), help="generated data cache")
    embedded.add_argument(
        "--base-dir",
        help="cached base folder (default: the demo's work_dirs/demo/<story> for --size full)",
    )
    real = parser.add_argument_group("real data")
    real.add_argument("--config", help="Δ training config of the new task (has delta_patch)")
    real.add_argument("--checkpoint", help="base checkpoint (default: the config's load_from)")
    real.add_argument("--base-config", help="the base's config: its test set = the base task")
    real.add_argument("--finetune-config", help="full fine-tuning config (new class sets)")
    real.add_argument("--data-root", help="data_root of the new task's datasets")
    real.add_argument("--base-data-root", help="data_root of the base task's test set")
    real.add_argument("--metric", help="evaluator key to compare (default: mAP / mIoU)")
    real.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help="overrides of the new task's configs (--config, --finetune-config)",
    )
    real.add_argument(
        "--base-cfg-options",
        nargs="+",
        action=DictAction,
        help="overrides of --base-config (another task: its own keys)",
    )
    parser.add_argument("--out", help="output folder (default work_dirs/benchmark/<name>)")
    parser.add_argument(
        "--ft-lr",
        type=_csv(float),
        help="full fine-tuning's lr grid, comma-separated: each is trained and the best on the "
        "validation split kept (default: --finetune-config's own; else 1e-4,3e-4,1e-3 with "
        "the Δ config's optimiser and schedule)",
    )
    parser.add_argument(
        "--lr-scales",
        type=_csv(float),
        default=(0.33, 1.0, 3.0),
        help="the patch methods' lr grid as multiples of the config's lr (default 0.33,1,3); "
        "the best on the validation split is kept",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.15,
        help="fraction of the new task's training images held out to choose lrs (default 0.15)",
    )
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the val split's hash")
    parser.add_argument(
        "--seeds",
        type=int,
        default=2,
        help="training seeds of the top rows (full_ft, delta, delta_fast) at the chosen lr",
    )
    parser.add_argument(
        "--top-rows",
        type=_csv(str),
        default=("full_ft", "delta", "delta_fast"),
        help="method ids retrained with --seeds seeds and at equal wall-clock (those present)",
    )
    parser.add_argument(
        "--equal-time-cap",
        type=float,
        default=4.0,
        help="equal wall-clock runs train at most this × the schedule's iterations",
    )
    parser.add_argument(
        "--no-equal-time", action="store_true", help="skip the equal wall-clock runs"
    )
    parser.add_argument(
        "--placements",
        type=_csv(str),
        default=("3", "4", "none"),
        help="Δ variants by backbone stage: 'k' = stages k…, 'none'; '' for none",
    )
    parser.add_argument("--branch-types", type=_csv(str), default=("ScaleShiftDelta", "BlockDelta"))
    parser.add_argument("--ranks", type=_csv(int), default=(4, 16))
    parser.add_argument("--methods", type=_csv(str), help="method ids to run (full_ft always)")
    parser.add_argument("--iters", type=int, help="training iterations of every method")
    parser.add_argument("--cost-repeats", type=int, default=3, help="0: no step-time / memory runs")
    parser.add_argument("--no-paint", action="store_true", help="skip the PAINT α sweep")
    parser.add_argument(
        "--rerender",
        metavar="OUT",
        help="rewrite OUT's benchmark.md / tradeoff.png / frontier.png (and targets) from its "
        "benchmark.json",
    )
    parser.add_argument("--cost-steps", type=int, default=8)
    parser.add_argument("--cost-warmup", type=int, default=2)
    parser.add_argument("--latency-images", type=int, default=20)
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction {args.val_fraction}: must be between 0 and 1")
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: at least 1")
    if not args.lr_scales or any(v <= 0 for v in args.lr_scales):
        parser.error(f"--lr-scales {args.lr_scales}: positive multipliers, at least one")
    if args.equal_time_cap < 1:
        parser.error(f"--equal-time-cap {args.equal_time_cap}: at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rerender:
        from mmdelta.apps.benchmark.report import rerender

        print(Path(rerender(args.rerender)["files"]["markdown"]).read_text())
        return 0
    from mmdelta.apps.benchmark import BenchmarkError, Options, run_benchmark
    from mmdelta.apps.benchmark.settings import embedded_setting, real_setting
    from mmdelta.datasets.paths import DatasetPathError
    from mmdelta.patching import DeltaPatchConfigError

    try:
        if args.config:
            setting = real_setting(
                args.config,
                args.checkpoint,
                args.base_config,
                args.finetune_config,
                args.data_root,
                args.base_data_root,
                args.metric,
                args.cfg_options,
                args.base_cfg_options,
            )
        else:
            setting = embedded_setting(
                args.story,
                args.size,
                args.data,
                ROOT / "configs/demo",
                args.base_dir or _default_base_dir(args.story, args.size),
            )
        options = Options(
            ft_lrs=args.ft_lr or None,
            lr_scales=args.lr_scales,
            val_fraction=args.val_fraction,
            split_seed=args.split_seed,
            seeds=args.seeds,
            top_rows=args.top_rows,
            equal_time=not args.no_equal_time,
            equal_time_cap=args.equal_time_cap,
            placements=args.placements,
            branch_types=args.branch_types,
            ranks=args.ranks,
            methods=args.methods,
            cost_repeats=args.cost_repeats,
            cost_steps=args.cost_steps,
            cost_warmup=args.cost_warmup,
            latency_images=args.latency_images,
            iterations=args.iters,
            paint=not args.no_paint,
        )
        out = args.out or ROOT / "work_dirs/benchmark" / (
            setting.name if args.config else f"{setting.name}_{args.size}"
        )
        report = run_benchmark(setting, out, options)
    except (BenchmarkError, DatasetPathError, DeltaPatchConfigError, FileNotFoundError) as err:
        print(f"benchmark: error: {err}", file=sys.stderr)
        return 1
    print(Path(report["files"]["markdown"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
