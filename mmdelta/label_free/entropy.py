"""Label-free segmentation patches by entropy minimisation (TENT-style).

Given a patch recipe (a segmentation config with ``delta_patch``), the base checkpoint and a
folder of *unlabelled* images of the new domain, the patch is trained to make the model's
per-pixel class distributions confident on those images (Wang et al., "Tent: Fully
Test-Time Adaptation by Entropy Minimization", ICLR 2021):

    loss = (mean over image pixels of H(p) + marginal_weight × KL(prior ‖ p̄)) / log(C)

(``p = softmax(seg_logits)``, ``seg_logits``: ``(N, C, H, W)`` after mmseg's resize to the
input size; H: Shannon entropy, so the first term is 1 for uniform predictions; ``p̄``: the
batch's mean prediction, i.e. its predicted share of each class; ``prior``: the base's
predicted shares on the same images with AdaBN statistics, measured before training). The
class-marginal term is ours: plain TENT (``marginal_weight=0``) collapsed toward the
dominant class on the fog validation split (docs/serving.md). Only the patch trains, as an
ordinary patch through the project's runner (``DeltaRunner``), so the result is an ordinary
patch file (``load_patch``, merge, serving):

* ``trainable='norm'`` (TENT proper): the patch owns the norm layers
  (``branch=None, task_norm=True``): their affine parameters train, and their BatchNorm
  copies normalise with batch statistics while training and keep their own running
  statistics of the new images (AdaBN built in); nothing else changes.
* ``trainable='patch'``: the recipe's own ``delta_patch`` (e.g. low-rank Δ branches and
  ``task_norm``).

How it plugs into an unmodified mmseg segmentor (nothing is monkey-patched): the training
set is the images with :class:`UnlabelledSegMap` in place of ``LoadAnnotations`` (a map of
zeros that only marks which pixels are image: the data preprocessor pads with 255 =
``ignore_index``), and every decode / auxiliary head's ``loss_decode`` becomes
:class:`PixelEntropyLoss`, which reads the label only to leave padding out. The head's
logged ``acc_seg`` is then meaningless (the share of pixels predicted as class 0).

Entropy minimisation can still drift (every pixel one confident class). :func:`minimise_entropy`
reports what is visible without labels: the mean entropy and confidence and the predicted
share of every class on the images, before (the base with AdaBN statistics) and after;
a class whose share falls below a quarter of its share before is flagged as vanishing
(stopping rule in ``docs/serving.md``). The base checkpoint is only read (SHA-256 compared).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmengine.registry import MODELS, TRANSFORMS
from torch import nn

from .norm_stats import LabelFreeError, adapt_norm_stats
from .training_inputs import TrainingInputs, link, predict, require_recipe, training_only

TRAINABLE = ("norm", "patch")
EXAMPLE = "configs/demo/seg_shapes_shifted.py"  # a patch recipe, for messages
#: default length of a run: passes over the unlabelled images (TENT adapts in one online
#: pass; on the fog validation split 100 iterations = 1.6 passes beat 400 = 6.4 passes)
PASSES = 2


@MODELS.register_module()
class PixelEntropyLoss(nn.Module):
    """Mean normalised Shannon entropy of the per-pixel soft-max, as an mmseg ``loss_decode``,
    plus an optional class-marginal term that keeps the predicted class shares near a prior.

    ``seg_logits``: ``(N, C, H, W)``; ``seg_label``: ``(N, H, W)``, read only to leave out
    pixels equal to ``ignore_index`` (padding). Over the other pixels, with ``p`` the
    soft-max and ``p̄`` its mean (the batch's predicted share of each class):

        loss = loss_weight × (mean H(p) + marginal_weight × KL(prior ‖ p̄)) / log C

    ``prior`` (``C`` shares summing to 1, e.g. the base's predicted shares on the new images,
    measured before training): without it (or with ``marginal_weight=0``) the loss is TENT's
    and can collapse to the dominant class, which lowers the entropy too."""

    def __init__(
        self,
        loss_weight: float = 1.0,
        prior: Sequence[float] | None = None,
        marginal_weight: float = 1.0,
        loss_name: str = "loss_entropy",
    ):
        super().__init__()
        self.loss_weight, self.marginal_weight = loss_weight, marginal_weight
        self.prior = None if prior is None else [float(v) for v in prior]
        self._loss_name = loss_name

    def forward(self, seg_logits, seg_label, weight=None, ignore_index=255, **kwargs):
        classes = seg_logits.shape[1]
        log_p = seg_logits.float().log_softmax(dim=1)
        p = log_p.exp()
        entropy = -(p * log_p).sum(dim=1)
        valid = seg_label != ignore_index
        if not bool(valid.any()):
            return entropy.sum() * 0.0  # keeps the graph: a batch of padding only
        loss = entropy[valid].mean()
        if self.prior is not None and self.marginal_weight:
            if len(self.prior) != classes:
                raise ValueError(f"prior has {len(self.prior)} shares for {classes} classes")
            prior = seg_logits.new_tensor(self.prior).float().clamp_min(1e-8)
            share = p.permute(0, 2, 3, 1)[valid].mean(dim=0).clamp_min(1e-8)
            loss = loss + self.marginal_weight * (prior * (prior / share).log()).sum()
        return self.loss_weight * loss / math.log(classes)

    @property
    def loss_name(self) -> str:
        return self._loss_name


@TRANSFORMS.register_module()
class UnlabelledSegMap(BaseTransform):
    """Stands in for ``LoadAnnotations`` on unlabelled images: ``gt_seg_map`` = zeros of the
    image's ``(H, W)`` (uint8), added to ``seg_fields`` so later resizes, flips and crops
    follow the image. It marks image pixels only; :class:`PixelEntropyLoss` ignores its values."""

    def transform(self, results: dict) -> dict:
        h, w = results["img"].shape[:2]
        results["gt_seg_map"] = np.zeros((h, w), np.uint8)
        results.setdefault("seg_fields", []).append("gt_seg_map")
        return results


@dataclass
class EntropyStats:
    """What an entropy-minimisation run shows without labels (on its unlabelled images)."""

    images: int
    trainable: str
    entropy_before: float  # mean normalised pixel entropy, the base with AdaBN statistics
    entropy_after: float  # ... the patched model
    confidence_before: float  # mean max soft-max probability
    confidence_after: float
    share_before: dict = field(default_factory=dict)  # predicted share of pixels per class
    share_after: dict = field(default_factory=dict)
    vanishing: list = field(default_factory=list)  # classes whose share fell below 1/4
    train_seconds: float = 0.0
    patch_file: str = ""

    def line(self) -> str:
        shares = {c: f"{self.share_before[c]:.3f}->{v:.3f}" for c, v in self.share_after.items()}
        warn = f"; VANISHING classes {self.vanishing}: a collapsing run" if self.vanishing else ""
        return (
            f"entropy ({self.trainable}) on {self.images} images: mean entropy "
            f"{self.entropy_before:.3f} -> {self.entropy_after:.3f}, mean confidence "
            f"{self.confidence_before:.3f} -> {self.confidence_after:.3f}, predicted share "
            f"per class {shares}{warn}"
        )


def _innermost(dataset: Mapping) -> Mapping:
    while dataset.get("dataset") is not None:
        dataset = dataset["dataset"]
    return dataset


def _entropy_losses(head: Mapping, where: str, prior, marginal_weight: float) -> None:
    losses = head.get("loss_decode")
    if losses is None:
        raise LabelFreeError(
            f"entropy minimisation replaces {where}.loss_decode (mmseg decode heads); this "
            f"model's {where} ({head.get('type')}) has none: use --method self-training"
        )
    weights = [losses] if isinstance(losses, Mapping) else list(losses)
    weight = sum(float(w.get("loss_weight", 1.0)) for w in weights)
    head["loss_decode"] = dict(
        type="PixelEntropyLoss",
        loss_weight=weight,
        prior=None if prior is None else [float(v) for v in prior],
        marginal_weight=marginal_weight,
    )


def entropy_config(
    recipe,
    image_root: Path,
    checkpoint: str,
    work_dir: Path,
    name: str,
    trainable: str = "norm",
    max_iters: int | None = None,
    lr: float | None = None,
    prior: Sequence[float] | None = None,
    marginal_weight: float = 1.0,
):
    """The recipe config training patch ``name`` by entropy minimisation on the images linked
    under ``image_root/img_dir/train`` (no validation); ``prior`` / ``marginal_weight``: the
    heads' :class:`PixelEntropyLoss` options."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    cfg = copy.deepcopy(recipe)
    require_recipe(cfg, "entropy minimisation", EXAMPLE)
    model = cfg.model
    if model.get("decode_head") is None:
        raise LabelFreeError(
            f"entropy minimisation is for mmseg segmentors with a decode_head; the config's "
            f"model is a {model.get('type')}: use --method self-training"
        )
    heads = [("decode_head", model.decode_head)]
    auxiliary = model.get("auxiliary_head")
    if isinstance(auxiliary, Mapping):
        heads.append(("auxiliary_head", auxiliary))
    elif auxiliary:
        heads += [(f"auxiliary_head[{k}]", head) for k, head in enumerate(auxiliary)]
    for where, head in heads:
        _entropy_losses(head, where, prior, marginal_weight)
    if trainable == "norm":
        keep = {k: cfg.delta_patch[k] for k in ("targets", "exclude") if k in cfg.delta_patch}
        cfg.delta_patch = dict(name=name, branch=None, task_norm=True, **keep)
    else:
        cfg.delta_patch["name"] = name
    cfg.load_from, cfg.work_dir, cfg.resume = str(checkpoint), str(work_dir), False

    dataset = copy.deepcopy(_innermost(cfg.train_dataloader.dataset))
    pipeline = []
    for step in dataset.pipeline:
        if "Annotations" in str(step["type"]):
            pipeline.append(dict(type="UnlabelledSegMap"))
        else:
            step = dict(step)
            if step.get("cat_max_ratio") is not None:
                step["cat_max_ratio"] = 1.0  # no labels to balance crops by
            pipeline.append(step)
    dataset.data_root = str(image_root) + "/"
    dataset.pop("data_prefix", None)  # (ConfigDict.update would merge, keeping seg_map_path)
    dataset.data_prefix = dict(img_path="img_dir/train")
    dataset.img_suffix, dataset.ann_file, dataset.pipeline = ".jpg", "", pipeline
    cfg.train_dataloader.dataset = dataset
    if lr is not None:
        cfg.optim_wrapper.optimizer.lr = lr
    training_only(cfg, max_iters, "mmdelta-label-free-entropy")
    imports = dict(cfg.get("custom_imports") or dict(imports=[], allow_failed_imports=False))
    imports["imports"] = [*imports.get("imports", []), "mmdelta.label_free.entropy"]
    cfg.custom_imports = imports
    return cfg


@torch.no_grad()
def prediction_stats(model, cfg, files: Sequence[Path], batch_size: int = 4):
    """(mean normalised entropy, mean confidence, predicted share of pixels per class index)
    of ``model`` on the images, in eval mode through the config's test pipeline."""
    entropy = confidence = 0.0
    counts, total = None, 0
    for sample in predict(model, cfg, files, batch_size):
        prob = sample.seg_logits.data.float().softmax(0)
        log_c = math.log(prob.shape[0])
        entropy += float(-(prob * prob.clamp_min(1e-12).log()).sum(0).sum()) / log_c
        conf, label = prob.max(0)
        confidence += float(conf.sum())
        hist = np.bincount(label.flatten().numpy(), minlength=prob.shape[0])
        counts = hist if counts is None else counts + hist
        total += label.numel()
    total = max(total, 1)
    return entropy / total, confidence / total, (counts / total if counts is not None else [])


def minimise_entropy(
    recipe,
    checkpoint: str | os.PathLike,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    work_dir: str | os.PathLike,
    name: str = "entropy",
    trainable: str = "norm",
    max_iters: int | None = None,
    lr: float | None = None,
    marginal_weight: float = 1.0,
    max_images: int | None = None,
    batch_size: int = 4,
    log: Callable[[str], None] = print,
) -> tuple[Path, EntropyStats]:
    """Trains patch ``name`` of ``recipe`` (a config with ``delta_patch``, or its file) by
    entropy minimisation on ``images`` (module docstring); returns the patch file
    (``<work_dir>/<name>.patch.safetensors``) and the run's :class:`EntropyStats`.
    ``max_iters`` defaults to :data:`PASSES` passes over the images at the recipe's batch
    size (the recipe's schedule, shortened), ``lr`` to the recipe's.
    ``marginal_weight``: weight of the class-marginal term whose prior is the base's (with
    AdaBN statistics) predicted class shares on the same images; 0 = TENT's plain entropy."""
    from ..apis import init_base_model
    from ..patching import load_patch
    from ..runner.cli import build_runner
    from .self_training import task_kind

    inputs = TrainingInputs.read(
        recipe, checkpoint, images, max_images, "entropy minimisation", EXAMPLE
    )
    recipe, test_cfg, files = inputs.recipe, inputs.base_cfg, inputs.files
    if task_kind(recipe) != "seg":
        raise LabelFreeError(
            "entropy minimisation is for segmentation (a per-pixel class distribution); "
            "for detection use --method self-training"
        )
    checkpoint, work_dir = inputs.checkpoint, Path(work_dir)
    if max_iters is None:
        max_iters = math.ceil(PASSES * len(files) / recipe.train_dataloader.batch_size)

    model = init_base_model(test_cfg, str(checkpoint))
    classes = list(model.dataset_meta["classes"])
    adapt_norm_stats(model, files, name="adabn", cfg=test_cfg, batch_size=batch_size)
    before = prediction_stats(model, test_cfg, files, batch_size)
    del model
    cfg = entropy_config(
        recipe,
        work_dir / "images",
        str(checkpoint),
        work_dir,
        name,
        trainable,
        max_iters,
        lr,
        prior=before[2] if marginal_weight else None,
        marginal_weight=marginal_weight,
    )

    for k, src in enumerate(files):
        link(src, work_dir / "images" / "img_dir" / "train" / f"{k:06d}.jpg")
    start = time.perf_counter()
    build_runner(cfg).train()
    seconds = time.perf_counter() - start
    patch_file = work_dir / f"{name}.patch.safetensors"
    if not patch_file.is_file():
        raise RuntimeError(f"the runner wrote no patch {patch_file}")  # a bug
    inputs.check_base_unchanged()

    model = init_base_model(test_cfg, str(checkpoint))
    load_patch(model, patch_file)
    after = prediction_stats(model, test_cfg, files, batch_size)
    if len(classes) != len(before[2]):  # the head's outputs are not the metadata's classes
        classes = [str(k) for k in range(len(before[2]))]
    share_before = {c: round(float(v), 4) for c, v in zip(classes, before[2], strict=True)}
    share_after = {c: round(float(v), 4) for c, v in zip(classes, after[2], strict=True)}
    stats = EntropyStats(
        images=len(files),
        trainable=trainable,
        entropy_before=before[0],
        entropy_after=after[0],
        confidence_before=before[1],
        confidence_after=after[1],
        share_before=share_before,
        share_after=share_after,
        vanishing=[c for c in classes if share_after[c] < 0.25 * share_before[c]],
        train_seconds=seconds,
        patch_file=str(patch_file),
    )
    log(f"entropy minimisation: {stats.line()}")
    return patch_file, stats
