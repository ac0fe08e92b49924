"""Process memory (RSS) of serving N patches on one base vs holding N full model copies.

    .venv/bin/python tools/bench_serving_memory.py [--config configs/delta_faster_rcnn_voc.py]
        [--counts 1 4 16] [--input-size 512] [--out result.json] [--workdir DIR]

What each row measures, and how: ``mmdelta.apps.serving_memory`` (the logic). Prints a
markdown table; ``--out`` also writes the numbers as JSON. Linux only (reads ``/proc``).
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmdelta.apps.serving_memory import (
    DEFAULT_CONFIG,
    MeasurementError,
    report,
    run_serving_memory,
    worker,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a config with delta_patch")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--input-size", type=int, default=512, help="S of the 1x3xSxS input")
    parser.add_argument("--out", help="also write the result as JSON here")
    parser.add_argument(
        "--workdir",
        help="keep base, patches and finished measurements here; a rerun reuses them "
        "(default: a temporary folder)",
    )
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per measurement")
    parser.add_argument(
        "--jobs", type=int, default=1, help="measurements run at once (RSS is per process)"
    )
    parser.add_argument(
        "--worker", choices=["baseline", "patches", "copies"], help=argparse.SUPPRESS
    )
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not Path(args.config).is_file():
        parser.error(f"config file {args.config!r} does not exist")
    if args.worker:
        result = worker(args.worker, args.n, args.config, Path(args.workdir), args.input_size)
        print(json.dumps(result))
        return 0
    if min(args.counts) < 1:
        parser.error("--counts must be positive")
    try:
        result = run_serving_memory(
            args.config, args.counts, args.input_size, args.workdir, args.timeout, args.jobs
        )
    except MeasurementError as err:
        raise SystemExit(str(err)) from None
    print(report(result))
    if args.out:
        from mmdelta.fileio import write_text_atomic

        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
