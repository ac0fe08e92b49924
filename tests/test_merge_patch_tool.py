"""``tools/merge_patch.py``: a patch merged into a standalone checkpoint + config.

The tool runs as a subprocess on a base checkpoint and a patch file written here (a tiny
Faster R-CNN with a new class set, a tiny FCN segmenter with one; low-rank Δ, task norms and
the new heads all perturbed so the merge matters). A second subprocess, in which importing
mmdelta raises, loads what it wrote with plain ``init_detector`` / ``init_model`` and runs
``mode='tensor'``; its outputs must equal the patched model's here within 1e-5 relative.
A ``BlockDelta`` patch is refused, and existing outputs are kept without ``--force``.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

from mmdelta import LowRankDelta, PatchOwned, apply_delta_patch, save_patch
from mmdelta.deploy.standalone import write_standalone
from mmdelta.exactness import flat_tensors
from mmdelta.patching import PatchFileError
from mmdelta.patching.slot import iter_slots

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "merge_patch.py"
DET_CONFIG = REPO / "tests" / "configs" / "e2e_det_voc_tiny.py"
SEG_CONFIG = REPO / "tests" / "configs" / "e2e_seg_tiny.py"
TOL = 1e-5  # relative to each output tensor's max abs
DET_BASE = ("square", "disc", "bar")
DET_NEW = ("triangle", "ring", "cross", "square")  # 'square' starts from the base's rows
SEG_BASE = ("background", "square", "disc", "bar")
SEG_NEW = ("background", "triangle", "ring")


def build(config: Path, seed: int = 0) -> torch.nn.Module:
    cfg = Config.fromfile(str(config))
    init_default_scope(cfg.default_scope)
    torch.manual_seed(seed)
    return MODELS.build(cfg.model).eval()  # PyTorch's default init: random enough


def perturb(model: torch.nn.Module, seed: int = 0) -> int:
    """Random Δ (‖ΔW‖ ≈ 0.2‖W‖) on every low-rank branch; owned tensors (heads, task norms)
    perturbed. Returns how many branches were changed."""
    gen = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for path, slot in iter_slots(model):
            for branch in slot.values():
                if isinstance(branch, LowRankDelta):
                    branch.up.copy_(torch.randn(branch.up.shape, generator=gen))
                    layer = model.get_submodule(path)
                    branch.up.mul_(0.2 * layer.weight.norm() / branch.delta_weight().norm())
                elif isinstance(branch, PatchOwned):
                    for tensor in branch.parameters():
                        tensor.add_(0.1 * torch.randn(tensor.shape, generator=gen))
                    for key, tensor in branch.named_buffers():
                        if key.endswith("running_mean"):
                            tensor.add_(0.1 * torch.randn(tensor.shape, generator=gen))
                        elif key.endswith("running_var"):
                            tensor.mul_(1 + 0.3 * torch.rand(tensor.shape, generator=gen))
                else:
                    continue
                changed += 1
    return changed


def raw_batch(size: int, seed: int = 0) -> dict:
    """Two uint8 images and their plain metainfo (what the subprocess rebuilds samples from)."""
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8)] * 2
    images[1] = torch.flip(images[0], dims=[2])
    meta = dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0))
    return {"inputs": images, "metainfo": [dict(meta), dict(meta)]}


def tensor_outputs(model, batch: dict, scope: str) -> list[torch.Tensor]:
    if scope == "mmdet":
        from mmdet.structures import DetDataSample as Sample
    else:
        from mmseg.structures import SegDataSample as Sample
    samples = [Sample(metainfo=m) for m in batch["metainfo"]]
    with torch.no_grad():
        data = model.data_preprocessor(dict(inputs=batch["inputs"], data_samples=samples), False)
        return flat_tensors(model(**data, mode="tensor"))


def max_rel_err(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    assert len(got) == len(expected)
    errs = []
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape, (g.shape, e.shape)
        errs.append(((g - e).abs().max() / e.abs().max()).item())
    return max(errs)


def make_case(tmp: Path, config: Path, scope, base_classes, patch_cfg: dict, size: int):
    """Base checkpoint + patch file of ``patch_cfg`` with a perturbed Δ; the patched model's
    outputs on a fixed batch (saved for the subprocess)."""
    model = build(config)
    model.dataset_meta = {"classes": base_classes}
    base = tmp / "base.pth"
    meta = {"dataset_meta": {"classes": base_classes}}
    torch.save({"meta": meta, "state_dict": model.state_dict()}, base)
    if scope == "mmdet":
        model.rpn_head.test_cfg.max_per_img = 100  # as the config's test_cfg
    apply_delta_patch(model, patch_cfg)
    assert perturb(model) >= 20
    patch = save_patch(model, tmp / f"{patch_cfg['name']}.patch.safetensors")
    batch = raw_batch(size)
    torch.save(batch, tmp / "batch.pt")
    expected = tensor_outputs(model, batch, scope)
    return SimpleNamespace(
        tmp=tmp, config=config, scope=scope, base=base, patch=patch, batch=tmp / "batch.pt",
        expected=expected, classes=patch_cfg.get("classes"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def det_case(tmp_path_factory):
    patch_cfg = dict(
        name="newcls",
        classes=list(DET_NEW),
        task_norm=True,
        targets=["backbone", "neck", "rpn_head.rpn_conv", "roi_head.bbox_head.shared_fcs"],
    )
    return make_case(tmp_path_factory.mktemp("det"), DET_CONFIG, "mmdet", DET_BASE, patch_cfg, 96)


@pytest.fixture(scope="module")
def seg_case(tmp_path_factory):
    patch_cfg = dict(name="shapes2", classes=list(SEG_NEW), task_norm=True)
    return make_case(tmp_path_factory.mktemp("seg"), SEG_CONFIG, "mmseg", SEG_BASE, patch_cfg, 64)


def tool_cmd(*args) -> list[str]:
    return [sys.executable, str(TOOL), *map(str, args)]


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run(tool_cmd(*args), capture_output=True, text=True, timeout=300, cwd=REPO)


#: runs in a fresh interpreter in which importing mmdelta raises: plain upstream only
PLAIN_LOADER = r"""
import importlib.abc
import sys


