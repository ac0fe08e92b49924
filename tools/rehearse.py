"""Rehearse the real-data configs without the real data (``mmdelta.apps.rehearsal``).

    .venv/bin/python tools/rehearse.py [--out work_dirs/rehearsal] [CONFIG ...]
        [--run [train,resume,test,twin,base,benchmark]] [--benchmark]

Writes tiny stand-ins of PASCAL VOC 07+12, COCO, Cityscapes and ADE20K in their real
on-disk formats (real class names and ids) and a randomly initialised base checkpoint of
each official model in the model zoo's layout, then prints, per config (default: every
rehearsed config in configs/), the commands that train its patch, resume, test it and train
its fine-tuning twin on them. Their --cfg-options only point data roots and load_from at the
stand-ins and shrink image scale and schedule. --run runs the listed steps (default: all but
the benchmark) and prints each outcome; --benchmark adds tools/benchmark.py on the stand-ins
(a short protocol; several minutes per config on a 2-core CPU) to the commands and the run.
"""

import argparse
import subprocess
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("train", "resume", "test", "twin", "base")
ALL_STEPS = (*STEPS, "benchmark")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", help="configs to rehearse (default: all)")
    parser.add_argument("--out", default=str(ROOT / "work_dirs/rehearsal"))
    parser.add_argument(
        "--run",
        nargs="?",
        const=",".join(STEPS),
        help=f"run these steps (comma-separated; default {','.join(STEPS)})",
    )
    parser.add_argument(
        "--benchmark", action="store_true", help="add the benchmark on the stand-ins (and run it)"
    )
    args = parser.parse_args(argv)
    from mmdelta.apps.rehearsal import REHEARSALS, benchmark_command, plan, prepare, rehearsal

    try:
        chosen = [rehearsal(c) for c in args.configs] or list(REHEARSALS)
    except KeyError as err:
        parser.error(str(err.args[0]))
    steps = [s for s in (args.run or "").split(",") if s]
    unknown = sorted(set(steps) - set(ALL_STEPS))
    if unknown:
        parser.error(f"--run: unknown steps {unknown}; steps: {','.join(ALL_STEPS)}")
    if args.benchmark and args.run and "benchmark" not in steps:
        steps.append("benchmark")
    out = Path(args.out).resolve()
    roots, checkpoints = prepare(out, tuple(chosen))
    if args.benchmark or "benchmark" in steps:  # enough images to hold out a validation part
        from mmdelta.datasets import rehearsal_data

        bench_roots = rehearsal_data(out / "data-benchmark", larger=True)
    print(f"stand-in data: {out / 'data'}\nstand-in bases: {out / 'checkpoints'}")
    failed = 0
    for r in chosen:
        p = plan(r, roots, checkpoints[r.base_config], out / "runs" / r.name)
        print(f"\n## {r.config} (base: {r.base_config})  — run from {p.work}")
        if args.benchmark or "benchmark" in steps:
            p.commands["benchmark"] = benchmark_command(
                r, bench_roots, checkpoints[r.base_config], out / "benchmark" / r.name
            )
        for step in p.commands:
            print(f"# {step}\n{p.shell(step)}")
        p.work.mkdir(parents=True, exist_ok=True)
        for step in steps:
            start = time.perf_counter()
            proc = subprocess.run(p.commands[step], cwd=p.work, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
            print(f"-> {r.name} {step}: {status} in {seconds:.0f} s")
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                failed += 1
                break
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
