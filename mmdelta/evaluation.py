"""Evaluate a model on a config's test set, keeping the predictions, and compare predictions.

The same loop as mmengine's ``TestLoop`` (``model.test_step`` per batch, the config's
evaluator), but the per-image predictions are returned too, so two models — the base and a
patched model with its patch off — can be compared prediction by prediction, not only by
their metric.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from mmengine.evaluator import Evaluator
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from torch import nn


@dataclass
class Evaluation:
    """``metrics``: the evaluator's dict; ``predictions``: one data sample per test image
    (``DetDataSample`` with ``pred_instances`` / ``SegDataSample`` with ``pred_sem_seg``),
    in dataset order; ``seconds``: wall time of the pass."""

    metrics: dict
    predictions: list = field(repr=False)
    seconds: float


def evaluate(
    model: nn.Module,
    cfg,
    loader_key: str = "test_dataloader",
    evaluator_key: str = "test_evaluator",
) -> Evaluation:
    """Runs ``model`` (put in eval mode) over ``cfg[loader_key]``, scored by ``cfg[evaluator_key]``."""
    init_default_scope(cfg.get("default_scope", "mmdet"))
    loader = Runner.build_dataloader(cfg[loader_key], seed=0)
    evaluator = Evaluator(cfg[evaluator_key])
    evaluator.dataset_meta = loader.dataset.metainfo
    model.eval()
    predictions, start = [], time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            outputs = model.test_step(batch)
            evaluator.process(data_samples=outputs, data_batch=batch)
            predictions.extend(_detached(o) for o in outputs)
    metrics = evaluator.evaluate(len(loader.dataset))
    return Evaluation(dict(metrics), predictions, time.perf_counter() - start)


def _detached(sample):
    """The prediction fields of one output sample (dropping the batch's image tensors)."""
    kept = sample.clone()
    for key in ("gt_instances", "ignored_instances", "gt_sem_seg"):
        if key in kept:
            delattr(kept, key)
    return kept


def prediction_tensors(sample) -> dict[str, torch.Tensor]:
    """The tensors that make up one prediction: boxes, scores, labels (and masks) / label map
    and logits."""
    out = {}
    if "pred_instances" in sample:
        for key, value in sample.pred_instances.items():
            if isinstance(value, torch.Tensor):
                out[f"pred_instances.{key}"] = value
    if "pred_sem_seg" in sample:
        out["pred_sem_seg"] = sample.pred_sem_seg.data
    if "seg_logits" in sample:
        out["seg_logits"] = sample.seg_logits.data
    if not out:
        raise ValueError(f"no predictions in {type(sample).__name__} (keys {sample.keys()})")
    return out


def first_difference(a: list, b: list) -> str | None:
    """``None`` when every prediction of ``a`` equals ``b``'s bit for bit (same shapes,
    dtypes, values), else where they first differ."""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} predictions"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        tx, ty = prediction_tensors(x), prediction_tensors(y)
        if tx.keys() != ty.keys():
            return f"image {i}: fields {sorted(tx)} vs {sorted(ty)}"
        for key in tx:
            u, v = tx[key], ty[key]
            if u.shape != v.shape or u.dtype != v.dtype or not torch.equal(u, v):
                return f"image {i} ({x.metainfo.get('img_path', '?')}): {key} differs"
    return None
