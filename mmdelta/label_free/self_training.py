"""Label-free Δ patches by confidence-thresholded self-training (pseudo-labels).

Given a patch recipe (a config with a ``delta_patch`` key, e.g. ``configs/demo/*_shifted.py``),
the base checkpoint and a folder of *unlabelled* images of the new domain:

1. **Teacher pass (weak view).** The teacher (round 1: the base with an AdaBN patch, its
   BatchNorm statistics re-estimated on the same images; later rounds: the base with the
   previous round's patch) predicts every image through the config's test pipeline
   (no augmentation).
2. **Pseudo-labels.** Detection: the boxes scoring at least ``score_thr`` (the others are
   dropped; an image without one is left out). Segmentation: the arg-max class of each pixel
   whose soft-max confidence is at least ``score_thr``; the other pixels are 255 (ignored by
   the loss). They are written as a dataset in the config's own format (VOC layout / mmseg
   layout, the images linked, not copied) under ``<work_dir>/round<k>/pseudo``.
3. **Student (strong view).** An ordinary Δ patch trained on that dataset by the project's
   runner (``DeltaRunner``: only the patch trains, the base is ``load_from`` and frozen) with
   the recipe's schedule and the training pipeline plus photometric distortion
   (``strong_aug``). With ``task_norm`` in the recipe the patch's own BatchNorm copies
   re-estimate their statistics on the new images as they train (AdaBN built in).

Each round writes ``<work_dir>/round<k>/<name>.patch.safetensors`` (an ordinary patch:
``load_patch``, ``merge``, serving) and a :class:`RoundStats` — what can be seen without
labels: how many pseudo-labels, their mean confidence, the teacher's mean entropy. **Stopping
rule** (documented in ``docs/serving.md``): stop when a round's kept pseudo-labels and
mean confidence no longer rise by more than ~2 % over the previous round, and discard a
round whose pseudo-label count *falls* by more than 10 % or whose entropy rises (a
collapsing run: the teacher is unlearning classes); one round is the default.

**The base is never altered**: the base checkpoint file is only read (its SHA-256 is
compared before and after every round), and the student is the base with a patch: with the
patch off it is the base bit for bit (checked by ``tools/label_free_gap.py``).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .norm_stats import LabelFreeError, adapt_norm_stats
from .training_inputs import TrainingInputs, link, predict, require_recipe, training_only

LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")
EXAMPLE = "configs/demo/det_shapes_shifted.py"  # a patch recipe, for messages


@dataclass
class RoundStats:
    """What a self-training round can see without labels."""

    round: int
    images: int  # unlabelled images the teacher saw
    kept_images: int  # images with at least one pseudo-label
    pseudo_labels: float  # boxes (det) or fraction of pixels kept (seg)
    mean_confidence: float  # of the kept pseudo-labels
    mean_entropy: float  # of the teacher's class distributions, normalised to [0, 1]
    per_class: dict = field(default_factory=dict)  # boxes (det) / kept pixel fraction (seg)
    label_seconds: float = 0.0
    train_seconds: float = 0.0
    patch_file: str = ""

    def line(self) -> str:
        what = (
            f"{self.pseudo_labels:.0f} boxes"
            if self.pseudo_labels >= 1 or self.pseudo_labels == 0
            else f"{self.pseudo_labels:.1%} of pixels"
        )
        return (
            f"round {self.round}: pseudo-labels {what} on {self.kept_images}/{self.images} "
            f"images, mean confidence {self.mean_confidence:.3f}, teacher entropy "
            f"{self.mean_entropy:.3f}, per class {self.per_class}"
        )


def task_kind(cfg) -> str:
    """``'det'`` (VOC-layout detection) or ``'seg'`` (mmseg layout) from the config."""
    dataset = cfg.train_dataloader.dataset
    while dataset.get("dataset") is not None:
        dataset = dataset["dataset"]
    if str(dataset.type).endswith("VOCDataset"):
        return "det"
    if "seg_map_path" in dataset.get("data_prefix", {}):
        return "seg"
    raise LabelFreeError(
        f"self-training writes pseudo-labels as a VOC-layout detection set or an mmseg-layout "
        f"segmentation set; the config's training set is a {dataset.type}"
    )


def _classes(model) -> list[str]:
    meta = getattr(model, "dataset_meta", None) or {}
    classes = meta.get("classes")
    if not classes:
        raise LabelFreeError("the model has no dataset_meta['classes'] to name pseudo-labels")
    return list(classes)


def write_det_pseudo_labels(
    model, cfg, files: list[Path], root: Path, score_thr: float, batch_size: int = 4
) -> RoundStats:
    """VOC-layout pseudo-labelled set (``root/pseudo/...``) from the model's confident boxes."""
    from ..datasets.synthetic import voc_xml

    classes = _classes(model)
    voc = root / "pseudo"
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    ids, boxes, scores, entropies = [], 0, [], []
    per_class = {c: 0 for c in classes}
    for k, sample in enumerate(predict(model, cfg, files, batch_size)):
        src = Path(sample.img_path)
        h, w = sample.ori_shape
        inst = sample.pred_instances
        p = inst.scores.clamp(1e-6, 1 - 1e-6)
        # binary entropy of each detection's score (normalised: 1 = a coin toss)
        entropies += (-(p * p.log() + (1 - p) * (1 - p).log()) / math.log(2)).tolist()
        keep = inst.scores >= score_thr
        objects = []
        for box, label, score in zip(
            inst.bboxes[keep].tolist(),
            inst.labels[keep].tolist(),
            inst.scores[keep].tolist(),
            strict=True,
        ):
            x0, y0, x1, y1 = (round(v) for v in box)
            x0, y0 = max(x0, 0), max(y0, 0)
            x1, y1 = min(x1, w) - 1, min(y1, h) - 1
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            objects.append((classes[label], (x0, y0, x1, y1)))
            per_class[classes[label]] += 1
            scores.append(score)
        if not objects:
            continue
        img_id = f"{k:06d}"
        ids.append(img_id)
        boxes += len(objects)
        link(src, voc / "JPEGImages" / f"{img_id}.jpg")
        (voc / "Annotations" / f"{img_id}.xml").write_text(
            voc_xml(img_id, w, h, objects, "pseudo"), encoding="utf-8"
        )
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{i}\n" for i in ids))
    return RoundStats(
        round=0,
        images=len(files),
        kept_images=len(ids),
        pseudo_labels=float(boxes),
        mean_confidence=float(np.mean(scores)) if scores else 0.0,
        mean_entropy=float(np.mean(entropies)) if entropies else 0.0,
        per_class=per_class,
    )


