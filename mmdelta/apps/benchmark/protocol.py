"""The benchmark's protocol: a validation split carved from the new task's training data, lr
grids chosen on it, equal wall-clock budgets and the model's size.

* :func:`val_split` — every method trains on the ``fit`` part of the task's training set
  (:class:`~mmdelta.datasets.split.TrainValSplit`) and is scored for model selection on its
  ``val`` part (the same images with the test pipeline, in test mode), never on the test set;
  a validation image that is also a test image stops the run.
* :func:`choose` — the lr with the best validation metric (ties: the one listed first).
* :func:`equal_time_iterations` — iterations that take a method as long as full
  fine-tuning's schedule.
* :func:`model_bytes` — what a patch file is compared with: the base model's tensors.
"""

from __future__ import annotations

import copy
import os.path as osp
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ...datasets.split import TrainValSplit
from .methods import BenchmarkError

#: imported by every benchmark training config (TrainValSplit's registration)
SPLIT_IMPORT = "mmdelta.datasets.split"
#: evaluators that read ground truth from an annotation file unless ann_file is None
_ANN_FILE_METRICS = ("CocoMetric", "CocoPanopticMetric", "LVISMetric")


@dataclass
class Split:
    """The datasets / loader / evaluator configs of one config's fit and val parts and what
    they hold (filled by :func:`check_split`)."""

    fit_dataset: dict
    val_dataloader: dict
    val_evaluator: dict | list
    val_fraction: float
    seed: int
    images: dict = field(default_factory=dict)  # fit / val / test image counts
    val_paths: list[str] = field(default_factory=list)


def _type(node) -> str:
    return str(node.get("type", "")).split(".")[-1] if isinstance(node, Mapping) else ""


def _leaf_pipeline(dataset) -> list | None:
    """The pipeline of ``dataset`` (its first member's through wrappers)."""
    if isinstance(dataset, Sequence) and not isinstance(dataset, str):
        for item in dataset:
            found = _leaf_pipeline(item)
            if found is not None:
                return found
        return None
    if not isinstance(dataset, Mapping):
        return None
    for key in ("dataset", "datasets"):
        if dataset.get(key) is not None:
            found = _leaf_pipeline(dataset[key])
            if found is not None:
                return found
    return dataset.get("pipeline")


#: ``filter_cfg`` options for training only: mmdet's XML datasets (VOC: ``bbox_min_size=32``
#: in ``voc0712.py``'s training sets) assert ``not test_mode`` when they are set; the test
#: sets leave them out, so small boxes count in evaluation
_TRAINING_ONLY = ("bbox_min_size",)


def as_test_dataset(dataset, pipeline: list) -> dict | list:
    """The training dataset config ``dataset`` as a test set: repeat-style wrappers (any
    with one inner ``dataset``) unwrapped, ``ConcatDataset`` members each converted, leaves
    with the test ``pipeline`` and ``test_mode=True``, without training-only options."""
    if isinstance(dataset, Sequence) and not isinstance(dataset, str):
        return [as_test_dataset(d, pipeline) for d in dataset]
    dataset = copy.deepcopy(dict(dataset))
    if dataset.get("datasets") is not None:
        dataset["datasets"] = as_test_dataset(dataset["datasets"], pipeline)
        dataset.pop("pipeline", None)
        return dataset
    if dataset.get("dataset") is not None:
        return as_test_dataset(dataset["dataset"], pipeline)
    dataset["pipeline"] = copy.deepcopy(list(pipeline))
    dataset["test_mode"] = True
    if isinstance(dataset.get("filter_cfg"), Mapping):
        dataset["filter_cfg"] = {
            k: v for k, v in dataset["filter_cfg"].items() if k not in _TRAINING_ONLY
        }
    return dataset


def val_evaluator(evaluator):
    """The test evaluator for the val part: an annotation-file metric (``CocoMetric`` …)
    converts ground truth from the data samples instead (``ann_file=None``: its file holds
    every image of the training set, not the val part's)."""
    if isinstance(evaluator, Sequence) and not isinstance(evaluator, str):
        return [val_evaluator(e) for e in evaluator]
    evaluator = copy.deepcopy(dict(evaluator))
    if _type(evaluator) in _ANN_FILE_METRICS and "ann_file" in evaluator:
        evaluator["ann_file"] = None
    if evaluator.get("metrics") is not None and _type(evaluator) in ("", "Evaluator"):
        evaluator["metrics"] = val_evaluator(evaluator["metrics"])
    return evaluator


def val_split(cfg, val_fraction: float = 0.15, seed: int = 0) -> Split:
    """The fit / val configs of ``cfg``'s training set (see the module docstring)."""
    train = cfg.get("train_dataloader")
    if not train or train.get("dataset") is None:
        raise BenchmarkError(f"{cfg.filename}: no train_dataloader.dataset to carve a val split")
    pipeline = _leaf_pipeline(cfg.test_dataloader.dataset)
    if pipeline is None:
        raise BenchmarkError(f"{cfg.filename}: test_dataloader.dataset has no pipeline")
    train_dataset = copy.deepcopy(train["dataset"])
    split = dict(type="TrainValSplit", val_fraction=val_fraction, seed=seed)
    loader = copy.deepcopy(cfg.test_dataloader)
    loader["dataset"] = dict(split, part="val", dataset=as_test_dataset(train_dataset, pipeline))
    loader["sampler"] = dict(type="DefaultSampler", shuffle=False)
    return Split(
        fit_dataset=dict(split, part="fit", dataset=train_dataset),
        val_dataloader=loader,
        val_evaluator=val_evaluator(cfg.test_evaluator),
        val_fraction=val_fraction,
        seed=seed,
    )


