"""End to end through tools/train.py and tools/test.py, in subprocesses, on generated data.

Detection (VOC layout, mmdet ``VOCDataset``): a base checkpoint (random weights, written as
an mmengine checkpoint with its classes), a Δ-patch trained from it with ``load_from``, a run
killed by SIGKILL after its first checkpoint and resumed with ``--resume``, then
``tools/test.py`` with and without ``--patch``: without it the predictions are the base's,
bit for bit. Also: 2-process CPU DDP (gloo) training, and mmdet's own tools/train.py +
tools/test.py on a delta config. Segmentation (mmseg ``BaseSegDataset``) goes through the
same tools in ``test_interruption.py``, whose runs it shares.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from tool_runs import (
    base_part,
    data_options,
    derived_config,
    predictions,
    run_tool,
    same,
    write_base_checkpoint,
)

from mmdelta import base_state_dict, load_patch, patch_names
from mmdelta.apis import init_patched_model
from mmdelta.datasets.synthetic import write_voc_dataset
from mmdelta.runner import read_checkpoint

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
CLASSES = ("square", "disc", "bar")
DET_CONFIG = TESTS / "configs" / "e2e_det_voc_tiny.py"
SEG_CONFIG = TESTS / "configs" / "e2e_seg_tiny.py"


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det")
    data = Path(write_voc_dataset(tmp / "data", CLASSES, 12, 6, image_size=(96, 96), seed=0))
    base = write_base_checkpoint(DET_CONFIG, tmp / "base.pth", CLASSES)
    # every detection is kept (score_thr 0), so predictions are many and comparable
    opts = [*data_options(data), "model.test_cfg.rcnn.score_thr=0.0"]
    return dict(tmp=tmp, data=data, base=base, opts=opts)


def test_detection_train_kill_resume_test(det):
    tmp, base, opts = det["tmp"], det["base"], det["opts"]
    work = tmp / "work"
    killed = derived_config(
        tmp,
        "killed",
        DET_CONFIG,
        "custom_imports = dict(imports=['mmdelta', 'runner_probes'], allow_failed_imports=False)\n"
        "custom_hooks = [dict(type='DeltaPatchHook'), dict(type='KillAfterIter', at=3)]",
    )
    proc = run_tool(
        "tools/train.py", killed, "--work-dir", work, "--cfg-options", f"load_from={base}", *opts,
        check=False,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (work / "iter_3.pth").exists() and (work / "iter_3.patch.safetensors").exists()
    assert not (work / "tiny.patch.safetensors").exists()  # the run never finished
    assert not list(work.glob(".*.tmp")), "a temporary patch file was left behind"

    # --resume: continues from iter 3 (Δ, optimiser, schedulers) to the end
    run_tool("tools/train.py", DET_CONFIG, "--work-dir", work, "--resume", "--cfg-options", *opts)
    log = max(work.glob("*/*.log"), key=lambda p: p.stat().st_mtime).read_text()
    assert "resumed epoch: 0, iter: 3" in log
    assert "Iter(train) [6/6]" in log and "Iter(train) [1/6]" not in log
    assert "% of the full checkpoint" in log
    final = work / "tiny.patch.safetensors"
    assert final.exists() and (work / "iter_6.patch.safetensors").exists()

    # the base inside every training checkpoint is the base, bit for bit (BN statistics too)
    base_state = base_part(base)
    for ckpt in ("iter_3.pth", "iter_6.pth"):
        trained = base_part(work / ckpt)
        assert trained.keys() == base_state.keys()
        assert all(torch.equal(trained[k], base_state[k]) for k in base_state), ckpt
    delta = {
        k: v
        for k, v in read_checkpoint(str(work / "iter_6.pth"))["state_dict"].items()
        if ".delta." in k
    }
    assert any(v.abs().sum() > 0 for v in delta.values()), "the patch did not train"

    # tools/test.py: without --patch the base's predictions exactly; with it, the patch's
    def test(name, *args, cfg=()):
        out = tmp / f"{name}.pkl"
        run_tool(
            "tools/test.py", *args, "--out", out, "--work-dir", tmp / name,
            "--cfg-options", *opts, *cfg,
        )  # fmt: skip
        return predictions(out)

    plain = test("plain", DET_CONFIG, base, cfg=["delta_patch=None"])  # the base config as is
    off = test("off", DET_CONFIG, base)
    on = test("on", DET_CONFIG, base, "--patch", final)
    assert len(plain) == 6 and sum(len(p["pred_instances"]["scores"]) for p in plain) > 0
    assert same(plain, off)
    assert not same(plain, on)
    # a training checkpoint carries its patch: tested with it, unless --patch overrides
    from_ckpt = test("ckpt", DET_CONFIG, work / "iter_6.pth")
    assert same(from_ckpt, on)

    # the inference helper builds the same patched model
    model = init_patched_model(str(DET_CONFIG), str(base), final)
    assert patch_names(model) == ["tiny"]


def test_cpu_ddp_two_processes(det):
    """torchrun, 2 CPU processes, gloo: only Δ trains, the base stays bitwise on both ranks."""
    tmp, base = det["tmp"], det["base"]
    probe, work = tmp / "probe", tmp / "ddp"
    config = derived_config(
        tmp,
        "ddp",
        DET_CONFIG,
        "custom_imports = dict(imports=['mmdelta', 'runner_probes'], allow_failed_imports=False)\n"
        f"custom_hooks = [dict(type='DeltaPatchHook'), dict(type='DeltaProbe', out_dir={str(probe)!r})]\n"
        "train_cfg = dict(max_iters=2, val_interval=100)\n"
        "default_hooks = dict(checkpoint=dict(interval=2))",
    )
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29617",
    ]
    run_tool(
        "tools/train.py", config, "--launcher", "pytorch", "--work-dir", work,
        "--cfg-options", f"load_from={base}", *det["opts"], launcher=torchrun,
    )  # fmt: skip
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    from runner_probes import fingerprint

    base_print = fingerprint(base_part(base))
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["wrapped"] == "MMDistributedDataParallel"
        assert rank["base_fingerprint"] == base_print
        assert rank["changed"] and all(".delta." in k for k in rank["changed"])
        assert rank["requires_grad"] and all(".delta." in k for k in rank["requires_grad"])
    assert ranks[0]["delta_fingerprint"] == ranks[1]["delta_fingerprint"]  # DDP kept them equal

    # the patch rank 0 wrote loads in a single process onto the base
    cfg = Config.fromfile(str(DET_CONFIG))
    init_default_scope("mmdet")
    model = MODELS.build(cfg.model)
    model.load_state_dict(read_checkpoint(str(base))["state_dict"])
    assert load_patch(model, work / "tiny.patch.safetensors") == "tiny"
    assert all(torch.equal(v, base_part(base)[k]) for k, v in base_state_dict(model).items())


def test_mmdet_own_tools(det):
    """mmdet's unmodified tools/train.py and tools/test.py honour runner_type='DeltaRunner'."""
    import mmdet

    tools = Path(mmdet.__file__).parent / ".mim" / "tools"
    tmp, base, opts = det["tmp"], det["base"], det["opts"]
    work = tmp / "mmdet_tools"
    config = derived_config(
        tmp,
        "mmdet_tools",
        DET_CONFIG,
        "train_cfg = dict(max_iters=3, val_interval=3)\n"
        "default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=1))\n"
        # the base task's own validation set, evaluated with the patch off at every evaluation
        "custom_hooks = [dict(type='DeltaPatchHook', "
        "base_val_dataloader={{_base_.val_dataloader}}, "
        "base_val_evaluator={{_base_.val_evaluator}})]",
    )
    base_val = f"custom_hooks.0.base_val_dataloader.dataset.data_root={det['data']}"
    run_tool(
        tools / "train.py", config, "--work-dir", work, "--cfg-options", f"load_from={base}",
        base_val, *opts,
    )  # fmt: skip
    assert (work / "tiny.patch.safetensors").exists() and (
        work / "iter_3.patch.safetensors"
    ).exists()
    # max_keep_ckpts=1: the patch files of deleted checkpoints went with them
    assert sorted(p.name for p in work.glob("*.patch.safetensors")) == [
        "iter_3.patch.safetensors",
        "tiny.patch.safetensors",
    ]
    log = max(work.glob("*/*.log"), key=lambda p: p.stat().st_mtime).read_text()
    assert "| base task (patch off): pascal_voc/mAP" in log
    assert '"base/pascal_voc/mAP"' in (max(work.glob("*/vis_data/scalars.json"))).read_text()
    out = tmp / "mmdet_test.pkl"
    run_tool(
        tools / "test.py",
        config,
        work / "iter_3.pth",
        "--out",
        out,
        "--work-dir",
        work,
        "--cfg-options",
        *opts,
    )
    ours = tmp / "ours_test.pkl"
    run_tool("tools/test.py", config, base, "--patch", work / "tiny.patch.safetensors", "--out", ours,
             "--work-dir", work, "--cfg-options", *opts)  # fmt: skip
    # (mmdet's DumpDetResults drops the ground truth: compare the predictions)
    preds = [[p["pred_instances"] for p in predictions(f)] for f in (out, ours)]
    assert sum(len(p["scores"]) for p in preds[0]) > 0 and same(*preds)
