"""ONNX export of merged models (``mmdelta.deploy.onnx``, ``tools/export_onnx.py``).

A tiny FCN segmenter with a patch of substantial low-rank Δs and its own BatchNorms
(``task_norm``), merged and exported end to end; a tiny RetinaNet and a tiny Faster R-CNN
(with patches) exported up to their dense heads, the rest of ``predict()`` run in PyTorch on
the onnxruntime outputs. Everything is compared with the *patched* model (not the merged
one), so the chain patch → merge → ONNX → onnxruntime is checked as a whole.

Tolerances: float32 convolutions in onnxruntime (MLAS) and PyTorch (oneDNN) sum in
different orders; measured errors are ~1e-6 of each tensor's max |value| (merge included:
``W + ΔW`` rounds differently from the branch form). ``TOL = 1e-4`` leaves a 50× margin
and is far below what a wrong weight, a missing patch or a wrong normalisation gives
(≥ 1e-2, checked below for the patch). Boxes: ``BOX_ATOL`` px on 80-px images, since box
decoding amplifies the regression errors (``exp`` of the size deltas); labels equal.
"""

import copy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mm_models import build_model, make_batch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

from mmdelta import (
    LowRankDelta,
    PatchOwned,
    apply_delta_patch,
    base_state_dict,
    delta_disabled,
    merge_patch,
    save_patch,
)
from mmdelta.deploy.checked_export import ExportError, export_checked
from mmdelta.deploy.onnx import (
    PatchedModelError,
    check_onnx,
    export_onnx,
    onnx_info,
    onnx_inputs,
    predict_from_onnx,
    run_onnx,
)
from mmdelta.patching.slot import iter_slots

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "configs"
TOL = 1e-4  # max |ONNX − PyTorch| relative to the PyTorch tensor's max |value|
BOX_ATOL = 1e-2  # px
SCORE_ATOL = 1e-4


def build_from_config(name: str, seed: int = 0) -> torch.nn.Module:
    cfg = Config.fromfile(str(CONFIGS / f"{name}.py"))
    init_default_scope(cfg.default_scope)
    torch.manual_seed(seed)
    return MODELS.build(cfg.model).eval()


def set_substantial_delta(model: torch.nn.Module, seed: int = 0) -> int:
    """Random low-rank Δs (‖ΔW‖ ≈ 0.2 ‖W‖) and perturbed patch-owned tensors (task norms,
    heads). Returns the number of low-rank branches."""
    gen = torch.Generator().manual_seed(seed)
    lowrank = 0
    with torch.no_grad():
        for path, slot in iter_slots(model):
            layer = model.get_submodule(path)
            for branch in slot.values():
                if isinstance(branch, LowRankDelta):
                    branch.up.copy_(torch.randn(branch.up.shape, generator=gen))
                    branch.up.mul_(0.2 * layer.weight.norm() / branch.delta_weight().norm())
                    lowrank += 1
                elif isinstance(branch, PatchOwned):
                    for tensor in branch.parameters():
                        noise = torch.randn(tensor.shape, generator=gen)
                        tensor.mul_(1 + 0.1 * noise).add_(0.05 * noise)
                    for key, tensor in branch.named_buffers():
                        if key.endswith("running_mean"):
                            tensor.add_(0.1 * torch.randn(tensor.shape, generator=gen))
                        elif key.endswith("running_var"):
                            tensor.mul_(1 + 0.3 * torch.rand(tensor.shape, generator=gen))
    return lowrank


def fresh(batch: dict) -> dict:
    """A copy of a pipeline batch: ``predict()`` writes its results into the data samples."""
    return copy.deepcopy(batch)


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape, (tuple(got.shape), tuple(expected.shape))
    return ((got - expected).abs().max() / expected.abs().max()).item()


# ------------------------------------------------------------------------------ segmenter


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """FCN R-18 (tests/configs/e2e_seg_tiny.py) with a substantial LowRankDelta + task_norm
    patch, merged and exported (traced at 1×3×64×64, dynamic axes); base checkpoint and
    patch file written for the CLI."""
    tmp = tmp_path_factory.mktemp("onnx_seg")
    model = build_from_config("e2e_seg_tiny")
    checkpoint = tmp / "base.pth"
    classes = ["background", "square", "disc", "bar"]
    torch.save(
        {"state_dict": base_state_dict(model), "meta": {"dataset_meta": {"classes": classes}}},
        checkpoint,
    )
    apply_delta_patch(model, dict(name="shift", task_norm=True))
    lowrank = set_substantial_delta(model)
    patch_file = save_patch(model, tmp / "shift.safetensors")
    merged = merge_patch(model)
    path = export_onnx(merged, tmp / "out" / "seg.onnx", (1, 3, 64, 64))
    batch = make_batch("deeplabv3_r18_v1c", size=64)
    with torch.no_grad():
        data = model.data_preprocessor(fresh(batch), False)
        expected = model.predict(data["inputs"], data["data_samples"])
        data = model.data_preprocessor(fresh(batch), False)
        with delta_disabled(model):
            base = model.predict(data["inputs"], data["data_samples"])
    return SimpleNamespace(
        model=model,
        merged=merged,
        path=path,
        batch=batch,
        expected=expected,
        base=base,
        lowrank=lowrank,
        checkpoint=checkpoint,
        patch_file=patch_file,
        tmp=tmp,
    )


