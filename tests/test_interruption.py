"""Interrupted runs and files: SIGKILL during training, SIGKILL during a patch write, and the
base checkpoint file never modified by training or testing.

Segmentation (mmseg FCN on ResNetV1c-18, tiny, generated data, random flips) with a patch
that has Δ branches, its own BatchNorm statistics (``task_norm``) and an owned classifier,
trained with SGD + momentum (so the optimiser has state to restore). The same runs serve the
segmentation end-to-end checks of tools/test.py (patch off = the plain config's predictions
and metrics, bit for bit; mmseg's own test.py refused).
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tool_runs import (
    base_part,
    data_options,
    derived_config,
    predictions,
    run_tool,
    same,
    write_base_checkpoint,
)

from mmdelta.datasets.synthetic import write_seg_dataset
from mmdelta.fileio import remove_stale_temporaries
from mmdelta.patching import read_patch_file
from mmdelta.runner import read_checkpoint

TESTS = Path(__file__).resolve().parent
SEG_CONFIG = TESTS / "configs" / "e2e_seg_tiny.py"
CLASSES = ("square", "disc", "bar")
ITERS, KILL_AT = 8, 4


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def last_scalars(work: Path) -> tuple[dict, dict]:
    """The last training record and the last validation record of the run's newest
    mmengine ``scalars.json``."""
    scalars = max(work.glob("*/vis_data/scalars.json"), key=lambda p: p.stat().st_mtime)
    records = [json.loads(line) for line in scalars.read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "mIoU" in r]
    assert train and val, f"no training or validation records in {scalars}"
    return train[-1], val[-1]


def patch_tensors(path: Path) -> dict:
    return read_patch_file(path)[1]


@pytest.mark.slow
def test_sigkill_and_resume_continue_the_run_bit_for_bit(tmp_path):
    """Killed after its checkpoint at KILL_AT (validation there too) and resumed: the run
    restores Δ, owned tensors, optimiser and schedulers exactly as saved, and — random
    states travel with the checkpoint — finishes with the uninterrupted run's patch, bit for
    bit. Another seed shows the run-to-run noise that a resume no longer adds."""
    data = Path(write_seg_dataset(tmp_path / "data", CLASSES, 16, 8, image_size=(64, 64), seed=3))
    base = write_base_checkpoint(SEG_CONFIG, tmp_path / "base.pth", ("background", *CLASSES))
    base_sum = sha256(base)
    config = derived_config(
        tmp_path,
        "patch",
        SEG_CONFIG,
        textwrap.dedent(f"""
            delta_patch = dict(name="tiny", task_norm=True, trainable=["decode_head.conv_seg"])
            train_cfg = dict(max_iters={ITERS}, val_interval={KILL_AT})
            param_scheduler = [dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=0,
                                    end={ITERS}, by_epoch=False)]
            default_hooks = dict(checkpoint=dict(interval={KILL_AT}))
            custom_imports = dict(imports=["mmdelta", "runner_probes", "mmseg.datasets",
                                           "mmseg.evaluation", "mmseg.models"],
                                  allow_failed_imports=False)
        """),
    )
    opts = [f"load_from={base}", *data_options(data)]

    def with_hook(name: str, hook: str) -> Path:
        hooks = f"custom_hooks = [dict(type='DeltaPatchHook'), {hook}]"
        return derived_config(tmp_path, name, config, hooks)

    def train(work: Path, seed: int, *args, cfg: Path = config, check=True):
        return run_tool(
            "tools/train.py", cfg, "--work-dir", work, *args, "--cfg-options", *opts,
            f"randomness.seed={seed}", check=check,
        )  # fmt: skip

    for seed in (0, 1):  # uninterrupted
        train(tmp_path / f"clean{seed}", seed)

    # seed 0 again, killed right after its checkpoint at KILL_AT, then resumed
    work = tmp_path / "killed"
    killed = with_hook("killed", f"dict(type='KillAfterIter', at={KILL_AT})")
    proc = train(work, 0, cfg=killed, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (work / f"iter_{KILL_AT}.pth").exists()
    assert not (work / "tiny.patch.safetensors").exists()
    probe = tmp_path / "resumed.pt"
    probed = with_hook("probed", f"dict(type='ResumeProbe', out={str(probe)!r})")
    proc = train(work, 0, "--resume", cfg=probed)
    log = proc.stdout + proc.stderr
    assert f"resumed epoch: 0, iter: {KILL_AT}" in log
    assert "random states restored from the checkpoint" in log

    # what the resumed run started from is exactly what the checkpoint holds
    saved = read_checkpoint(str(work / f"iter_{KILL_AT}.pth"))
    started = torch.load(probe, weights_only=False)  # written by this test's own probe
    assert started["iter"] == KILL_AT
    saved_patch = {k: v for k, v in saved["state_dict"].items() if ".delta." in k}
    assert started["patch"].keys() == saved_patch.keys()
    kinds = {k.rsplit(".", 1)[-1] for k in saved_patch}
    assert {"up", "down", "own_running_mean", "own_weight"} <= kinds, kinds  # Δ and owned
    assert same(started["patch"], saved_patch)
    assert any(v.abs().sum() > 0 for k, v in saved_patch.items() if k.endswith(".up"))
    assert started["optimizer"]["state"], "SGD momentum buffers were not restored"
    assert same(started["optimizer"], saved["optimizer"])
    assert same(started["param_schedulers"], saved["param_schedulers"])

    # it finishes with the uninterrupted run's patch, bit for bit; another seed differs
    final = {run: patch_tensors(tmp_path / run / "tiny.patch.safetensors") for run in
             ("clean0", "clean1", "killed")}  # fmt: skip
    assert same(final["killed"], final["clean0"])
    assert not same(final["clean1"], final["clean0"])
    scalars = {run: last_scalars(tmp_path / run) for run in final}
    assert scalars["killed"][0]["loss"] == scalars["clean0"][0]["loss"]
    assert scalars["killed"][1]["mIoU"] == scalars["clean0"][1]["mIoU"]
    print(
        "\nfinal loss / mIoU: "
        + ", ".join(f"{run} {t['loss']:.4f} / {v['mIoU']:.2f}" for run, (t, v) in scalars.items())
    )

    # tools/test.py: without --patch the base's predictions and metrics, exactly as the plain
    # config (delta_patch=None) gives them; with --patch the patch's
    patch_file = work / "tiny.patch.safetensors"
    results, metrics = {}, {}
    runs = (
        ("plain", [], ["delta_patch=None"]),
        ("off", [], []),
        ("on", ["--patch", patch_file], []),
    )
    for name, args, options in runs:
        run_tool(
            "tools/test.py", config, base, *args, "--out", tmp_path / f"{name}.pkl",
            "--work-dir", tmp_path / name, "--metrics-out", tmp_path / f"{name}.json",
            "--cfg-options", *data_options(data), *options,
        )  # fmt: skip
        results[name] = predictions(tmp_path / f"{name}.pkl")
        metrics[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert len(results["plain"]) == 8 and same(results["plain"], results["off"])
    assert not same(results["plain"], results["on"])
    assert metrics["plain"] == metrics["off"] and "mIoU" in metrics["off"]

    # mmseg's own tools/test.py ignores runner_type: a patched config must not run there
    import mmseg

    mmseg_test = Path(mmseg.__file__).parent / ".mim" / "tools" / "test.py"
    proc = run_tool(
        mmseg_test, config, work / f"iter_{ITERS}.pth", "--work-dir", tmp_path / "mmseg",
        "--cfg-options", *data_options(data), check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "ignores it and would use the unpatched model" in proc.stderr

    # the base checkpoint file was read by four training runs and three test runs, never written
    assert sha256(base) == base_sum
    base_state = base_part(base)
    assert all(
        torch.equal(v, base_state[k]) for k, v in base_part(work / f"iter_{ITERS}.pth").items()
    )


# a plain torchvision ResNet-50 as the backbone (no OpenMMLab model to import and build, so
# each writer starts sooner): a 19 MiB patch, about 0.1 s per write
WRITER = """
import torch, torchvision
from mmdelta import apply_delta_patch, save_patch

