"""Load test of the HTTP server: many clients, many patches, every answer checked.

(``tools/bench_serving_load.py`` is its command line.)

In a work folder it writes a random-init base of the detector config (the demo's
``configs/demo/det_shapes_base.py``, or the tiny test config), ``N`` patch files with random
Δ values (``p0`` … ; ``p3`` has its own 4 classes) and generated images. Then, for each
server it measures, ``tools/serve.py`` (or, for ``copies``, this module's ``--serve-copies``
server) runs in a subprocess on a free localhost port, and ``C`` client threads send ``R``
requests each (``POST /predict``, the image's PNG bytes; the patch drawn at random, seeded).
EVERY response is checked against the single-image answer computed in this process
(``MultiPatchInferencer`` with the same config, base and patch files: the patch active,
``model.test_step`` on a batch of one): equal JSON for strategy ``group`` and for the copies
(the same kernels run: bit for bit), within :data:`TOLERANCE` for ``route`` / ``auto``
(one forward for the whole batch: float32 rounding differs).

Servers and runs (``--quick``: only the first server's ``mixed`` run):

* ``engine``: one base + N patches (``tools/serve.py``): run ``single`` (every request for
  ``p0``), then ``mixed`` (base, ``p0``–``p3`` at random); server RSS after each;
* ``engine, 1 patch``: one base + ``p0``: run ``single``; RSS (the same traffic as the
  first ``single``: RSS with 1 vs N patches loaded);
* ``copies``: one full model per model served (base, ``p0``–``p3``), one request at a time:
  run ``mixed``; RSS.

Each run reports throughput (requests/s over the run's wall time), p50/p99 latency, the
mean batch the engine ran (``/health`` counters) and the server's ``VmRSS`` / ``VmHWM`` from
``/proc/<pid>/status``. Linux only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo" / "det_shapes_base.py"
TINY_CONFIG = REPO / "tests" / "configs" / "e2e_det_voc_tiny.py"
OWN_CLASSES = ("triangle", "ring", "cross", "star")
MIXED = (None, "p0", "p1", "p2", "p3")  # the mixed traffic: the base and 4 patches
#: route / auto answers vs the single-image answers: same detections (label for label,
#: matched one to one), scores within 1e-4, box corners within 0.05 px
TOLERANCE = {"score": 1e-4, "box_px": 0.05}
MIB = 2**20


class LoadTestError(RuntimeError):
    """The server did not start or failed."""


# ----------------------------------------------------------------------------- fixtures


def prepare(config: str, workdir: Path, n_patches: int, n_images: int, seed: int = 0) -> dict:
    """Base checkpoint (random weights), ``n_patches`` patch files (random Δs, ``p3`` with
    its own classes) and ``n_images`` generated PNG images of the config's size."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    from mmdelta import apply_delta_patch, save_patch
    from mmdelta.datasets.synthetic import write_voc_dataset
    from mmdelta.runner.model_setup import null_pretrained

    cfg = Config.fromfile(config)
    init_default_scope(cfg.get("default_scope", "mmdet"))
    classes = tuple(cfg.get("classes") or ("a", "b", "c"))
    size = tuple(cfg.get("image_size") or (192, 192))
    workdir.mkdir(parents=True, exist_ok=True)

    def build(state=None):
        model_cfg = cfg.model.copy()
        null_pretrained(model_cfg)
        model = MODELS.build(model_cfg)  # PyTorch's default initialisation: random
        if state is not None:
            model.load_state_dict(state)
        return model.eval()

    torch.manual_seed(seed)
    state = build().state_dict()
    base = workdir / "base.pth"
    torch.save({"meta": {"dataset_meta": {"classes": classes}}, "state_dict": state}, base)
    generator = torch.Generator().manual_seed(seed + 1)
    patches = {}
    for i in range(n_patches):
        name = f"p{i}"
        patch_cfg = dict(name=name, branch=dict(type="LowRankDelta", rank=4))
        if i == 3:
            patch_cfg.update(classes=list(OWN_CLASSES), base_classes=list(classes))
        model = build(state)
        apply_delta_patch(model, patch_cfg)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if ".delta." in key:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.02)
        patches[name] = str(save_patch(model, workdir / f"{name}.safetensors", overwrite=True))
    data = write_voc_dataset(workdir / "data", classes, 1, n_images, image_size=size, seed=seed)
    jpegs = sorted((Path(data) / "VOC2007" / "JPEGImages").glob("*.jpg"))[1:]
    import cv2

    images = []
    for jpeg in jpegs:
        ok, png = cv2.imencode(".png", cv2.imread(str(jpeg)))
        assert ok
        images.append(png.tobytes())
    shutil.rmtree(workdir / "data", ignore_errors=True)
    return {"config": config, "base": str(base), "patches": patches, "images": images}


