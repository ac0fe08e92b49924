"""The README's main-job command (tools/demo.py) at the tiny size: report, pictures, exactness.

The tiny size runs every step of the real demo (data, base training, two patches through
DeltaRunner, evaluation, pictures, report) on a few images and iterations; the quality of
the numbers is the full size's business (README), here only their consistency is checked.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from mmdelta.apps.demo.report import TASK_FIELDS
from mmdelta.evaluation import evaluate, first_difference

ROOT = Path(__file__).resolve().parents[1]


def _run_demo(task: str, out: Path, data: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/demo.py"),
            "--task",
            task,
            "--size",
            "tiny",
            "--out",
            str(out),
            "--data",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _check_report(out: Path, task: str) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert report["story"] == task and report["size"] == "tiny"
    assert {"date", "machine", "base", "tasks", "quality", "seconds", "curves"} <= set(report)
    assert [t["task"] for t in report["tasks"]] == ["shifted", "newclasses"]
    for row in report["tasks"]:
        assert set(TASK_FIELDS) <= set(row), set(TASK_FIELDS) - set(row)
        # the patch switched off gives the base's own predictions (compared image by image)
        assert row["base_task"]["identical_predictions"] is True, row["base_task"]
        assert row["base_task"]["patched_patch_off"] == row["base_task"]["base"]
        assert 0 < row["delta_fraction"] < 0.05 and 0 < row["patch_fraction"] < 0.05
        assert row["patch_bytes"] == os.path.getsize(row["patch_file"])
        assert 0 < row["patch_to_checkpoint"] < 0.05
        assert row["train_seconds"] > 0 and row["iterations"] == 2
        assert len(row["pictures"]) == 2
        for pic in row["pictures"]:
            img = cv2.imread(pic)
            assert img is not None and img.shape[1] > 2 * img.shape[0] * 0.9  # two panels
    shifted, new = report["tasks"]
    assert shifted["new_task"]["base"] is not None and new["new_task"]["base"] is None
    assert new["classes"][-3:] == ["triangle", "ring", "cross"]
    assert cv2.imread(report["curves"]) is not None
    md = (out / "report.md").read_text()
    assert "identical predictions" in md and "pictures/shifted_0.png" in md
    return report


@pytest.mark.slow
@pytest.mark.parametrize("task", ["det", "seg"])
def test_main_job_tiny_run(task, tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    proc = _run_demo(task, out, data)
    assert "eta" in proc.stdout + proc.stderr  # mmengine's progress log
    report = _check_report(out, task)
    assert report["base"]["cached"] is False

    # independently of the job: the base and the patched model with its patch off predict
    # the same on the base task's test set, prediction by prediction
    from mmengine.config import Config

    from mmdelta import delta_disabled
    from mmdelta.apis import init_base_model, init_patched_model

    shifted = report["tasks"][0]
    prefix = "det" if task == "det" else "seg"
    base_cfg = Config.fromfile(str(out / "base/train" / f"{prefix}_shapes_base.py"))
    task_cfg = Config.fromfile(str(out / "shifted" / f"{prefix}_shapes_shifted.py"))
    base = init_base_model(base_cfg, report["base"]["checkpoint"])
    patched = init_patched_model(task_cfg, report["base"]["checkpoint"], shifted["patch_file"])
    want = evaluate(base, base_cfg).predictions
    with delta_disabled(patched):
        got = evaluate(patched, base_cfg).predictions
    assert first_difference(want, got) is None
    assert first_difference(want, evaluate(patched, base_cfg).predictions) is not None

    # the base run's own mmengine checkpoint (HistoryBuffer inside) tests with mmdelta's
    # tools/test.py as a plain config: weights-only loading with mmengine's types allowed
    metrics_file = tmp_path / "metrics.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/test.py"),
            str(out / "base/train" / f"{prefix}_shapes_base.py"),
            str(out / "base/train/iter_2.pth"),
            "--metrics-out",
            str(metrics_file),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    key = "pascal_voc/mAP" if task == "det" else "mIoU"
    scale = 1.0 if task == "det" else 0.01
    assert json.loads(metrics_file.read_text())[key] * scale == pytest.approx(
        report["base"]["metric"], abs=1e-3
    )

    # a second run reuses the data and the base, retrains the patches. The cache is the same
    # code for both stories: the detection run proves it end to end; that the segmentation
    # base's key is stable across runs is proven by test_base_cache_key_is_stable_...[seg]
    if task == "seg":
        return
    checkpoint = Path(report["base"]["checkpoint"])
    stamp = checkpoint.stat().st_mtime_ns
    _run_demo(task, out, data)
    again = _check_report(out, task)
    assert again["base"]["cached"] is True and checkpoint.stat().st_mtime_ns == stamp
    assert again["base"]["metric"] == report["base"]["metric"]


def test_first_difference_finds_one_changed_score_or_label():
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    def sample(scores, labels):
        s = DetDataSample(metainfo=dict(img_path="x.jpg"))
        s.pred_instances = InstanceData(
            bboxes=torch.zeros(len(scores), 4), scores=torch.tensor(scores), labels=labels
        )
        return s

    a = [sample([0.9, 0.5], torch.tensor([0, 1])), sample([0.3], torch.tensor([2]))]
    same = [sample([0.9, 0.5], torch.tensor([0, 1])), sample([0.3], torch.tensor([2]))]
    assert first_difference(a, same) is None
    score = [a[0], sample([0.3 + 1e-7], torch.tensor([2]))]
    assert "image 1" in first_difference(a, score) and "scores" in first_difference(a, score)
    label = [sample([0.9, 0.5], torch.tensor([0, 2])), a[1]]
    assert "labels" in first_difference(a, label)
    dtype = [sample([0.9, 0.5], torch.tensor([0, 1], dtype=torch.int32)), a[1]]
    assert first_difference(a, dtype) is not None
    assert "predictions" in first_difference(a, a[:1])


@pytest.mark.parametrize("task", ["det", "seg"])
def test_base_cache_key_is_stable_across_runs_and_follows_config_and_data(task, tmp_path):
    from mmdelta.apps.demo.preparation import base_key, task_config, write_task_data
    from mmdelta.apps.demo.stories import SIZES, STORIES

    story, tiny = STORIES[task], SIZES["tiny"]
    root = write_task_data(story, story.base, tiny, tmp_path / "data")

    def key(**options):
        cfg = task_config(story, story.base, ROOT / "configs/demo", root, tiny, tmp_path)
        cfg.merge_from_dict(options)
        return base_key(cfg, root)

    assert key() == key()  # each run's config differs only in its visualiser's name
    assert key() != key(**{"train_cfg.max_iters": 3})
    other = write_task_data(story, story.tasks[0], tiny, tmp_path / "data")
    cfg = task_config(story, story.base, ROOT / "configs/demo", root, tiny, tmp_path)
    assert base_key(cfg, root) != base_key(cfg, other)