def write_seg_pseudo_labels(
    model, cfg, files: list[Path], root: Path, score_thr: float, batch_size: int = 4
) -> RoundStats:
    """mmseg-layout pseudo-labelled set (``root/img_dir/train``, ``root/ann_dir/train``): the
    arg-max class where the soft-max confidence is ≥ ``score_thr``, else 255."""
    import cv2

    classes = _classes(model)
    img_dir, ann_dir = root / "img_dir" / "train", root / "ann_dir" / "train"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    kept = total = 0
    conf_sum = ent_sum = 0.0
    counts = np.zeros(len(classes), np.int64)
    kept_images = 0
    for k, sample in enumerate(predict(model, cfg, files, batch_size)):
        logits = sample.seg_logits.data.float()
        prob = logits.softmax(0)
        conf, label = prob.max(0)
        entropy = -(prob * prob.clamp_min(1e-12).log()).sum(0) / math.log(prob.shape[0])
        mask = conf >= score_thr
        label = label.to(torch.uint8)
        label[~mask] = 255
        total += mask.numel()
        kept += int(mask.sum())
        conf_sum += float(conf[mask].sum())
        ent_sum += float(entropy.sum())
        counts += np.bincount(label[mask].flatten().numpy(), minlength=len(classes))[: len(classes)]
        if mask.any():
            kept_images += 1
        name = f"{k:06d}"
        link(Path(sample.img_path), img_dir / f"{name}.jpg")
        cv2.imwrite(str(ann_dir / f"{name}.png"), label.numpy())
    return RoundStats(
        round=0,
        images=len(files),
        kept_images=kept_images,
        pseudo_labels=kept / max(total, 1),
        mean_confidence=conf_sum / max(kept, 1),
        mean_entropy=ent_sum / max(total, 1),
        per_class={
            c: round(float(n) / max(total, 1), 4) for c, n in zip(classes, counts, strict=True)
        },
    )


