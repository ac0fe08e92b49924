"""Process memory (RSS) of serving N patches on one base vs holding N full model copies.

(``tools/bench_serving_memory.py`` is its command line.)

The config's ``model`` is built with random weights (ImageNet ``Pretrained`` initialisers
removed: nothing downloads) and saved once as the base checkpoint; its ``delta_patch`` is
applied and saved ``max(counts)`` times with different random values in every patch tensor
(distinct real tensors, like trained patches). Every measurement then runs in a FRESH
Python process, which reports its resident set size (``VmRSS`` from ``/proc/self/status`` after
``gc.collect()`` and glibc's ``malloc_trim(0)``, so freed heap is not counted; the
untrimmed value and the peak ``VmHWM`` are kept in the JSON):

* ``baseline``: python + torch + mmengine + mmdet/mmseg models + mmdelta imported, the
  config parsed, no model;
* ``patches N``: one base built and loaded, N patch files loaded onto it (``load_patch``,
  each under its own name), then one inference pass (``model.test_step``, no_grad, batch
  ``1×3×S×S``) with the base and with each patch active in turn;
* ``copies N``: N separate models, each built and loaded from the base checkpoint, then
  one inference pass each.

Increments per patch / per copy are least-squares slopes of RSS over N. Prints a markdown
table (:func:`report`); the tool also writes the numbers as JSON. Linux only (reads
``/proc``). A measurement runs as ``python -m mmdelta.apps.serving_memory --worker KIND
--n N --config C --workdir W --input-size S`` and prints its figures as one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7
REPO = Path(__file__).resolve().parents[2]

DEFAULT_CONFIG = REPO / "configs" / "delta_faster_rcnn_voc.py"
MIB = 2**20


class MeasurementError(RuntimeError):
    """A measurement could not be made (no ``delta_patch``, a failed worker process)."""


def _status() -> dict[str, float]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024 / MIB  # kB
    return fields


def memory() -> dict[str, float]:
    """This process's memory in MiB: ``rss_mib`` (VmRSS after ``gc.collect()`` and glibc's
    ``malloc_trim(0)``, which hands freed heap pages back: live memory, not allocator
    slack), ``untrimmed_mib`` (VmRSS before the trim), ``peak_mib`` (VmHWM)."""
    import gc

    gc.collect()
    before = _status()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS as it is
        pass
    after = _status()
    return {
        "rss_mib": after["VmRSS"],
        "untrimmed_mib": before["VmRSS"],
        "peak_mib": before["VmHWM"],
    }


# ----------------------------------------------------------------------------- in a worker


def _imports(config: str):
    """What every measurement imports (the baseline stops here): torch, mmengine, mmdelta,
    the config's OpenMMLab models; returns the parsed config."""
    import importlib

    import torch  # noqa: F401
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import mmdelta  # noqa: F401

    cfg = Config.fromfile(config)
    scope = cfg.get("default_scope", "mmdet")
    importlib.import_module(f"{scope}.models")
    importlib.import_module(f"{scope}.structures")
    init_default_scope(scope)
    return cfg


def _build(cfg):
    """The config's model, random weights (no Pretrained init, SyncBN reverted), eval."""
    import copy

    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS

    from mmdelta.runner.model_setup import null_pretrained

    model_cfg = copy.deepcopy(cfg.model)
    null_pretrained(model_cfg)
    if model_cfg.get("data_preprocessor") is None and cfg.get("data_preprocessor"):
        model_cfg.data_preprocessor = cfg.data_preprocessor
    return revert_sync_batchnorm(MODELS.build(model_cfg)).eval()


def _batch(cfg, size: int) -> dict:
    """One ``1×3×S×S`` uint8 image (fixed seed) as ``model.test_step`` takes it."""
    import torch

    image = torch.randint(0, 256, (3, size, size), generator=torch.Generator().manual_seed(0))
    meta = dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0))
    if cfg.get("default_scope", "mmdet") == "mmseg":
        from mmseg.structures import SegDataSample

        sample = SegDataSample(metainfo=meta)
    else:
        from mmdet.structures import DetDataSample

        sample = DetDataSample(metainfo=meta)
    return dict(inputs=[image.to(torch.uint8)], data_samples=[sample])


def _infer(model, cfg, size: int) -> None:
    import torch

    with torch.no_grad():
        model.test_step(_batch(cfg, size))


