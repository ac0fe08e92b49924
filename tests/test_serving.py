"""Serving many patches on one base: MultiPatchInferencer, tools/infer.py, and the RSS
benchmark tools/bench_serving_memory.py, on a tiny Faster R-CNN (ResNet-18) with random
weights and generated images.

The base panel must be the plain base's prediction and each patch panel that patch's,
bitwise: the references are upstream ``DetInferencer`` runs on ``init_base_model`` and on
``init_patched_model`` with one patch (``patched_inferencer``).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from serving_fixtures import CLASSES, NEW, SEG_OWN, SIZE, TINY, TINY_SEG, det_fixture, seg_fixture

from mmdelta import PatchFileError
from mmdelta.apis import init_base_model, patched_inferencer
from mmdelta.apis.serving import MultiPatchInferencer, ServingError
from mmdelta.datasets.images import NoImagesError
from mmdelta.evaluation import first_difference
from mmdelta.visualization import GAP, MIN_SHORT_SIDE, TITLE_HEIGHT

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Config (the 10 best boxes kept, whatever their score), base checkpoint, two patches,
    a folder of two images (``serving_fixtures.det_fixture``)."""
    return det_fixture(tmp_path_factory.mktemp("serving"))


def _upstream(inferencer, images):
    """Predictions of an upstream DetInferencer's own __call__ (batch 1, no files)."""
    return inferencer(images, return_datasamples=True, no_save_vis=True)["predictions"]


def test_multi_patch_inferencer_matches_base_and_each_patch(served, tmp_path):
    from mmdet.apis import DetInferencer

    images = sorted(str(p) for p in served["images"].iterdir())
    server = MultiPatchInferencer(
        served["config"], served["base"], [served["shift"], served["new"]]
    )
    out_dir = tmp_path / "out"
    out = server(served["images"], out_dir=out_dir, score_thr=0.05)

    # one picture per image: the three panels side by side at the upscaled image size
    factor = -(-MIN_SHORT_SIDE // SIZE)
    assert out["files"]["pictures"] == [
        str(out_dir / "vis" / f"{Path(p).stem}.png") for p in images
    ]
    for picture in out["files"]["pictures"]:
        png = cv2.imread(picture)
        assert png.shape == (TITLE_HEIGHT + SIZE * factor, 3 * SIZE * factor + 2 * GAP, 3)
        for i in range(3):
            x = i * (SIZE * factor + GAP)
            assert png[TITLE_HEIGHT:, x : x + SIZE * factor].std() > 10
    assert sorted(p.name for p in out_dir.rglob("*") if p.is_file()) == sorted(
        ["results.json", *(Path(p).name for p in out["files"]["pictures"])]
    )

    # the JSON: base + both patches per image, each with its own class names
    results = json.loads((out_dir / "results.json").read_text())
    assert results == out["results"] and out["files"]["json"] == str(out_dir / "results.json")
    assert results["models"]["base"]["classes"] == list(CLASSES)
    assert results["models"]["patches"]["newcls"] == {
        "file": str(served["new"]), "classes": list(NEW), "own_classes": True,
    }  # fmt: skip
    assert results["models"]["patches"]["shift"]["classes"] == list(CLASSES)
    assert [r["image"] for r in results["images"]] == images
    for record, row in zip(results["images"], out["predictions"], strict=True):
        assert set(record["patches"]) == {"shift", "newcls"}
        for key, summary, sample, classes in [
            ("base", record["base"], row["base"], CLASSES),
            ("shift", record["patches"]["shift"], row["patches"]["shift"], CLASSES),
            ("newcls", record["patches"]["newcls"], row["patches"]["newcls"], NEW),
        ]:
            kept = sample.pred_instances.scores > 0.05
            assert len(summary["scores"]) == int(kept.sum()) > 0, key
            assert summary["below_thr"] == int((~kept).sum())
            assert summary["scores"] == [float(s) for s in sample.pred_instances.scores[kept]]
            assert summary["label_names"] == [classes[i] for i in summary["labels"]]
            assert len(summary["bboxes"]) == len(summary["scores"])
            assert all(len(box) == 4 for box in summary["bboxes"])
        assert max(record["patches"]["newcls"]["labels"]) < len(NEW)

    # bitwise: base panel == upstream DetInferencer on the plain base model
    class BaseInferencer(DetInferencer):
        def _init_model(self, cfg, weights, device="cpu"):
            return init_base_model(cfg, weights)

    base_ref = _upstream(
        BaseInferencer(
            model=str(served["config"]), weights=str(served["base"]), show_progress=False
        ),
        images,
    )
    assert first_difference(base_ref, [row["base"] for row in out["predictions"]]) is None
    # each patch panel == upstream DetInferencer on init_patched_model with that patch
    for name, file in [("shift", served["shift"]), ("newcls", served["new"])]:
        ref = _upstream(
            patched_inferencer(str(served["config"]), str(served["base"]), patch=str(file),
                               show_progress=False),
            images,
        )  # fmt: skip
        got = [row["patches"][name] for row in out["predictions"]]
        assert first_difference(ref, got) is None, name
        assert first_difference(base_ref, got) is not None, f"patch {name} changed nothing"

    # nothing stays active; the model still carries both patches, loaded once
    from mmdelta import active_patch, patch_names

    assert active_patch(server.model) is None
    assert patch_names(server.model) == ["shift", "newcls"]


def test_infer_tool_cli(served, tmp_path):
    before = sorted(p.name for p in served["images"].iterdir())
    out_dir = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "tools" / "infer.py"), str(served["images"]),
            "--config", str(served["config"]), "--checkpoint", str(served["base"]),
            "--patch", str(served["shift"]), "--patch", f"voc={served['new']}",
            "--out-dir", str(out_dir), "--score-thr", "0.05",
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "wrote 2 picture(s)" in proc.stdout
    results = json.loads((out_dir / "results.json").read_text())
    assert list(results["models"]["patches"]) == ["shift", "voc"]  # NAME=FILE renames
    assert results["models"]["patches"]["voc"]["classes"] == list(NEW)
    for record in results["images"]:
        assert cv2.imread(record["picture"]) is not None
        assert Path(record["picture"]).parent == out_dir / "vis"
    assert sorted(p.name for p in served["images"].iterdir()) == before  # inputs untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # nothing outside out-dir