def student_config(
    recipe,
    pseudo_root: Path,
    checkpoint: str,
    work_dir: Path,
    name: str,
    kind: str,
    max_iters: int | None = None,
    strong_aug: bool = True,
):
    """The recipe config training patch ``name`` on the pseudo-labelled set, no validation."""
    cfg = copy.deepcopy(recipe)
    require_recipe(cfg, "self-training", EXAMPLE)
    cfg.delta_patch["name"] = name
    cfg.load_from = str(checkpoint)
    cfg.work_dir = str(work_dir)
    cfg.resume = False
    dataset = cfg.train_dataloader.dataset
    dataset.data_root = str(pseudo_root) + "/"
    if kind == "det":
        dataset.ann_file = "pseudo/ImageSets/Main/trainval.txt"
        dataset.data_prefix = dict(sub_data_root="pseudo/")
    else:
        dataset.data_prefix = dict(img_path="img_dir/train", seg_map_path="ann_dir/train")
    if strong_aug:
        pipeline = list(dataset.pipeline)
        aug = (
            dict(type="PhotoMetricDistortion")
            if kind == "det"
            else dict(type="mmseg.PhotoMetricDistortion")
        )
        pipeline.insert(len(pipeline) - 1, aug)
        dataset.pipeline = pipeline
    training_only(cfg, max_iters, "mmdelta-label-free")
    return cfg