def apply_split(cfg, split: Split) -> None:
    """Trains ``cfg`` on the fit part; its val loader / evaluator = the val part's, used by
    the benchmark after training only (no validation while training)."""
    cfg.train_dataloader.dataset = copy.deepcopy(split.fit_dataset)
    cfg.val_dataloader = copy.deepcopy(split.val_dataloader)
    cfg.val_evaluator = copy.deepcopy(split.val_evaluator)
    if cfg.get("val_cfg") is None:
        cfg.val_cfg = dict(type="ValLoop")
    loop = _type(cfg.train_cfg)
    if loop in ("IterBasedTrainLoop", "EpochBasedTrainLoop") or "by_epoch" in cfg.train_cfg:
        cfg.train_cfg.val_begin = 2**31  # scored once, after training, by the benchmark
    imports = cfg.get("custom_imports") or dict(imports=[], allow_failed_imports=False)
    names = list(imports.get("imports") or [])
    if SPLIT_IMPORT not in names:
        names.append(SPLIT_IMPORT)
    imports["imports"] = names
    cfg.custom_imports = imports


def _build(dataset_cfg, scope: str):
    from mmengine.registry import DATASETS, init_default_scope

    init_default_scope(scope)
    return DATASETS.build(copy.deepcopy(dataset_cfg))


def _paths(dataset) -> list[str]:
    from ...datasets.split import sample_identity

    if hasattr(dataset, "full_init"):
        dataset.full_init()
    seen: dict[str, None] = {}
    for i in range(len(dataset)):
        seen.setdefault(sample_identity(dataset.get_data_info(i)), None)
    return list(seen)


def _norm(path: str) -> str:
    return osp.normcase(osp.realpath(path))


def check_split(cfg, split: Split, name: str) -> Split:
    """Builds the fit, val and test sets once: counts their images, records the val part's
    paths, and raises :class:`BenchmarkError` when a val image is a test image (or a fit
    image), or a part is empty."""
    scope = cfg.get("default_scope", "mmdet")
    fit = _build(split.fit_dataset, scope)
    val = _build(split.val_dataloader["dataset"], scope)
    test = _build(cfg.test_dataloader.dataset, scope)
    fit_paths, val_paths, test_paths = fit.image_paths(), val.image_paths(), _paths(test)
    leak = sorted({_norm(p) for p in val_paths} & {_norm(p) for p in test_paths})
    if leak:
        raise BenchmarkError(
            f"{name}: {len(leak)} validation image(s) carved from the training set are also in "
            f"the test set (e.g. {leak[0]}): the training and test sets overlap; fix the "
            "config's train / test datasets"
        )
    both = sorted({_norm(p) for p in val_paths} & {_norm(p) for p in fit_paths})
    if both:  # cannot happen with one hash for both parts; a guard for custom datasets
        raise BenchmarkError(f"{name}: images in both the fit and the val part: {both[:3]}")
    for part, paths in (("validation", val_paths), ("fit", fit_paths)):
        if not paths:
            raise BenchmarkError(
                f"{name}: the {part} part of the training set ({len(fit_paths)} fit / "
                f"{len(val_paths)} val images at --val-fraction {split.val_fraction}, "
                f"--split-seed {split.seed}) is empty: change --val-fraction or --split-seed"
            )
    split.images = dict(fit=len(fit_paths), val=len(val_paths), test=len(test_paths))
    split.val_paths = val_paths
    return split


def choose(sweep: list[dict], key: str = "val_metric") -> dict:
    """The run with the best ``key`` (validation metric); ties go to the earliest run."""
    if not sweep:
        raise BenchmarkError("no runs to choose from")
    best = sweep[0]
    for run in sweep[1:]:
        if run[key] > best[key]:
            best = run
    return best


def lr_grid(base_lr: float, scales: Sequence[float]) -> tuple[float, ...]:
    """``base_lr`` × each scale (6 significant digits), duplicates dropped, in order."""
    out: list[float] = []
    for scale in scales:
        lr = float(f"{base_lr * scale:.6g}")
        if lr not in out:
            out.append(lr)
    return tuple(out)


def equal_time_iterations(
    iterations: int, full_ft_step: float, step: float, cap: float = 4.0
) -> tuple[int, bool]:
    """Iterations of a method whose steps take ``step`` seconds that last as long as full
    fine-tuning's ``iterations`` steps of ``full_ft_step`` seconds, at most ``cap`` ×
    ``iterations`` (at least 1). Returns ``(iterations, capped)``."""
    if step <= 0 or full_ft_step <= 0:
        raise ValueError(f"step times must be positive ({full_ft_step}, {step})")
    n = round(iterations * full_ft_step / step)
    limit = max(1, int(cap * iterations))
    return max(1, min(n, limit)), n > limit


def model_bytes(model_or_state) -> int:
    """Bytes of the model's tensors: every state dict entry (weights and buffers),
    ``numel × element_size``."""
    state = (
        model_or_state.state_dict()
        if isinstance(model_or_state, torch.nn.Module)
        else model_or_state
    )
    return sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))


__all__ = [
    "SPLIT_IMPORT",
    "Split",
    "TrainValSplit",
    "apply_split",
    "as_test_dataset",
    "check_split",
    "choose",
    "equal_time_iterations",
    "lr_grid",
    "model_bytes",
    "val_evaluator",
    "val_split",
]
