"""The README's demo command, end to end (a few steps)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_trains_a_patch_and_passes_the_exactness_check():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/quickcheck.py"), "--steps", "4"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "FAILED" not in out
    assert out.count("[ok]") == 6
    assert "Δ fraction" in out and "backbone.layer4" in out and "neck.fpn_convs" in out


@pytest.mark.slow
def test_patch_summary_tool_on_an_upstream_config(tmp_path):
    config = tmp_path / "retinanet.py"
    config.write_text(
        "_base_ = 'mmdet::retinanet/retinanet_r18_fpn_1x_coco.py'\n"
        "model = dict(backbone=dict(init_cfg=None))\n"
        "delta_patch = dict(targets=['backbone.layer4'], branch=dict(rank=4))\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/patch_summary.py"),
            str(config),
            "--json",
            "--file-size",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert set(summary["stages"]) == {"backbone.layer4"}
    assert summary["branch"] == {
        "type": "LowRankDelta",
        "rank": 4,
        "alpha": None,
        "compute": "auto",
    }
    assert 0 < summary["delta_fraction"] < 0.05
    assert 0 < summary["patch_bytes"] < 0.05 * summary["checkpoint_bytes"]