def test_segmenter_onnx_equals_patched_model(seg):
    img, samples = onnx_inputs(seg.merged, fresh(seg.batch))
    assert img.shape == (2, 3, 64, 64) and img.max() > 1  # raw 0–255 images
    outputs = run_onnx(seg.path, img)
    assert list(outputs) == ["seg_logits", "seg_labels"]
    logits = torch.stack([s.seg_logits.data for s in seg.expected])
    labels = torch.stack([s.pred_sem_seg.data[0] for s in seg.expected])
    assert outputs["seg_logits"].shape == (2, 4, 64, 64)
    err = rel_error(outputs["seg_logits"], logits)
    assert err <= TOL, f"ONNX logits vs patched model: relative error {err:.3g} > {TOL}"
    assert outputs["seg_labels"].dtype == torch.int64
    assert torch.equal(outputs["seg_labels"], labels)
    # the patch matters: its logits are far from the base's (a dropped patch would fail)
    base_logits = torch.stack([s.seg_logits.data for s in seg.base])
    assert seg.lowrank >= 20 and rel_error(base_logits, logits) > 1e-2
    # mmseg's post-processing on the ONNX logits gives predict()'s result
    for got, want in zip(
        predict_from_onnx(seg.merged, outputs, samples), seg.expected, strict=True
    ):
        assert torch.equal(got.pred_sem_seg.data, want.pred_sem_seg.data)
        assert rel_error(got.seg_logits.data, want.seg_logits.data) <= TOL


def test_segmenter_onnx_file_and_dynamic_axes(seg):
    # one self-contained file: no external-data file, no temporary file left behind
    assert sorted(p.name for p in seg.path.parent.iterdir()) == ["seg.onnx"]
    info = onnx_info(seg.path)
    assert info["kind"] == "segmenter" and info["fold_preprocess"] and info["channel_swap"]
    assert info["dynamic_axes"] == ["batch", "height", "width"]
    assert info["mean"] == pytest.approx([123.675, 116.28, 103.53])
    # another batch size and image size than the traced 1×3×64×64
    img = torch.rand((3, 3, 48, 80), generator=torch.Generator().manual_seed(1)) * 255
    errors = check_onnx(seg.merged, seg.path, img)
    assert errors["seg_logits"]["rel"] <= TOL, errors
    assert errors["seg_labels"]["mismatched"] == 0, errors


# ------------------------------------------------------------------------------ detectors


def detector_case(model: torch.nn.Module, tmp: Path, name: str, batch_name: str):
    apply_delta_patch(model, dict(name="p"))
    assert set_substantial_delta(model) >= 20
    merged = merge_patch(model)
    path = export_onnx(merged, tmp / f"{name}.onnx", (1, 3, 64, 64))
    # two 80×80 images, padded to 96×96 (pad_size_divisor=32): onnx_inputs pads raw images
    batch = make_batch(batch_name, size=48)
    with torch.no_grad():
        data = model.data_preprocessor(fresh(batch), False)
        expected = model.predict(data["inputs"], data["data_samples"])
        feats = model.extract_feat(data["inputs"])
        head = model.rpn_head if hasattr(model, "rpn_head") else model.bbox_head
        dense = head(feats)
    return SimpleNamespace(
        model=model,
        merged=merged,
        path=path,
        batch=batch,
        expected=expected,
        feats=feats,
        dense=dense,
    )


@pytest.fixture(scope="module")
def retinanet(tmp_path_factory):
    model = build_model("retinanet_r18_fpn")
    return detector_case(
        model, tmp_path_factory.mktemp("onnx_det"), "retinanet", "retinanet_r18_fpn"
    )


def assert_same_detections(got: list, expected: list) -> None:
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        g, e = g.pred_instances, e.pred_instances
        assert len(e) > 0, "the test needs detections"
        assert len(g) == len(e), f"image {i}: {len(g)} vs {len(e)} detections"
        assert torch.equal(g.labels, e.labels), f"image {i}: labels differ"
        box_err = (g.bboxes - e.bboxes).abs().max().item()
        assert box_err <= BOX_ATOL, f"image {i}: boxes differ by {box_err:.3g} px"
        score_err = (g.scores - e.scores).abs().max().item()
        assert score_err <= SCORE_ATOL, f"image {i}: scores differ by {score_err:.3g}"


