"""A base checkpoint and its patch to ONNX, checked: the model is built with the base
checkpoint (every key checked) and the patch (``mmdelta.apis.init_patched_model``), the patch
folded into the weights (``mmdelta.merge_patch``; a patch that cannot be folded, e.g.
``BlockDelta``, is refused), the plain model exported (:func:`mmdelta.deploy.onnx.export_onnx`)
and onnxruntime (CPU) run on a random image batch of the export shape against PyTorch.
``tools/export_onnx.py`` is its command line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..apis import init_base_model, init_patched_model
from ..apis.inference import PatchNotFoundError
from ..patching import active_patch, merge_patch, patch_classes
from .onnx import check_onnx, export_onnx

#: label-map pixels allowed to differ (near-ties of the top two logits on random images)
MAX_LABEL_MISMATCH = 1e-3


class ExportError(ValueError):
    """The export is refused before anything is written (the output exists, or the patch
    cannot be merged into plain layers)."""


def merged_model(config, checkpoint, patch=None, cfg_options: dict | None = None):
    """The merged (plain) model and a description of what it is (``patch``, ``classes``).

    Without ``patch`` a checkpoint holding Δ tensors (a training checkpoint) gives its
    patch, a plain base checkpoint the base."""
    try:
        model = init_patched_model(config, checkpoint, patch, "cpu", cfg_options)
    except PatchNotFoundError:
        model = init_base_model(config, checkpoint, "cpu", cfg_options)
        return model, dict(
            patch=None, classes=(model.__dict__.get("dataset_meta") or {}).get("classes")
        )
    name = active_patch(model)
    classes = patch_classes(model, name) or (model.__dict__.get("dataset_meta") or {}).get(
        "classes"
    )
    try:
        merged = merge_patch(model, name)
    except ValueError as err:
        raise ExportError(f"cannot export {patch or checkpoint}: {err}") from None
    return merged.eval(), dict(patch=name, classes=list(classes) if classes else None)


def export_checked(
    config,
    checkpoint,
    out,
    patch=None,
    shape: tuple[int, int] | None = None,
    batch: int = 1,
    static: bool = False,
    fold_preprocess: bool = True,
    opset: int | None = None,
    tol: float = 1e-4,
    force: bool = False,
    cfg_options: dict | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Merges, exports to ``out`` and checks (see the module); logs what it does and the
    errors against PyTorch; returns the failed checks (empty: the file is good).

    ``shape``: input (H, W) to trace and check with (default: the data preprocessor's fixed
    size, else 512 × 512). ``tol``: max error relative to each output's max |value|.

    Raises:
        ExportError: ``out`` exists and not ``force``, or the patch cannot be merged.
    """
    if Path(out).exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    model, about = merged_model(config, checkpoint, patch, cfg_options)
    if shape:
        height, width = shape
    else:
        size = getattr(model.data_preprocessor, "size", None)
        height, width = tuple(size) if size else (512, 512)
    shape = (batch, 3, height, width)
    log(
        f"exporting {type(model).__name__} ("
        + (f"patch {about['patch']!r} merged" if about["patch"] else "base, no patch")
        + f") traced at {shape}"
    )
    path = export_onnx(
        model,
        out,
        shape,
        opset=opset,
        dynamic=not static,
        fold_preprocess=fold_preprocess,
        overwrite=force,
        metadata=dict(
            config=str(config),
            checkpoint=str(checkpoint),
            patch_file=patch,
            patch=about["patch"],
            classes=about["classes"],
        ),
    )
    log(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return _check(model, path, shape, fold_preprocess, tol, log)


def _check(model, path, shape, fold_preprocess: bool, tol: float, log) -> list[str]:
    """onnxruntime against PyTorch on a random batch of ``shape``; the failed checks."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.rand(shape, generator=gen)
    if fold_preprocess:
        inputs = inputs * 255  # raw image values
    errors = check_onnx(model, path, inputs)
    log(f"onnxruntime (CPUExecutionProvider) vs PyTorch on a random {tuple(shape)} batch:")
    worst, mismatched = 0.0, 0.0
    for name, err in errors.items():
        if "mismatched" in err:  # a label map: differences only where logits nearly tie
            log(f"  {name:<20} mismatched {err['mismatched']:.4%}")
            mismatched = max(mismatched, err["mismatched"])
        else:
            log(f"  {name:<20} max abs {err['max_abs']:.3g}  rel {err['rel']:.3g}")
            worst = max(worst, err["rel"])
    failed = []
    if worst > tol:
        failed.append(f"max relative error {worst:.3g} > --tol {tol:g}")
    if mismatched > MAX_LABEL_MISMATCH:
        failed.append(f"{mismatched:.4%} of the label map differs (> {MAX_LABEL_MISMATCH:.2%})")
    if not failed:
        log(f"OK: max relative error {worst:.3g} <= {tol:g}")
    return failed