def references(fx: dict, models, score_thr: float) -> dict:
    """``{(image index, patch): expected JSON}``: each model's single-image answer."""
    import torch

    from mmdelta import set_active_patch
    from mmdelta.apis.engine import decode_image
    from mmdelta.apis.serving import MultiPatchInferencer

    names = [m for m in models if m is not None]
    served = MultiPatchInferencer(fx["config"], fx["base"], {n: fx["patches"][n] for n in names})
    out = {}
    with torch.no_grad():
        for i, body in enumerate(fx["images"]):
            inputs = served.inputs(decode_image(body))
            for patch in models:
                set_active_patch(served.model, patch)
                (sample,) = served.model.test_step(served.collate([inputs]))
                key = "base" if patch is None else patch
                summary = served.summary(sample, key, score_thr)
                classes = served.metas[key]["classes"]
                out[(i, patch)] = json.loads(
                    json.dumps({"patch": patch, "classes": list(classes), **summary})
                )
        set_active_patch(served.model, None)
    return out


def matches(got: dict, ref: dict, exact: bool) -> bool:
    """``got`` (less strategy / batch) equals ``ref``: exactly, or within
    :data:`TOLERANCE` (detections matched one to one: same label, close score and box)."""
    got = {k: v for k, v in got.items() if k not in ("strategy", "batch")}
    if exact or "bboxes" not in ref:
        return got == ref
    if {k: got.get(k) for k in ("patch", "classes")} != {k: ref[k] for k in ("patch", "classes")}:
        return False
    if len(got["scores"]) != len(ref["scores"]) or got["below_thr"] != ref["below_thr"]:
        return False
    free = list(range(len(got["scores"])))
    for label, score, box in zip(ref["labels"], ref["scores"], ref["bboxes"], strict=True):
        for j in free:
            if (
                got["labels"][j] == label
                and abs(got["scores"][j] - score) <= TOLERANCE["score"]
                and max(abs(a - b) for a, b in zip(got["bboxes"][j], box, strict=True))
                <= TOLERANCE["box_px"]
            ):
                free.remove(j)
                break
        else:
            return False
    return True