model = torch.nn.Module()
model.backbone = torchvision.models.resnet50()
apply_delta_patch(model, dict(name="big", branch=dict(type="LowRankDelta", rank=64)))
deltas = [p for n, p in model.named_parameters() if ".delta." in n]
for version in range(1, 1000):
    with torch.no_grad():
        for p in deltas:
            p.fill_(version)
    print("writing", version, flush=True)
    save_patch(model, {path!r}, overwrite=True)
    print("written", version, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_patch_writes_never_leaves_a_truncated_patch(tmp_path):
    """Writer processes rewrite a large patch file in a loop and are SIGKILLed at various
    moments of a write: the file is always a complete version (the one being written or the
    one before), never truncated; the temporary file a killed writer leaves is removed by
    the next writer's first write."""
    path = tmp_path / "big.patch.safetensors"
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(path=str(path)))

    def temporaries() -> set[str]:
        return {p.name for p in tmp_path.glob(f".{path.name}.*.tmp")}

    left_behind = []
    for delay in (0.0, 0.005, 0.02, 0.05, 0.1):
        proc = subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for line in proc.stdout:  # the second write starts: one version is complete
            if line.split() == ["writing", "2"]:
                break
        else:
            raise AssertionError(proc.stderr.read()[-3000:])
        # the first write removed what the previous (killed) writer left
        assert all(f".{proc.pid}." in name for name in temporaries()), temporaries()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        started = [int(v) for k, v in (ln.split() for ln in proc.stdout) if k == "writing"]
        proc.stdout.close()
        proc.stderr.close()
        last = max([2, *started])
        meta, tensors = read_patch_file(path)  # complete and readable, or this raises
        values = {float(t.flatten()[0]) for k, t in tensors.items() if k.endswith(":up")}
        assert meta["mmdelta.name"] == "big" and len(values) == 1
        assert values.pop() in (last - 1, last)
        left_behind.append(temporaries())
    assert any(left_behind), "no kill landed inside a write: the test tested nothing"
    remove_stale_temporaries(path)
    assert not temporaries()


def test_random_states_survive_a_weights_only_checkpoint_round_trip(tmp_path):
    """What RandomStateHook saves loads through the checked (weights-only) reader, and
    restoring it replays the same Python, NumPy and torch draws."""
    import random

    import numpy as np

    from mmdelta.runner.random_state import KEY, _as_python, capture, restore

    torch.save({"state_dict": {}, "meta": {}, KEY: capture()}, tmp_path / "c.pth")

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    first = draws()
    state = read_checkpoint(str(tmp_path / "c.pth"))[KEY]
    restore(dict(state, python=_as_python(state["python"])))
    assert draws() == first