def test_retinanet_dense_head_outputs(retinanet):
    img, _ = onnx_inputs(retinanet.merged, fresh(retinanet.batch))
    assert img.shape == (2, 3, 96, 96)  # 80×80 raw images, padded like the preprocessor
    pre = retinanet.merged.data_preprocessor
    normalised = (img[:, [2, 1, 0]] - pre.mean) / pre.std  # bgr_to_rgb, then normalise
    assert normalised[:, :, 80:].abs().max() < 1e-5 and normalised[..., 80:].abs().max() < 1e-5
    outputs = run_onnx(retinanet.path, img)
    cls_scores, bbox_preds = retinanet.dense
    assert list(outputs) == [f"cls_score_{i}" for i in range(5)] + [
        f"bbox_pred_{i}" for i in range(5)
    ]
    for got, want in zip(outputs.values(), [*cls_scores, *bbox_preds], strict=True):
        err = rel_error(got, want)
        assert err <= TOL, f"ONNX vs patched model: relative error {err:.3g} > {TOL}"


def test_retinanet_predictions_from_onnx(retinanet):
    img, samples = onnx_inputs(retinanet.merged, fresh(retinanet.batch))
    got = predict_from_onnx(retinanet.merged, run_onnx(retinanet.path, img), samples)
    assert_same_detections(got, retinanet.expected)


@pytest.mark.slow
def test_faster_rcnn_rpn_outputs_and_predictions(tmp_path):
    """Two-stage: ONNX gives the neck features and the RPN outputs; proposals and the RoI
    head run in PyTorch on them."""
    model = build_from_config("e2e_det_voc_tiny")  # ResNet-18, 64-channel FPN, 3 classes
    case = detector_case(model, tmp_path, "faster_rcnn", "faster_rcnn_r50_fpn")
    img, samples = onnx_inputs(case.merged, fresh(case.batch))
    outputs = run_onnx(case.path, img)
    names = [
        f"{group}_{i}" for group in ("feat", "rpn_cls_score", "rpn_bbox_pred") for i in range(5)
    ]
    assert list(outputs) == names
    for name, got, want in zip(
        names, outputs.values(), [*case.feats, *case.dense[0], *case.dense[1]], strict=True
    ):
        err = rel_error(got, want)
        assert err <= TOL, f"{name}: ONNX vs patched model: relative error {err:.3g} > {TOL}"
    assert_same_detections(predict_from_onnx(case.merged, outputs, samples), case.expected)


# -------------------------------------------------------------------------------- refusals


def test_patched_model_is_refused(retinanet, tmp_path):
    out = tmp_path / "x.onnx"
    with pytest.raises(PatchedModelError, match=r"merge_patch\(model, 'p'\)"):
        export_onnx(retinanet.model, out, (1, 3, 64, 64))
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_onnx(retinanet.merged, retinanet.path, (1, 3, 64, 64))


def test_export_refuses_a_patch_it_cannot_merge(seg, tmp_path):
    model = build_from_config("e2e_seg_tiny")
    apply_delta_patch(model, dict(name="blk", branch=dict(type="BlockDelta", width=8)))
    patch_file = save_patch(model, tmp_path / "blk.safetensors")
    out = tmp_path / "blk.onnx"
    inputs = [CONFIGS / "e2e_seg_tiny.py", seg.checkpoint]
    with pytest.raises(ExportError, match="BlockDelta") as err:
        export_checked(*inputs, out, patch=str(patch_file), shape=(64, 64))
    assert "cannot export" in str(err.value) and "blk" in str(err.value)
    assert not out.exists()


@pytest.mark.slow
def test_cli_end_to_end(seg):
    """tools/export_onnx.py in a subprocess: base checkpoint + patch file → merged → ONNX,
    checked there; its file then computes what the patched model computes."""
    out = seg.tmp / "cli" / "seg.onnx"
    cmd = [
        sys.executable,
        str(REPO / "tools" / "export_onnx.py"),
        str(CONFIGS / "e2e_seg_tiny.py"),
        str(seg.checkpoint),
        "--patch",
        str(seg.patch_file),
        "--out",
        str(out),
        "--shape",
        "64",
        "64",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "patch 'shift' merged" in proc.stdout, proc.stdout
    assert "seg_logits" in proc.stdout and "OK: max relative error" in proc.stdout, proc.stdout
    info = onnx_info(out)
    assert info["patch"] == "shift" and info["classes"] == ["background", "square", "disc", "bar"]
    img, _ = onnx_inputs(seg.merged, fresh(seg.batch))
    outputs = run_onnx(out, img)
    logits = torch.stack([s.seg_logits.data for s in seg.expected])
    assert rel_error(outputs["seg_logits"], logits) <= TOL
    # an existing file is kept without --force (refused before anything is built: checked
    # in this process, the function the tool calls)
    stamp = out.stat().st_mtime_ns
    with pytest.raises(ExportError, match="exists; pass --force to replace it"):
        export_checked(CONFIGS / "e2e_seg_tiny.py", seg.checkpoint, out, seg.patch_file)
    assert out.stat().st_mtime_ns == stamp
