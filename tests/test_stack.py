"""The installed stack is the pinned one, and mmcv's compiled ops really run."""

import importlib.metadata
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_pinned_versions_are_installed():
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line)
        if match:
            pins[match[1]] = match[2]
    assert {"torch", "mmengine", "mmdet", "mmsegmentation", "mmpretrain"} <= set(pins)
    for package, version in pins.items():
        installed = importlib.metadata.version(package)
        assert installed.split("+")[0] == version, (package, installed, version)
    assert importlib.metadata.version("mmcv") == "2.1.0"


def test_mmcv_compiled_ops_run():
    from mmcv.ops import RoIAlign, nms

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float32)
    _, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    feats = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
    rois = torch.tensor([[0, 0, 0, 4, 4]], dtype=torch.float32)
    out = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2)(feats, rois)
    assert out.shape == (1, 1, 2, 2) and torch.isfinite(out).all()
