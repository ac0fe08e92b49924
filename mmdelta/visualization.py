"""Pictures of predictions side by side, and training curves (used by serving, the demo
and the benchmark).

* :func:`side_by_side` draws one test image under several models' predictions (the base
  and its patches, each with its own class names) with the upstream OpenMMLab
  visualisers, and writes one PNG.
* :func:`plot_curves` plots training loss and validation metrics from mmengine's
  ``vis_data/scalars.json`` files, and writes one PNG.

Both run headless (matplotlib's Agg canvas, no window, no pyplot state) and write their
PNG atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from .fileio import write_bytes_atomic

MIN_SHORT_SIDE = 384  # small images are upscaled to this before drawing: legible labels
TITLE_HEIGHT = 36
GAP = 8
PREFERRED_METRICS = ("pascal_voc/mAP", "coco/bbox_mAP", "mIoU")
METRIC_MARKERS = ("mAP", "mIoU", "aAcc")


# ----------------------------------------------------------------------------- side by side


def side_by_side(
    image: np.ndarray | str | os.PathLike,
    panels: Sequence[tuple[str, Any, Mapping]],
    out_path: str | os.PathLike,
    *,
    task: str,
    score_thr: float = 0.3,
) -> str:
    """Draw one image under several predictions, panels left to right, into one PNG.

    Args:
        image: the original test image, RGB uint8 ``[H, W, 3]``, or a path to an image
            file (read as BGR, converted to RGB).
        panels: ``(title, data_sample, dataset_meta)`` per panel. For ``task="det"`` the
            sample is an mmdet ``DetDataSample`` whose ``pred_instances`` hold ``bboxes``
            ``[N, 4]`` (xyxy, original image pixels), ``scores`` ``[N]``, ``labels``
            ``[N]``; for ``task="seg"`` an mmseg ``SegDataSample`` whose
            ``pred_sem_seg.data`` is ``[1, H, W]`` class ids. ``dataset_meta`` holds that
            model's own ``classes`` (and optionally ``palette``).
        out_path: the PNG to write (parent folders are created).
        task: ``"det"`` or ``"seg"``.
        score_thr: boxes scoring at or below this are not drawn (det only).

    Returns:
        ``str(out_path)``. The picture is ``[TITLE + H*f, sum(W*f) + gaps, 3]`` where ``f``
        is the integer upscale factor making the shorter side at least 384 px.
    """
    if task not in ("det", "seg"):
        raise ValueError(f"side_by_side: task must be 'det' or 'seg', got {task!r}")
    if not panels:
        raise ValueError("side_by_side: no panels to draw")
    rgb = _read_rgb(image)
    h, w = rgb.shape[:2]
    factor = max(1, math.ceil(MIN_SHORT_SIDE / min(h, w)))
    big = cv2.resize(rgb, (w * factor, h * factor), interpolation=cv2.INTER_NEAREST)

    drawn = []
    for title, sample, meta in panels:
        if task == "det":
            picture = _draw_det(big, sample, meta, factor, score_thr)
        else:
            picture = _draw_seg(big, sample, meta, factor)
        if picture.shape[:2] != big.shape[:2]:  # the canvas may round a pixel off
            picture = cv2.resize(picture, (big.shape[1], big.shape[0]))
        drawn.append(_with_title(picture, str(title)))

    gap = np.full((drawn[0].shape[0], GAP, 3), 255, np.uint8)
    row = [drawn[0]]
    for picture in drawn[1:]:
        row += [gap, picture]
    canvas = np.concatenate(row, axis=1)
    return _write_png(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), out_path)


def _read_rgb(image) -> np.ndarray:
    """A path or an array → RGB uint8 ``[H, W, 3]``."""
    if isinstance(image, str | os.PathLike):
        import mmcv

        if not Path(image).is_file():
            raise FileNotFoundError(f"side_by_side: no image file at {image}")
        bgr = mmcv.imread(str(image), flag="color")
        if bgr is None:
            raise ValueError(f"side_by_side: could not read an image from {image}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rgb = np.asarray(image)
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, axis=-1)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"side_by_side: expected an [H, W, 3] image, got shape {rgb.shape}")
    return np.ascontiguousarray(rgb[..., :3].clip(0, 255).astype(np.uint8))


def _classes_for(meta: Mapping, n_labels: int) -> list[str]:
    """The panel's own class names, padded with ``class i`` for labels beyond them."""
    classes = [str(c) for c in (meta.get("classes") or ())]
    classes += [f"class {i}" for i in range(len(classes), n_labels)]
    return classes


