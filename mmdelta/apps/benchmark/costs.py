"""What a method costs: training step time and peak training memory, inference latency.

Training cost is measured in a fresh Python process per (method, repeat) — a process's peak
RSS only ever grows, so two methods can never share one — and the methods are run in an
order rotated every repeat (side by side, so drifts of a noisy machine hit all of them).
Each child process builds the method's runner exactly as training does (base loaded, patch
built, optimiser over the trainable parameters) and times ``model.train_step`` — data
preprocessing, forward, backward and the optimiser step — for ``warmup + steps`` iterations.

Peak memory is the child's peak RSS while it trains (the peak is reset once the runner is
built, Linux ``clear_refs``) minus its RSS just before the runner was built (after the
imports): model, gradients, optimiser state, activations and the data pipeline, but not the
~0.8 GB of imported libraries every process carries.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import torch


def rss_bytes() -> int:
    """The process's current resident set size (Linux ``/proc``; else its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The process's peak RSS since it started or since :func:`reset_peak_rss`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Resets the peak RSS to the current RSS (Linux ``clear_refs`` 5); False if it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _timed(step: Callable, times: list[float]) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = step(*args, **kwargs)
        times.append(time.perf_counter() - start)
        return out

    return wrapper


def _import_scope(scope: str) -> None:
    """Imports the OpenMMLab package's registries up front, so their memory is not counted."""
    for sub in ("models", "datasets", "evaluation", "engine", "visualization", "structures"):
        try:
            importlib.import_module(f"{scope}.{sub}")
        except ImportError:
            pass
    import mmdelta  # noqa: F401  (its branches, hooks and runner)


def measure_training(config: str, steps: int, warmup: int) -> dict:
    """Runs ``warmup + steps`` training iterations of ``config`` (in this process) and
    returns ``step_seconds`` (median of the timed steps), ``step_times`` and
    ``peak_memory_bytes``."""
    from mmengine.config import Config

    from ...runner.checkpoint import mmengine_checkpoints
    from ...runner.cli import build_runner

    cfg = Config.fromfile(config)
    iters = warmup + steps
    # no validation pass (IterBasedTrainLoop validates after the last iteration from val_begin)
    cfg.train_cfg = dict(
        type="IterBasedTrainLoop", max_iters=iters, val_interval=iters + 1, val_begin=iters + 1
    )
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=iters + 1, by_epoch=False)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=iters + 1)
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    _import_scope(cfg.get("default_scope", "mmdet"))
    with tempfile.TemporaryDirectory(prefix="mmdelta-cost-") as work_dir:
        cfg.work_dir = work_dir
        cfg.log_level = "WARNING"
        before = rss_bytes()
        with mmengine_checkpoints():
            runner = build_runner(cfg)
            times: list[float] = []
            runner.model.train_step = _timed(runner.model.train_step, times)
            # the peak of the training steps, not of building the model and loading the base
            # (reading a checkpoint holds it twice for a moment)
            reset_peak_rss()
            runner.train()
        peak = peak_rss_bytes()
    timed = times[warmup:]
    return dict(
        step_seconds=statistics.median(timed),
        step_times=timed,
        peak_memory_bytes=peak - before,
    )


def training_costs(
    configs: dict[str, str],
    repeats: int = 3,
    steps: int = 8,
    warmup: int = 2,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Step time and peak memory of each method's training config (``{id: config file}``),
    one fresh process per (method, repeat), the order rotated every repeat. Returns per id
    the medians over repeats (``step_seconds``, ``peak_memory_bytes``) and every run."""
    ids = list(configs)
    runs: dict[str, list[dict]] = {i: [] for i in ids}
    for r in range(repeats):
        order = ids[r % len(ids) :] + ids[: r % len(ids)]
        for method in order:
            runs[method].append(_child(configs[method], steps, warmup))
            last = runs[method][-1]
            log(
                f"   cost {method} (repeat {r + 1}/{repeats}): {last['step_seconds'] * 1e3:.0f} "
                f"ms/step, peak {last['peak_memory_bytes'] / 2**20:.0f} MiB"
            )
    return {
        i: dict(
            step_seconds=statistics.median(run["step_seconds"] for run in runs[i]),
            peak_memory_bytes=statistics.median(run["peak_memory_bytes"] for run in runs[i]),
            runs=runs[i],
        )
        for i in ids
    }


def _child(config: str, steps: int, warmup: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "mmdelta.apps.benchmark.costs",
        config,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"cost measurement of {config} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def inference_latency(
    models: dict[str, torch.nn.Module], batches: Sequence, repeats: int = 2
) -> dict[str, float]:
    """Median seconds of ``model.test_step(batch)`` per model, the models alternating per
    batch (order rotated) after one untimed warm-up pass (which also fills a patch's weight
    cache)."""
    names = list(models)
    for model in models.values():
        model.eval()
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for batch in batches[:1]:
            for n in names:
                models[n].test_step(batch)
        for r in range(repeats):
            for i, batch in enumerate(batches):
                k = (r + i) % len(names)
                for n in names[k:] + names[:k]:
                    start = time.perf_counter()
                    models[n].test_step(batch)
                    times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="one training-cost measurement (JSON line)")
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    result = measure_training(args.config, args.steps, args.warmup)
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
