"""Load test of tools/serve.py: concurrent clients over many patches, every answer checked.

    .venv/bin/python tools/bench_serving_load.py [--tiny | --config CONFIG] [--patches 16]
        [--clients 8] [--requests 25] [--strategy group|auto|route] [--max-batch 8]
        [--quick] [--out load.json] [--workdir DIR]

Writes a random-init base, N patch files with random Δs (one with its own classes) and
generated images; starts the server in a subprocess on a free localhost port; C clients send
R requests each over 4 patches + the base (seeded random choice); EVERY answer is compared
with the single-image answer computed in this process (bit for bit for ``group``; within a
stated tolerance for ``route`` / ``auto``). Reports throughput, p50/p99 latency, server RSS,
the same traffic on one model copy per patch, RSS with 1 vs N patches loaded and mixed- vs
single-patch throughput, as a markdown table (and JSON with ``--out``). Exit status 1 when
any answer mismatched or failed. The logic is ``mmdelta.apps.serving_load``.
"""

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmdelta.apps.serving_load import (
    DEMO_CONFIG,
    TINY_CONFIG,
    LoadTestError,
    report,
    run_load_test,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="a detector config")
    parser.add_argument("--tiny", action="store_true", help="the tiny test detector config")
    parser.add_argument("--patches", type=int, default=16, help="patches loaded (at least 4)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--images", type=int, default=8, help="distinct generated images")
    parser.add_argument("--strategy", default="group", choices=["group", "auto", "route"])
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="only the mixed run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the result as JSON here")
    parser.add_argument("--workdir", help="where to write base, patches, logs (default: temp)")
    args = parser.parse_args(argv)
    config = str(TINY_CONFIG) if args.tiny else args.config
    if not Path(config).is_file():
        parser.error(f"config file {config!r} does not exist")
    with tempfile.TemporaryDirectory(prefix="mmdelta-serving-load-") as tmp:
        try:
            result = run_load_test(
                config, Path(args.workdir or tmp), n_patches=args.patches,
                clients=args.clients, requests=args.requests, n_images=args.images,
                strategy=args.strategy, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                quick=args.quick, seed=args.seed,
            )  # fmt: skip
        except LoadTestError as err:
            print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
            return 2
    print(report(result))
    if args.out:
        from mmdelta.fileio import write_text_atomic

        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    bad = sum(r["mismatches"] + r["errors"] for r in result["runs"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