def _default_palette(n: int) -> list[tuple[int, int, int]]:
    """Deterministic colours (the same seed as mmdet's 'random' palette)."""
    colors = np.random.RandomState(42).randint(0, 256, size=(max(n, 1), 3))
    return [tuple(int(v) for v in c) for c in colors]


def _palette_for(meta: Mapping, n: int) -> list[tuple[int, int, int]] | None:
    """The meta's palette as int tuples if it covers ``n`` classes, else None."""
    palette = meta.get("palette")
    if not palette or len(palette) < n:
        return None
    return [tuple(int(v) for v in c) for c in palette]


def _draw_det(big: np.ndarray, sample, meta: Mapping, factor: int, score_thr: float):
    from mmdet.structures import DetDataSample
    from mmdet.visualization import DetLocalVisualizer
    from mmengine.structures import InstanceData

    pred = sample.pred_instances
    bboxes = torch.as_tensor(pred.bboxes, dtype=torch.float32).reshape(-1, 4) * factor
    labels = torch.as_tensor(pred.labels, dtype=torch.long).reshape(-1)
    scores = torch.as_tensor(pred.scores, dtype=torch.float32).reshape(-1)
    n_labels = int(labels.max()) + 1 if len(labels) else 0
    classes = _classes_for(meta, n_labels)

    scaled = DetDataSample()
    scaled.pred_instances = InstanceData(bboxes=bboxes, scores=scores, labels=labels)
    vis = DetLocalVisualizer(name=f"mmdelta-pictures-{uuid.uuid4().hex}")
    # a missing, empty or short palette: mmdet draws its own (seeded) colours
    vis.dataset_meta = {"classes": classes, "palette": _palette_for(meta, len(classes))}
    vis.add_datasample("panel", big, scaled, draw_gt=False, show=False, pred_score_thr=score_thr)
    return vis.get_image()


def _draw_seg(big: np.ndarray, sample, meta: Mapping, factor: int):
    import mmseg.visualization  # noqa: F401  (registers the visualiser's modules)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    from mmseg.visualization import SegLocalVisualizer

    seg = torch.as_tensor(sample.pred_sem_seg.data).long().cpu()
    if seg.ndim == 2:
        seg = seg[None]
    seg = seg.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)  # nearest
    if tuple(seg.shape[1:]) != big.shape[:2]:
        raise ValueError(
            f"side_by_side: pred_sem_seg is {tuple(seg.shape[1:])} after the x{factor} "
            f"upscale, the image {big.shape[:2]}: give the map in original image size"
        )
    labels = seg[seg < 255]
    n_labels = int(labels.max()) + 1 if labels.numel() else 0
    classes = _classes_for(meta, n_labels)
    palette = _palette_for(meta, len(classes))
    if palette is None:
        given = [tuple(int(v) for v in c) for c in (meta.get("palette") or ())]
        palette = given + _default_palette(len(classes))[len(given) :]

    scaled = SegDataSample()
    scaled.pred_sem_seg = PixelData(data=seg)
    vis = SegLocalVisualizer(name=f"mmdelta-pictures-{uuid.uuid4().hex}", alpha=0.5)
    vis.dataset_meta = {"classes": classes, "palette": palette}
    vis.add_datasample("panel", big, scaled, draw_gt=False, show=False, with_labels=True)
    return vis.get_image()


