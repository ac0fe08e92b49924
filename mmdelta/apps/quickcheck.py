"""Quick end-to-end Δ-patch (``tools/quickcheck.py``): build a small mmdet detector, patch
it, train a few steps on generated images, check that the patch-off model is still the base
bit for bit, save the patch file, load it onto an independently built base, and merge it
into plain weights. Everything runs offline on the CPU in well under a minute.
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope

from ..datasets.batches import shapes_batch
from ..exactness import identical, tensor_outputs
from ..patching import (
    apply_delta_patch,
    base_state_dict,
    delta_disabled,
    load_patch,
    merge_patch,
    save_patch,
)

#: the default config: a tiny Faster R-CNN with a ``delta_patch`` key
DEFAULT_CONFIG = (
    Path(__file__).resolve().parents[2] / "configs/demo/quickcheck_faster-rcnn_r18_fpn_tiny.py"
)


class QuickcheckError(ValueError):
    """The config cannot be quick-checked (it has no ``delta_patch`` key)."""


def build_detector(cfg: Config, seed: int) -> torch.nn.Module:
    """The mmdet model of ``cfg``, its random initialisation seeded with ``seed``."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope("mmdet"):
        return MODELS.build(cfg.model)


def run_quickcheck(
    config: str | Path = DEFAULT_CONFIG,
    steps: int = 20,
    lr: float = 0.02,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, bool]:
    """Runs the quick check on ``config`` (its ``delta_patch``), logging as it goes; returns
    each check's outcome (all True: the patch behaves). ``out``: folder for the patch file
    (None: a temporary folder, removed after).

    Raises:
        QuickcheckError: ``config`` has no ``delta_patch`` key.
    """
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    cfg = Config.fromfile(str(config))
    if "delta_patch" not in cfg:
        raise QuickcheckError(f"{config} has no `delta_patch` key")
    model = build_detector(cfg, seed=0)
    base = build_detector(cfg, seed=1)  # built independently, then given the same weights
    base.load_state_dict(model.state_dict())
    num_classes = cfg.model.roi_head.bbox_head.num_classes
    probe = shapes_batch(seed=10_000, num_classes=num_classes)
    base_out = tensor_outputs(base, probe)

    log(f"== patching {Path(config).name} with delta_patch={cfg.delta_patch}")
    summary = apply_delta_patch(model, cfg.delta_patch)
    log(str(summary))
    base_keys = set(base.state_dict())
    before = {k: v.clone() for k, v in base_state_dict(model).items()}
    _train(model, num_classes, steps, lr, log)

    after = base_state_dict(model)
    checks = {
        "base state dict keys are the upstream keys": set(after) == base_keys,
        "base tensors bitwise unchanged (BatchNorm buffers included)": all(
            torch.equal(before[k], after[k]) for k in before
        ),
    }
    with delta_disabled(model):
        checks["patch off == independently built base, bit for bit"] = identical(
            tensor_outputs(model, probe), base_out
        )
    patched_out = tensor_outputs(model, probe)
    checks["patch on differs from the base"] = not identical(patched_out, base_out)
    checks.update(_file_and_merge_checks(model, base, summary.name, probe, patched_out, out, log))

    log("== exactness check")
    for what, ok in checks.items():
        log(f"[{'ok' if ok else 'FAILED'}] {what}")
    log(f"== done in {time.perf_counter() - start:.1f} s")
    return checks


def _train(model, num_classes: int, steps: int, lr: float, log) -> None:
    """``steps`` SGD steps of the patch on generated shapes."""
    log(f"== training the patch for {steps} steps (SGD lr {lr}) on generated shapes")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = OptimWrapper(torch.optim.SGD(trainable, lr=lr, momentum=0.9, weight_decay=1e-4))
    model.train()
    for step in range(steps):
        losses = model.train_step(shapes_batch(seed=step, num_classes=num_classes), optim)
        total = sum(float(v.detach()) for k, v in losses.items() if "loss" in k)
        if step % 5 == 0 or step == steps - 1:
            log(f"step {step + 1:3d}/{steps}  loss {total:.4f}")


def _file_and_merge_checks(model, base, name, probe, patched_out, out, log) -> dict[str, bool]:
    """Saves the patch file (its size against a full checkpoint), loads it onto the
    independent ``base`` and merges the patched ``model``: both must compute what the
    patched model computes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out or tmp) / f"{name}.safetensors"
        save_patch(model, path, overwrite=out is None)
        full = io.BytesIO()
        torch.save({"state_dict": base.state_dict()}, full)
        size = path.stat().st_size
        log(
            f"== patch file {path if out else path.name}: {size:,} bytes, "
            f"{100 * size / full.getbuffer().nbytes:.2f}% of a full checkpoint "
            f"({full.getbuffer().nbytes:,} bytes)"
        )
        load_patch(base, path)  # onto the independently built base
    checks = {
        "patch file loaded onto the independent base == the trained patch": identical(
            tensor_outputs(base, probe), patched_out
        )
    }
    merged_out = tensor_outputs(merge_patch(model), probe)
    checks["merged plain model == the patched model (1e-5 relative)"] = all(
        torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
        for a, b in zip(merged_out, patched_out, strict=True)
    )
    return checks