def worker(kind: str, n: int, config: str, workdir: Path, size: int) -> dict:
    """One measurement in this (fresh) process; returns the memory figures."""
    start = time.perf_counter()
    cfg = _imports(config)
    result = {"kind": kind, "n": n}
    if kind == "patches":
        import torch

        from mmdelta import load_patch, set_active_patch

        model = _build(cfg)
        model.load_state_dict(torch.load(workdir / "base.pth", weights_only=True))
        for i in range(n):
            load_patch(model, workdir / f"p{i}.safetensors", name=f"p{i}", activate=False)
        model.eval()
        result["loaded"] = memory()
        for name in [None, *(f"p{i}" for i in range(n))]:
            set_active_patch(model, name)
            _infer(model, cfg, size)
    elif kind == "copies":
        import torch

        models = []
        for _ in range(n):
            model = _build(cfg)
            model.load_state_dict(torch.load(workdir / "base.pth", weights_only=True))
            models.append(model)
        result["loaded"] = memory()
        for model in models:
            _infer(model, cfg, size)
    elif kind != "baseline":
        raise ValueError(f"unknown measurement {kind!r}")
    result["final"] = memory()
    result["seconds"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------- driver


def prepare(config: str, workdir: Path, count: int) -> dict:
    """Writes ``base.pth`` (random weights) and ``p0..p{count-1}.safetensors`` (the
    config's ``delta_patch``, every patch tensor random) into ``workdir``, unless a
    previous run with the same config wrote them there (``prepared.json``)."""
    import torch

    marker = workdir / "prepared.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done["config"] == str(Path(config).resolve()) and done["count"] >= count:
            return done["sizes"]
        marker.unlink()
        for kept in workdir.glob("rss_*.json"):  # measured on other files
            kept.unlink()

    from mmdelta import apply_delta_patch, save_patch

    cfg = _imports(config)
    if cfg.get("delta_patch") is None:
        raise MeasurementError(f"{config} has no delta_patch: the benchmark needs a patch config")
    torch.manual_seed(0)
    model = _build(cfg)
    torch.save(model.state_dict(), workdir / "base.pth")
    base_params = sum(p.numel() for p in model.state_dict().values())
    apply_delta_patch(model, cfg.delta_patch)
    generator = torch.Generator().manual_seed(1)
    patch_params = 0
    for i in range(count):
        with torch.no_grad():
            tensors = [p for name, p in model.named_parameters() if ".delta." in name]
            for p in tensors:
                p.copy_(torch.randn(p.shape, generator=generator) * 1e-3)
        patch_params = sum(p.numel() for p in tensors)
        save_patch(model, workdir / f"p{i}.safetensors", overwrite=True)
    sizes = {
        "base_params": base_params,
        "patch_params": patch_params,
        "checkpoint_mib": os.path.getsize(workdir / "base.pth") / MIB,
        "patch_file_mib": os.path.getsize(workdir / "p0.safetensors") / MIB,
    }
    marker.write_text(
        json.dumps({"config": str(Path(config).resolve()), "count": count, "sizes": sizes})
    )
    return sizes


def measure(
    kind: str, n: int, config: str, workdir: Path, input_size: int, timeout: int, keep: bool
) -> dict:
    """One measurement in a fresh process. With ``keep`` its result is kept in ``workdir``
    (``rss_<kind>_<n>_<size>.json``) and reused by a rerun with the same settings."""
    kept = workdir / f"rss_{kind}_{n}_{input_size}.json"
    if keep and kept.is_file():
        return json.loads(kept.read_text())
    cmd = [
        sys.executable, "-m", __name__, "--worker", kind, "--n", str(n), "--config", config,
        "--workdir", str(workdir), "--input-size", str(input_size),
    ]  # fmt: skip
    # the child imports this very mmdelta, wherever the parent found it
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise MeasurementError(f"measurement {kind} N={n} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if keep:
        kept.write_text(json.dumps(result))
    return result


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of y over x (None with fewer than two distinct x)."""
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        return None
    mx = sum(xs) / len(xs)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)


def report(result: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.1f}"

    rows = {(r["kind"], r["n"]): r for r in result["rows"]}
    lines = [
        f"RSS in MiB; {result['config']}, input 1x3x{result['input_size']}x{result['input_size']}"
        f", {result['machine']}, torch {result['torch']}, {result['date']}",
        "",
        f"baseline (imports, config parsed, no model): **{result['baseline_mib']:.1f} MiB**",
        "",
        "| N | N patches on one base: after load | after inference | N full copies: after load"
        " | after inference | copies / patches (after inference) |",
        "|---|---|---|---|---|---|",
    ]
    for n in result["counts"]:
        p, c = rows[("patches", n)], rows[("copies", n)]
        lines.append(
            f"| {n} | {p['loaded']['rss_mib']:.1f} | {p['final']['rss_mib']:.1f} | "
            f"{c['loaded']['rss_mib']:.1f} | {c['final']['rss_mib']:.1f} | "
            f"{c['final']['rss_mib'] / p['final']['rss_mib']:.2f}x |"
        )
    inc = result["increments_mib"]
    first = rows[("patches", result["counts"][0])]
    lines += [
        "",
        f"- per patch: {fmt(inc['per_patch_loaded'])} MiB after load, "
        f"{fmt(inc['per_patch'])} MiB after inference (patch file "
        f"{result['patch_file_mib']:.2f} MiB, {result['patch_params']:,} parameters)",
        f"- per copy: {fmt(inc['per_copy_loaded'])} MiB after load, "
        f"{fmt(inc['per_copy'])} MiB after inference (checkpoint "
        f"{result['checkpoint_mib']:.1f} MiB, {result['base_params']:,} values)",
        f"- one patch active after inference: +"
        f"{first['final']['rss_mib'] - first['loaded']['rss_mib']:.1f} MiB over the loaded model"
        " (mostly its folded weights W+ΔW of every patched layer, the weight form of inference;"
        " one set, however many patches are loaded)",
        f"- first model over the baseline (1 copy, after inference): "
        f"{rows[('copies', result['counts'][0])]['final']['rss_mib'] - result['baseline_mib']:.1f}"
        f" MiB; peak RSS at N={result['counts'][-1]}: patches "
        f"{rows[('patches', result['counts'][-1])]['final']['peak_mib']:.1f}, copies "
        f"{rows[('copies', result['counts'][-1])]['final']['peak_mib']:.1f} MiB",
    ]
    return "\n".join(lines)


def run_serving_memory(
    config: str,
    counts: Sequence[int],
    input_size: int = 512,
    workdir: str | os.PathLike | None = None,
    timeout: int = 3600,
    jobs: int = 1,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict:
    """Prepares the base and ``max(counts)`` patches, measures the baseline and, for every
    N of ``counts``, N patches and N copies (each in a fresh process, ``jobs`` at once);
    returns the result (:func:`report` renders it). ``workdir``: keep base, patches and
    finished measurements there and reuse them (None: a temporary folder)."""
    counts = sorted(set(counts))
    with tempfile.TemporaryDirectory(prefix="mmdelta-serving-mem-") as tmp:
        folder = Path(workdir) if workdir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        log(f"preparing a base and {counts[-1]} patches in {folder} ...")
        sizes = prepare(config, folder, counts[-1])
        todo = [("baseline", 0), *((kind, n) for n in counts for kind in ("patches", "copies"))]
        log(f"measuring {todo} in fresh processes ...")
        keep = workdir is not None

        def one(job):
            return measure(*job, config, folder, input_size, timeout, keep)

        with ThreadPoolExecutor(max(1, jobs)) as pool:
            rows = list(pool.map(one, todo))
    return _result(config, counts, input_size, sizes, rows, time.perf_counter() - started)


def _result(config, counts, input_size, sizes, rows, seconds) -> dict:
    """The JSON record: sizes, baseline, per-patch / per-copy slopes and every row."""
    import torch

    def fit(kind, when):
        return slope([(r["n"], r[when]["rss_mib"]) for r in rows if r["kind"] == kind])

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU",
        "torch": torch.__version__,
        "config": config,
        "input_size": input_size,
        "counts": counts,
        **sizes,
        "baseline_mib": rows[0]["final"]["rss_mib"],
        "increments_mib": {
            "per_patch": fit("patches", "final"),
            "per_patch_loaded": fit("patches", "loaded"),
            "per_copy": fit("copies", "final"),
            "per_copy_loaded": fit("copies", "loaded"),
        },
        "rows": rows,
        "seconds": seconds,
    }


def _worker_main(argv=None) -> int:
    """``python -m mmdelta.apps.serving_memory --worker ...``: one measurement, one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True, choices=["baseline", "patches", "copies"])
    parser.add_argument("--n", type=int, default=0)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--input-size", type=int, default=512)
    args = parser.parse_args(argv)
    result = worker(args.worker, args.n, args.config, Path(args.workdir), args.input_size)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