class NoMmdelta(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mmdelta" or name.startswith("mmdelta."):
            raise ImportError(f"{name} imported while loading a standalone checkpoint")


sys.meta_path.insert(0, NoMmdelta())

import json
import torch
from mmengine.runner import load_checkpoint


def flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for item in out for t in flat(item)] if isinstance(out, (list, tuple)) else []


for job in json.loads(sys.argv[1]):
    if job["scope"] == "mmdet":
        from mmdet.apis import init_detector as init
        from mmdet.structures import DetDataSample as Sample
    else:
        from mmseg.apis import init_model as init
        from mmseg.structures import SegDataSample as Sample
    model = init(job["config"], job["checkpoint"], device="cpu")
    load_checkpoint(model, job["checkpoint"], map_location="cpu", strict=True)  # every key
    saved = torch.load(job["checkpoint"], map_location="cpu", weights_only=True)
    batch = torch.load(job["batch"], weights_only=True)
    samples = [Sample(metainfo=m) for m in batch["metainfo"]]
    with torch.no_grad():
        data = model.data_preprocessor(dict(inputs=batch["inputs"], data_samples=samples), False)
        out = flat(model(**data, mode="tensor"))
    classes = list(model.dataset_meta["classes"])
    result = dict(outputs=out, classes=classes, meta=saved["meta"], keys=sorted(saved))
    torch.save(result, job["out"])