def self_train(
    recipe,
    checkpoint: str | os.PathLike,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    work_dir: str | os.PathLike,
    name: str = "self_training",
    rounds: int = 1,
    score_thr: float | None = None,
    max_iters: int | None = None,
    max_images: int | None = None,
    strong_aug: bool = True,
    batch_size: int = 4,
    adabn_teacher: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[Path, list[RoundStats]]:
    """Self-training rounds (module docstring); returns the last round's patch file and
    every round's statistics. ``recipe``: a config with ``delta_patch`` (mmengine Config).
    ``score_thr`` default: 0.7 (det box score) / 0.9 (seg pixel confidence).
    ``adabn_teacher``: round 1's teacher is the base with an AdaBN patch (statistics of the
    same unlabelled images, :func:`adapt_norm_stats`) rather than the bare base."""

    from ..apis import init_base_model
    from ..patching import load_patch
    from ..runner.cli import build_runner

    if rounds < 1:
        raise ValueError(f"rounds must be ≥ 1, got {rounds}")
    inputs = TrainingInputs.read(recipe, checkpoint, images, max_images, "self-training", EXAMPLE)
    recipe, test_cfg, files = inputs.recipe, inputs.base_cfg, inputs.files
    kind = task_kind(recipe)
    score_thr = score_thr if score_thr is not None else (0.7 if kind == "det" else 0.9)
    if not 0 < score_thr < 1:
        raise ValueError(f"score_thr must be in (0, 1), got {score_thr}")
    checkpoint, work_dir = inputs.checkpoint, Path(work_dir)
    patch_file, history = None, []
    for r in range(1, rounds + 1):
        folder = work_dir / f"round{r}"
        start = time.perf_counter()
        teacher = init_base_model(test_cfg, str(checkpoint))
        if patch_file is not None:
            load_patch(teacher, patch_file)
        elif adabn_teacher:
            adapt_norm_stats(teacher, files, name="teacher", cfg=test_cfg, batch_size=batch_size)
        writer = write_det_pseudo_labels if kind == "det" else write_seg_pseudo_labels
        stats = writer(teacher, test_cfg, files, folder, score_thr, batch_size)
        del teacher
        stats.round, stats.label_seconds = r, time.perf_counter() - start
        log(f"self-training {stats.line()}")
        if stats.kept_images == 0:
            raise LabelFreeError(
                f"no prediction reaches the confidence threshold {score_thr} on the "
                f"{len(files)} images: lower score_thr"
            )
        if history and stats.pseudo_labels < 0.9 * history[-1].pseudo_labels:
            log(
                "self-training: pseudo-labels fell by more than 10 % -- a collapsing run; "
                f"keeping round {r - 1}'s patch"
            )
            break
        cfg = student_config(
            recipe, folder, str(checkpoint), folder, name, kind, max_iters, strong_aug
        )
        start = time.perf_counter()
        build_runner(cfg).train()
        stats.train_seconds = time.perf_counter() - start
        patch_file = folder / f"{name}.patch.safetensors"
        if not patch_file.is_file():
            raise RuntimeError(f"the runner wrote no patch {patch_file}")  # a bug
        stats.patch_file = str(patch_file)
        history.append(stats)
        inputs.check_base_unchanged()
    return patch_file, history


def stats_records(history: list[RoundStats]) -> list[dict]:
    return [asdict(s) for s in history]


#: candidate thresholds :func:`choose_threshold` compares
THRESHOLDS = {"det": (0.3, 0.5, 0.7, 0.9), "seg": (0.5, 0.7, 0.9, 0.95)}


def _voc_boxes(xml_file: Path, classes: list[str]) -> list[tuple[int, list[float]]]:
    import xml.etree.ElementTree as ET

    out = []
    for obj in ET.parse(xml_file).findall("object"):
        box = obj.find("bndbox")
        coords = [float(box.find(k).text) - 1 for k in ("xmin", "ymin", "xmax", "ymax")]
        out.append((classes.index(obj.find("name").text), coords))
    return out


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def pseudo_label_quality(
    model, cfg, files: list[Path], thresholds: Sequence[float], batch_size: int = 4
) -> list[dict]:
    """Precision and recall of the pseudo-labels ``model`` would give at each threshold on a
    *labelled validation split* of the new domain (``files``: VOC ``JPEGImages/<id>.jpg`` with
    ``Annotations/<id>.xml``, or mmseg ``img_dir/<split>/<n>.jpg`` with
    ``ann_dir/<split>/<n>.png``). Detection: a kept box is right when it overlaps a
    same-class ground-truth box with IoU ≥ 0.5 (each matched once); segmentation: a kept
    pixel is right when it has the ground-truth class. ``f1`` is their harmonic mean."""
    import cv2

    classes = _classes(model)
    kind = task_kind(cfg)
    right = np.zeros(len(thresholds))
    kept = np.zeros(len(thresholds))
    total = 0
    for sample in predict(model, cfg, files, batch_size):
        path = Path(sample.img_path)
        if kind == "det":
            gts = _voc_boxes(path.parent.parent / "Annotations" / f"{path.stem}.xml", classes)
            total += len(gts)
            inst = sample.pred_instances
            order = inst.scores.argsort(descending=True)
            for t, thr in enumerate(thresholds):
                used = set()
                for i in order.tolist():
                    if float(inst.scores[i]) < thr:
                        break
                    kept[t] += 1
                    label, box = int(inst.labels[i]), inst.bboxes[i].tolist()
                    best = max(
                        (
                            (_iou(box, g), j)
                            for j, (c, g) in enumerate(gts)
                            if c == label and j not in used
                        ),
                        default=(0.0, -1),
                    )
                    if best[0] >= 0.5:
                        used.add(best[1])
                        right[t] += 1
        else:
            ann = Path(str(path.with_suffix(".png")).replace("/img_dir/", "/ann_dir/"))
            gt = torch.from_numpy(cv2.imread(str(ann), cv2.IMREAD_GRAYSCALE)).long()
            prob = sample.seg_logits.data.float().softmax(0)
            conf, label = prob.max(0)
            valid = gt != 255
            total += int(valid.sum())
            for t, thr in enumerate(thresholds):
                mask = (conf >= thr) & valid
                kept[t] += int(mask.sum())
                right[t] += int((label[mask] == gt[mask]).sum())
    rows = []
    for t, thr in enumerate(thresholds):
        precision = right[t] / max(kept[t], 1)
        recall = right[t] / max(total, 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        rows.append(dict(threshold=thr, precision=precision, recall=recall, f1=f1))
    return rows


def choose_threshold(rows: list[dict]) -> float:
    """The threshold with the best ``f1`` in :func:`pseudo_label_quality`'s rows."""
    return max(rows, key=lambda r: r["f1"])["threshold"]