# ----------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_memory(pid: int) -> dict:
    """``VmRSS`` and ``VmHWM`` (peak) of process ``pid`` in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[f"{key}_mib"] = round(int(value.split()[0]) * 1024 / MIB, 1)
    return out


class Server:
    """A server subprocess on a free localhost port (context manager: stopped on exit)."""

    def __init__(self, cmd: list[str], log: Path, port: int, timeout: float = 600):
        self.port, self.url, self.log = port, f"http://127.0.0.1:{port}", log
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LoadTestError(f"the server exited:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise LoadTestError(f"the server did not answer within {timeout} s")

    def memory(self) -> dict:
        return server_memory(self.proc.pid)

    def health(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=30).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def engine_command(fx, names, port, strategy, max_batch, max_wait_ms, score_thr) -> list[str]:
    return [
        sys.executable, str(REPO / "tools" / "serve.py"), fx["config"], fx["base"],
        *(a for n in names for a in ("--patch", f"{n}={fx['patches'][n]}")),
        "--port", str(port), "--strategy", strategy, "--max-batch", str(max_batch),
        "--max-wait-ms", str(max_wait_ms), "--score-thr", str(score_thr), "--log-level", "warning",
    ]  # fmt: skip


def copies_command(fx, names, port, score_thr) -> list[str]:
    return [
        sys.executable, "-m", __name__, "--serve-copies", fx["config"], fx["base"],
        *(a for n in names for a in ("--patch", f"{n}={fx['patches'][n]}")),
        "--port", str(port), "--score-thr", str(score_thr),
    ]  # fmt: skip


class CopiesEngine:
    """The baseline: one full model per model served (the base, and one copy of the base per
    patch with that patch active), one request at a time on one worker thread. Same answers
    as the engine's ``group`` strategy, bit for bit. The ``create_app`` engine interface
    (no run-time loading)."""

    def __init__(self, config, checkpoint, patches, device="cpu", score_thr=0.3):
        from mmdelta import set_active_patch
        from mmdelta.apis.serving import MultiPatchInferencer
        from mmdelta.patching.files import base_fingerprint

        self.served = MultiPatchInferencer(config, checkpoint, [], device=device)
        self.copies = {None: self.served}
        for name, file in patches:
            copy = MultiPatchInferencer(config, checkpoint, {name: file}, device=device)
            set_active_patch(copy.model, name)  # active for good
            self.copies[name] = copy
        self.task, self.score_thr = self.served.task, float(score_thr)
        self.base_fingerprint = base_fingerprint(self.served.model)
        self.requests = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="copies")

    def submit(self, image, patch=None) -> Future:
        from mmdelta.apis.engine import UnknownPatchError

        if patch not in self.copies:
            loaded = sorted(n for n in self.copies if n)
            raise UnknownPatchError(f"no patch {patch!r} is loaded; loaded: {loaded}")
        copy = self.copies[patch]
        return self._pool.submit(self._run, copy, patch, copy.inputs(image))

    def _run(self, copy, patch, inputs):
        import torch

        from mmdelta.apis.engine import Prediction

        with torch.no_grad():
            (sample,) = copy.model.test_step(copy.collate([inputs]))
        key = "base" if patch is None else patch
        self.requests += 1
        summary = copy.summary(sample, key, self.score_thr)
        return Prediction(patch, copy.metas[key]["classes"], sample, summary, "copies", 1)

    def patches(self) -> dict:
        base = self.served.metas["base"]["classes"]
        return {
            name: {
                "file": copy.patches[name],
                "classes": list(copy.metas[name]["classes"]),
                "own_classes": copy.metas[name]["classes"] != base,
            }
            for name, copy in self.copies.items()
            if name is not None
        }

    def load_patch(self, name, path):
        from mmdelta.apis.serving import ServingError

        raise ServingError("the copies baseline loads its models at start only")

    def unload_patch(self, name):
        from mmdelta.apis.engine import UnknownPatchError

        raise UnknownPatchError("the copies baseline unloads nothing")

    def health(self) -> dict:
        names = sorted(n for n in self.copies if n)
        return {"status": "ok", "task": self.task, "patches": names, "requests": self.requests}

    def close(self) -> None:
        self._pool.shutdown()


def serve_copies(argv=None) -> int:
    """``python -m mmdelta.apps.serving_load --serve-copies CONFIG BASE --patch N=F ...``"""
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve-copies", nargs=2, required=True, metavar=("CONFIG", "BASE"))
    parser.add_argument("--patch", action="append", default=[])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--score-thr", type=float, default=0.3)
    args = parser.parse_args(argv)
    import uvicorn

    from mmdelta.apis.server import create_app

    pairs = [tuple(p.split("=", 1)) for p in args.patch]
    engine = CopiesEngine(*args.serve_copies, pairs, score_thr=args.score_thr)
    try:
        uvicorn.run(create_app(engine), host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0


# ----------------------------------------------------------------------------- traffic


def traffic(server: Server, fx, expected, models, clients, requests, exact, seed) -> dict:
    """``clients`` threads × ``requests`` requests, each for a random model of ``models``
    and a random image (seeded per client); every answer checked."""
    import httpx

    before = server.health()
    latencies, mismatches, errors, lock = [], [], [], threading.Lock()

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with httpx.Client(base_url=server.url, timeout=600) as http:
            for _ in range(requests):
                i, patch = rng.randrange(len(fx["images"])), rng.choice(models)
                params = {} if patch is None else {"patch": patch}
                start = time.perf_counter()
                response = http.post(
                    "/predict", content=fx["images"][i], params=params,
                    headers={"Content-Type": "image/png"},
                )  # fmt: skip
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                    elif not matches(response.json(), expected[(i, patch)], exact):
                        mismatches.append((i, patch))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    after = server.health()
    batches = sum(after.get(k, 0) - before.get(k, 0) for k in ("batches_grouped", "batches_routed"))
    served = after.get("requests", 0) - before.get("requests", 0)
    latencies.sort()

    def pct(q):
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)

    return {
        "requests": len(latencies),
        "clients": clients,
        "models": ["base" if m is None else m for m in models],
        "mismatches": len(mismatches),
        "mismatched": [[i, p] for i, p in mismatches[:10]],
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 2),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_batch": round(served / batches, 2) if batches else 1.0,
        "batches": {
            k: after.get(k, 0) - before.get(k, 0) for k in ("batches_grouped", "batches_routed")
        },
        "server": server.memory(),
    }


def warm_up(server: Server, fx, models) -> None:
    import httpx

    for patch in models:
        params = {} if patch is None else {"patch": patch}
        response = httpx.post(
            f"{server.url}/predict", content=fx["images"][0], params=params,
            headers={"Content-Type": "image/png"}, timeout=600,
        )  # fmt: skip
        if response.status_code != 200:
            raise LoadTestError(f"warm-up request for {patch!r}: {response.text[:500]}")


def run_load_test(
    config: str,
    workdir: Path,
    *,
    n_patches: int = 16,
    clients: int = 8,
    requests: int = 25,
    n_images: int = 8,
    strategy: str = "group",
    max_batch: int = 8,
    max_wait_ms: float = 10.0,
    score_thr: float = 0.0,
    quick: bool = False,
    seed: int = 0,
    log=lambda line: print(line, file=sys.stderr, flush=True),
) -> dict:
    """Prepares, runs every server and run of the module docstring, returns the record
    (:func:`report` renders it)."""
    started = time.perf_counter()
    n_patches = max(n_patches, 4)
    log(f"preparing a base, {n_patches} patches and {n_images} images in {workdir} ...")
    with contextlib.redirect_stdout(sys.stderr):  # mmengine's log lines: not the report
        fx = prepare(config, workdir, n_patches, n_images, seed)
        log("computing the single-image answers in-process ...")
        expected = references(fx, MIXED, score_thr)
    exact = strategy == "group"
    runs = []
    names = [f"p{i}" for i in range(n_patches)]

    def run(label, server, models, exact=exact):
        warm_up(server, fx, models)
        log(f"{label}: {clients} clients x {requests} requests over {models} ...")
        result = {
            "name": label,
            **traffic(server, fx, expected, models, clients, requests, exact, seed),
        }
        log(f"  {result['throughput_rps']} req/s, p50 {result['p50_ms']} ms, p99 "
            f"{result['p99_ms']} ms, {result['mismatches']} mismatches, {result['errors']} errors")  # fmt: skip
        runs.append(result)
        return result

    with _engine(fx, names, workdir, strategy, max_batch, max_wait_ms, score_thr) as server:
        if not quick:
            run("single", server, ("p0",))
        run("mixed", server, MIXED)
    if not quick:
        with _engine(fx, ["p0"], workdir, strategy, max_batch, max_wait_ms, score_thr) as server:
            run("single, 1 patch loaded", server, ("p0",))
        port = free_port()
        cmd = copies_command(fx, list(MIXED[1:]), port, score_thr)
        with Server(cmd, workdir / "server_copies.log", port) as server:
            run("mixed, copies", server, MIXED, exact=True)
    import torch

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU",
        "torch": torch.__version__,
        "config": str(config),
        "patches_loaded": n_patches,
        "strategy": strategy,
        "max_batch": max_batch,
        "max_wait_ms": max_wait_ms,
        "score_thr": score_thr,
        "images": n_images,
        "compare": "exact" if exact else f"tolerance {TOLERANCE}",
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _engine(fx, names, workdir, strategy, max_batch, max_wait_ms, score_thr) -> Server:
    port = free_port()
    cmd = engine_command(fx, names, port, strategy, max_batch, max_wait_ms, score_thr)
    return Server(cmd, workdir / f"server_engine_{len(names)}.log", port)


def report(result: dict) -> str:
    """The record as a markdown table plus the ratios the issue sets targets on."""
    lines = [
        f"{result['config']}, {result['patches_loaded']} patches loaded, strategy "
        f"{result['strategy']}, max batch {result['max_batch']}, {result['machine']}, torch "
        f"{result['torch']}, {result['date']}; answers compared {result['compare']}",
        "",
        "| run | models | requests | mismatches | errors | req/s | p50 ms | p99 ms | mean batch"
        " | server RSS MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['name']} | {len(r['models'])} | {r['requests']} | {r['mismatches']} | "
            f"{r['errors']} | {r['throughput_rps']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['mean_batch']:.2f} | {r['server']['VmRSS_mib']:.0f} | "
            f"{r['server']['VmHWM_mib']:.0f} |"
        )
    runs = {r["name"]: r for r in result["runs"]}
    if "single, 1 patch loaded" in runs and "single" in runs:
        one, many = runs["single, 1 patch loaded"]["server"], runs["single"]["server"]
        lines.append(
            f"\n- RSS with {result['patches_loaded']} patches vs 1 (same traffic): "
            f"{many['VmRSS_mib'] / one['VmRSS_mib']:.3f}x (peak "
            f"{many['VmHWM_mib'] / one['VmHWM_mib']:.3f}x); target ≤ 1.2x"
        )
    if "single" in runs and "mixed" in runs:
        lines.append(
            f"- mixed-patch / single-patch throughput (same server, max batch "
            f"{result['max_batch']}): {runs['mixed']['throughput_rps'] / runs['single']['throughput_rps']:.2f}x"
            "; target ≥ 0.8x"
        )
    if "mixed, copies" in runs and "mixed" in runs:
        c, m = runs["mixed, copies"], runs["mixed"]
        lines.append(
            f"- one model copy per patch, the same mixed traffic: {c['throughput_rps']:.2f} req/s, "
            f"RSS {c['server']['VmRSS_mib']:.0f} MiB vs {m['server']['VmRSS_mib']:.0f} MiB "
            f"(one base + {result['patches_loaded']} patches)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(serve_copies())