def _with_title(picture: np.ndarray, title: str) -> np.ndarray:
    """A white strip with the black title above the picture."""
    width = picture.shape[1]
    strip = np.full((TITLE_HEIGHT, width, 3), 255, np.uint8)
    font, thickness, scale = cv2.FONT_HERSHEY_SIMPLEX, 1, 0.7
    (text_w, text_h), _ = cv2.getTextSize(title, font, scale, thickness)
    if text_w > width - 12:  # a long title shrinks to fit
        scale *= (width - 12) / text_w
        (text_w, text_h), _ = cv2.getTextSize(title, font, scale, thickness)
    y = (TITLE_HEIGHT + text_h) // 2
    cv2.putText(strip, title, (6, y), font, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return np.concatenate([strip, picture], axis=0)


def _write_png(bgr: np.ndarray, out_path) -> str:
    ok, data = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError(f"could not encode a PNG for {out_path}")
    return str(write_bytes_atomic(out_path, data.tobytes()))


# ----------------------------------------------------------------------------- curves


def plot_curves(
    runs: Mapping[str, str | os.PathLike], out_path: str | os.PathLike, *, title: str = ""
) -> str:
    """Training loss (left) and validation metric (right) against iteration, into one PNG.

    Args:
        runs: ``{run label: path to an mmengine LocalVisBackend scalars.json}`` (JSON lines:
            training lines carry ``loss``, validation lines metric keys such as
            ``pascal_voc/mAP`` or ``mIoU``; ``base/<metric>`` keys, the base task with the
            patch off, are drawn dashed). A half-written last line (a run in progress) is
            skipped.
        out_path: the PNG to write (parent folders are created).
        title: the figure's title.

    Validation lines are placed at ``max(step, last training step before them)``:
    mmengine's LoggerHook logs validation at ``step=epoch`` by default, 0 throughout an
    IterBasedTrainLoop.

    Returns:
        ``str(out_path)``.

    Raises:
        FileNotFoundError: a run's file is missing (names the run and the path).
        ValueError: no file holds a loss or metric line (names the files).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("plot_curves: no runs given")
    parsed = {}
    for label, path in runs.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"plot_curves: run {label!r}: no scalars file at {path}")
        parsed[label] = _read_scalars(Path(path))
    if not any(losses or metrics for losses, metrics in parsed.values()):
        raise ValueError(
            "plot_curves: no loss or validation-metric lines in "
            + ", ".join(f"{label}: {path}" for label, path in runs.items())
        )

    fig = Figure(figsize=(12, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_val = fig.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(parsed))]
    metric_names = set()
    for color, (label, (losses, metrics)) in zip(colors, parsed.items(), strict=True):
        if losses:
            steps, values = zip(*losses, strict=True)
            ax_loss.plot(steps, values, color=color, alpha=0.25, linewidth=1)
            ax_loss.plot(steps, _moving_average(values), color=color, linewidth=2, label=label)
        for (is_base, name), points in metrics.items():
            steps, values = zip(*points, strict=True)
            metric_names.add(name)
            ax_val.plot(
                steps,
                values,
                color=color,
                linestyle="--" if is_base else "-",
                marker="o",
                markersize=4,
                label=f"{label} (base task, patch off)" if is_base else label,
            )
    ax_loss.set(title="training loss", xlabel="iteration", ylabel="loss")
    ax_val.set(title="validation", xlabel="iteration", ylabel=" / ".join(sorted(metric_names)))
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not metric_names:
        ax_val.text(0.5, 0.5, "no validation yet", ha="center", transform=ax_val.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return str(write_bytes_atomic(out_path, buffer.getvalue()))


def _read_scalars(path: Path):
    """``(losses [(x, loss)], metrics {(is_base, name): [(x, value)]})`` of one file."""
    losses: list[tuple[float, float]] = []
    metrics: dict[tuple[bool, str], list[tuple[float, float]]] = {}
    last_train_step = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # blank, or a line still being written
        if not isinstance(record, dict):
            continue
        step = record.get("step", record.get("iter"))
        if not isinstance(step, int | float):
            continue
        if isinstance(record.get("loss"), int | float):
            losses.append((step, float(record["loss"])))
            last_train_step = step
            continue
        x = step if last_train_step is None else max(step, last_train_step)
        for is_base, name, key in _pick_metrics(record):
            metrics.setdefault((is_base, name), []).append((x, float(record[key])))
    return losses, metrics


def _strip_base(key: str) -> tuple[bool, str]:
    if key.startswith("base/"):
        return True, key[len("base/") :]
    if "/base/" in key:
        return True, key.replace("/base/", "/", 1)
    return False, key


def _pick_metrics(record: Mapping) -> list[tuple[bool, str, str]]:
    """``(is_base, name, key)``: one metric for the new task and one for the base task.

    Candidates are the numeric keys naming mAP / mIoU / aAcc; the headline ones
    (``pascal_voc/mAP``, ``coco/bbox_mAP``, ``mIoU``) win, else the first by name.
    """
    found: dict[bool, dict[str, str]] = {False: {}, True: {}}
    for key, value in record.items():
        if not isinstance(value, int | float) or not any(m in key for m in METRIC_MARKERS):
            continue
        is_base, name = _strip_base(key)
        found[is_base].setdefault(name, key)
    picked = []
    for is_base, names in found.items():
        if names:
            preferred = [m for m in PREFERRED_METRICS if m in names]
            name = preferred[0] if preferred else sorted(names)[0]
            picked.append((is_base, name, names[name]))
    return picked


def _moving_average(values: Sequence[float], window: int = 5) -> np.ndarray:
    """Trailing mean over up to ``window`` points (same length as ``values``)."""
    values = np.asarray(values, dtype=float)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (sums[idx] - sums[start]) / (idx - start)