leaked = sorted(m for m in sys.modules if m == "mmdelta" or m.startswith("mmdelta."))
assert not leaked, leaked
print("no mmdelta imported")
"""


@pytest.fixture(scope="module")
def standalone(det_case, seg_case):
    """Both cases through the tool (two subprocesses at once), then what they wrote through
    plain mmdet / mmseg in one subprocess that cannot import mmdelta. Returns scope ->
    (plain-upstream result, checkpoint, config)."""
    cases = {case.scope: case for case in (det_case, seg_case)}
    outs = {scope: case.tmp / "out" / "standalone.pth" for scope, case in cases.items()}
    procs = {
        scope: subprocess.Popen(
            tool_cmd(case.config, case.base, case.patch, "--out", outs[scope]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for scope, case in cases.items()
    }
    for scope, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{scope}: {err[-6000:]}"
        out = outs[scope]
        assert out.is_file() and out.with_suffix(".py").is_file()
        assert not list(out.parent.glob(".*.tmp")), "a temporary file was left behind"
    jobs = [
        dict(
            scope=scope,
            config=str(outs[scope].with_suffix(".py")),
            checkpoint=str(outs[scope]),
            batch=str(case.batch),
            out=str(case.tmp / "plain_out.pt"),
        )
        for scope, case in cases.items()
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOADER, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=det_case.tmp,  # nothing of the repository on the path
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.splitlines()[-1] == "no mmdelta imported", proc.stdout[-2000:]
    return {
        job["scope"]: (
            torch.load(job["out"], weights_only=True),
            Path(job["checkpoint"]),
            Path(job["config"]),
        )
        for job in jobs
    }


def check_standalone(case, result: dict, out_ckpt: Path, out_cfg: Path) -> None:
    err = max_rel_err(result["outputs"], case.expected)
    assert err <= TOL, f"standalone vs patched: relative error {err:.3g} > {TOL}"
    assert result["keys"] == ["meta", "state_dict"]
    assert result["classes"] == list(case.classes)
    provenance = result["meta"]["mmdelta"]
    assert provenance["patch_name"] == case.patch.name.split(".")[0]
    for key, path in (("patch_sha256", case.patch), ("base_checkpoint_sha256", case.base)):
        assert provenance[key] == hashlib.sha256(path.read_bytes()).hexdigest()
    # the merge matters: the base's weights changed where Δ was folded in
    base = torch.load(case.base, weights_only=True)["state_dict"]
    merged = torch.load(out_ckpt, weights_only=True)["state_dict"]
    assert list(merged) == list(base)
    changed = [
        k for k in base if base[k].shape == merged[k].shape and not torch.equal(base[k], merged[k])
    ]
    assert sum(k.startswith("backbone.") and k.endswith("conv1.weight") for k in changed) >= 4
    assert any(k.endswith("running_mean") for k in changed), "task norm statistics not merged"
    # the config is plain: nothing of mmdelta, the patch's classes
    text = out_cfg.read_text()
    for word in ("mmdelta", "delta_patch", "DeltaRunner", "DeltaPatchHook"):
        assert word not in text, f"{word} in the standalone config:\n{text}"
    cfg = Config.fromfile(str(out_cfg))
    assert cfg.test_dataloader.dataset.metainfo.classes == tuple(case.classes)


@pytest.mark.slow
def test_standalone_checkpoints_load_in_plain_mmdet_and_mmseg(det_case, seg_case, standalone):
    """One test for both (the fixture runs the two tools and the plain loader at once; under
    pytest-xdist two tests could land on two workers and run it twice)."""
    detector_standalone_loads_in_plain_mmdet(det_case, standalone)
    segmenter_standalone_loads_in_plain_mmseg(seg_case, standalone)


def detector_standalone_loads_in_plain_mmdet(det_case, standalone):
    result, out_ckpt, out_cfg = standalone["mmdet"]
    check_standalone(det_case, result, out_ckpt, out_cfg)
    cfg = Config.fromfile(str(out_cfg))
    assert cfg.model.roi_head.bbox_head.num_classes == len(DET_NEW)
    assert cfg.model.rpn_head.get("num_classes", 1) == 1  # the RPN is class-agnostic
    assert cfg.classes == DET_NEW  # the config's own `classes` variable held the base's
    # mode='tensor' of a two-stage detector: the RoI head's class scores and box deltas
    scores, deltas = det_case.expected
    assert scores.shape[-1] == len(DET_NEW) + 1  # fc_cls: the classes + background
    assert deltas.shape[-1] == 4 * len(DET_NEW)  # fc_reg: per class


def segmenter_standalone_loads_in_plain_mmseg(seg_case, standalone):
    result, out_ckpt, out_cfg = standalone["mmseg"]
    check_standalone(seg_case, result, out_ckpt, out_cfg)
    cfg = Config.fromfile(str(out_cfg))
    assert cfg.model.decode_head.num_classes == cfg.model.auxiliary_head.num_classes == 3
    assert cfg.metainfo.classes == SEG_NEW and "palette" not in cfg.metainfo
    assert cfg.custom_imports.imports == ["mmseg.datasets", "mmseg.evaluation", "mmseg.models"]
    assert seg_case.expected[0].shape[1] == len(SEG_NEW)


def test_block_delta_patch_is_refused(tmp_path):
    model = build(SEG_CONFIG)
    base = tmp_path / "base.pth"
    torch.save(
        {"meta": {"dataset_meta": {"classes": SEG_BASE}}, "state_dict": model.state_dict()}, base
    )
    apply_delta_patch(model, dict(name="blk", branch=dict(type="BlockDelta", width=8)))
    patch = save_patch(model, tmp_path / "blk.patch.safetensors")
    out = tmp_path / "out" / "standalone.pth"
    proc = run_tool(SEG_CONFIG, base, patch, "--out", out)
    assert proc.returncode != 0
    assert "BlockDelta" in proc.stderr and "backbone.layer" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "init_patched_model" in proc.stderr and "LowRankDelta" in proc.stderr
    assert not out.exists() and not out.with_suffix(".py").exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_existing_output_kept_without_force(seg_case, tmp_path):
    out = tmp_path / "standalone.pth"
    out.write_bytes(b"an earlier checkpoint")
    inputs = (SEG_CONFIG, seg_case.base, seg_case.patch, out)
    with pytest.raises(FileExistsError) as refused:  # what the tool calls, in this process
        write_standalone(*inputs)
    err = str(refused.value)
    assert str(out) in err and "exists" in err and "--force" in err, err
    assert out.read_bytes() == b"an earlier checkpoint"
    assert not out.with_suffix(".py").exists()
    # the config alone existing also blocks the write
    out.unlink()
    out.with_suffix(".py").write_text("# mine\n")
    with pytest.raises(FileExistsError):
        write_standalone(*inputs)
    assert not out.exists() and out.with_suffix(".py").read_text() == "# mine\n"
    out.write_bytes(b"an earlier checkpoint")
    write_standalone(*inputs, overwrite=True)
    assert out.read_bytes() != b"an earlier checkpoint"
    assert "mmdelta" not in out.with_suffix(".py").read_text()
    assert torch.load(out, weights_only=True)["meta"]["dataset_meta"]["classes"] == SEG_NEW


@pytest.mark.parametrize("missing", ["config", "base checkpoint", "patch file"])
def test_missing_input_is_named(seg_case, tmp_path, missing):
    inputs = {"config": SEG_CONFIG, "base checkpoint": seg_case.base, "patch file": seg_case.patch}
    inputs[missing] = tmp_path / "nowhere.bin"
    out = tmp_path / "standalone.pth"
    with pytest.raises(FileNotFoundError) as refused:
        write_standalone(*inputs.values(), out)
    err = str(refused.value)
    assert f"{missing} '{tmp_path / 'nowhere.bin'}' does not exist" in err, err
    assert not list(tmp_path.iterdir())


def test_patch_for_another_base_is_refused(seg_case, tmp_path):
    """A base checkpoint with other weights than the patch was trained on: load_patch's
    PatchFileError is the tool's message, and nothing is written."""
    checkpoint = torch.load(seg_case.base, weights_only=True)
    checkpoint["state_dict"]["backbone.layer1.0.conv1.weight"].mul_(1.01)
    other = tmp_path / "other_base.pth"
    torch.save(checkpoint, other)
    out = tmp_path / "out" / "standalone.pth"
    with pytest.raises(PatchFileError) as refused:
        write_standalone(SEG_CONFIG, other, seg_case.patch, out)
    err = str(refused.value)
    assert "other base weights" in err and str(seg_case.patch) in err, err
    assert not out.exists() and not out.with_suffix(".py").exists()
