"""The main job on embedded data: watch a detector (or a segmenter) learn new domains without
forgetting its own.

    .venv/bin/python tools/demo.py [--task det|seg] [--out DIR] [--data DIR]
        [--size full|tiny] [--retrain-base]

Generates the datasets (cached under data/demo/), trains the base model once (cached under
the output folder), Δ-patches it to an appearance-shifted task and to a new-class task,
evaluates base and patched models side by side, and writes work_dirs/demo/<task>/:
report.md, report.json, the patch files and PNG pictures (predictions, training curves).
Everything runs offline on the CPU.
"""

import argparse
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["det", "seg"], default="det", help="which story")
    parser.add_argument("--out", help="output folder (default work_dirs/demo/<task>)")
    parser.add_argument("--data", default=str(ROOT / "data/demo"), help="generated data cache")
    parser.add_argument(
        "--size",
        choices=["full", "tiny"],
        default="full",
        help="tiny: a seconds-long smoke run of the same steps",
    )
    parser.add_argument("--retrain-base", action="store_true", help="ignore a cached base")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmdelta.apps.demo.main_job import run_main_job

    report = run_main_job(
        args.task,
        out=args.out or ROOT / "work_dirs/demo" / args.task,
        data=args.data,
        configs=ROOT / "configs/demo",
        size=args.size,
        retrain_base=args.retrain_base,
    )
    print((Path(report["out"]) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