def test_errors_name_what_to_fix(served, tmp_path):
    base, config = served["base"], served["config"]
    image = next(served["images"].iterdir())
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"patch file '{missing}' does not exist")
    ):
        MultiPatchInferencer(config, base, [str(missing)])
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"no image file or folder at {tmp_path / 'no.jpg'}")
    ):
        MultiPatchInferencer(config, base, [served["shift"]])(
            tmp_path / "no.jpg", out_dir=tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()

    with pytest.raises(ServingError, match="two patches are named 'shift'"):
        MultiPatchInferencer(config, base, [served["shift"], served["shift"]])
    with pytest.raises(FileNotFoundError, match="config file"):
        MultiPatchInferencer(tmp_path / "c.py", base, [served["shift"]])
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        MultiPatchInferencer(config, tmp_path / "b.pth", [served["shift"]])
    with pytest.raises(PatchFileError, match="other base weights"):
        MultiPatchInferencer(config, base, {"a": served["shift"], "b": served["foreign"]})

    # the same file twice under two names is fine; outputs never replace an input image
    server = MultiPatchInferencer(config, base, {"a": served["shift"], "b": served["shift"]})
    clash = tmp_path / "clash"
    (clash / "vis").mkdir(parents=True)
    shutil.copy(image, clash / "vis" / "x.png")
    with pytest.raises(ServingError, match="would overwrite an input image"):
        server(clash / "vis" / "x.png", out_dir=clash)
    (clash / "empty").mkdir()
    with pytest.raises(NoImagesError, match="holds no image files"):
        server(clash / "empty", out_dir=clash)
    assert sorted(p.name for p in clash.rglob("*")) == ["empty", "vis", "x.png"]


def test_segmentation_label_maps_and_pixel_counts(tmp_path):
    """mmseg: one label map per image and model equal to its prediction, class-named counts."""
    seg = seg_fixture(tmp_path)
    image, meta, own = seg["image"], {"classes": seg["classes"]}, SEG_OWN
    server = MultiPatchInferencer(TINY_SEG, seg["base"], [seg["new"]])
    out = server([image], out_dir=tmp_path / "out")
    (record,) = out["results"]["images"]
    (row,) = out["predictions"]
    assert out["results"]["task"] == "seg" and record["picture"] == str(
        tmp_path / "out" / "vis" / f"{image.stem}.png"
    )
    for summary, sample, classes, name in [
        (record["base"], row["base"], meta["classes"], "base.png"),
        (record["patches"]["newcls"], row["patches"]["newcls"], own, "patch_newcls.png"),
    ]:
        assert summary["label_map"] == str(tmp_path / "out" / "label_maps" / image.stem / name)
        written = cv2.imread(summary["label_map"], cv2.IMREAD_UNCHANGED)
        pred = sample.pred_sem_seg.data[0].numpy()
        assert written.shape == pred.shape == (64, 64) and (written == pred).all()
        assert summary["pixels"] == {classes[c]: int((pred == c).sum()) for c in np.unique(pred)}
    assert cv2.imread(record["picture"]).shape[1] == 2 * 384 + GAP


@pytest.mark.slow
def test_memory_benchmark_smoke(tmp_path):
    out = tmp_path / "mem.json"
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "tools" / "bench_serving_memory.py"), "--config", str(TINY),
            "--counts", "1", "2", "--input-size", "64", "--jobs", "2", "--out", str(out),
        ],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert {"date", "machine", "torch", "config", "input_size", "counts", "baseline_mib",
            "increments_mib", "rows", "patch_file_mib", "checkpoint_mib"} <= set(result)  # fmt: skip
    assert result["counts"] == [1, 2] and result["input_size"] == 64
    rows = {(r["kind"], r["n"]): r for r in result["rows"]}
    assert set(rows) == {("baseline", 0), ("patches", 1), ("copies", 1), ("patches", 2),
                         ("copies", 2)}  # fmt: skip
    for row in rows.values():
        assert row["final"]["rss_mib"] > 100 and row["final"]["peak_mib"] >= row["final"]["rss_mib"]
    baseline = result["baseline_mib"]
    assert rows[("copies", 1)]["loaded"]["rss_mib"] > baseline
    # two models cost more than one model with two patches (a ~45 MiB model, ~1 MiB patch)
    assert rows[("copies", 2)]["loaded"]["rss_mib"] > rows[("patches", 2)]["loaded"]["rss_mib"]
    # after inference the active patch's folded weights (about one copy of the patched
    # layers, here nearly the whole tiny model) are held once; each extra model costs more
    inc = result["increments_mib"]
    assert inc["per_copy_loaded"] > 20 > inc["per_patch_loaded"]
    assert inc["per_copy"] > 20 > inc["per_patch"]
    assert "| N |" in proc.stdout and "per patch" in proc.stdout and "per copy" in proc.stdout
