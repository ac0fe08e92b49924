"""The main job: generate data, train (or reuse) the base, Δ-patch it per task, evaluate, report.

Everything runs through the same code path as the real configs: mmdet / mmseg configs with a
``delta_patch`` key, :class:`~mmdelta.runner.DeltaRunner` for training, the safe checkpoint
loader for evaluation. Output folder (``out``)::

    base/base.pth, base/base.json          the base (weights + dataset_meta), its cache key
    base/train/                            the base run (mmengine logs, scalars)
    <task>/<task>.patch.safetensors        each task's patch file (+ its run's logs)
    pictures/<task>_<i>.png, curves.png    base vs patched predictions; training curves
    report.json, report.md                 the numbers

The base is reused when ``base/base.json`` holds the same key (a hash of the resolved base
config and its data), data when the generator's marker matches; patches are trained anew.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmengine.config import Config
from torch import nn

from ...apis import init_base_model, init_patched_model
from ...evaluation import Evaluation, evaluate, first_difference
from ...machine import describe_machine
from ...patching import delta_disabled
from ...runner.cli import build_runner
from ...visualization import plot_curves, side_by_side
from .preparation import base_checkpoint, scalars_file, task_config, write_task_data
from .report import write_report
from .stories import SIZES, STORIES, Size, Story, Task


@dataclass
class _Base:
    """The base as every task step needs it: its config, checkpoint record, model, class
    names and its evaluation on its own task."""

    cfg: Config
    record: dict
    model: nn.Module
    meta: dict
    evaluation: Evaluation
    metric: float
    checkpoint_bytes: int


def run_main_job(
    story: str | Story = "det",
    out: str | os.PathLike = "work_dirs/demo/det",
    data: str | os.PathLike = "data/demo",
    configs: str | os.PathLike = "configs/demo",
    size: str | Size = "full",
    retrain_base: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs one story end to end; returns the report (also written to ``out``)."""
    story = STORIES[story] if isinstance(story, str) else story
    size = SIZES[size] if isinstance(size, str) else size
    out, data, configs = Path(out), Path(data), Path(configs)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    log(f"== mmdelta main job: {story.title} ({size.name} size) → {out}")
    t = time.perf_counter()
    roots = {
        task.name: write_task_data(story, task, size, data) for task in (story.base, *story.tasks)
    }
    timings["data"] = time.perf_counter() - t
    log(f"== data ready in {timings['data']:.1f} s: " + ", ".join(roots.values()))

    base = _prepare_base(story, size, configs, roots, out, retrain_base, log)
    timings["base_train"] = base.record["train_seconds"] if not base.record["cached"] else 0.0

    results, curves = [], {"base": base.record["scalars"]}
    for task in story.tasks:
        cfg = task_config(story, task, configs, roots[task.name], size, out)
        cfg.load_from = base.record["checkpoint"]
        result, curves[task.name] = _patch_task(story, task, cfg, base, size, out, log)
        results.append(result)

    curves_png = plot_curves(curves, out / "pictures" / "curves.png", title=story.title)
    timings["total"] = time.perf_counter() - started
    report = _report(story, size, out, roots, base, results, curves_png, timings)
    write_report(report, out)
    log(f"== report: {out / 'report.md'} ({timings['total']:.0f} s)")
    return report


def _prepare_base(story, size, configs, roots, out, retrain_base, log) -> _Base:
    """The base checkpoint (cached or trained), loaded and evaluated on its own task."""
    base_cfg = task_config(story, story.base, configs, roots[story.base.name], size, out)
    record = base_checkpoint(base_cfg, out / "base", roots[story.base.name], retrain_base, log)
    model = init_base_model(base_cfg, record["checkpoint"])
    evaluation = evaluate(model, base_cfg)
    metric = _metric(story, evaluation)
    log(f"== base model on its own task: {story.metric_label} {metric:.3f}")
    return _Base(
        cfg=base_cfg,
        record=record,
        model=model,
        meta=dict(model.dataset_meta),
        evaluation=evaluation,
        metric=metric,
        checkpoint_bytes=os.path.getsize(record["checkpoint"]),
    )


def _patch_task(story: Story, task: Task, cfg, base: _Base, size: Size, out: Path, log):
    """Trains ``task``'s patch on the base, evaluates it both ways (new task; base task with
    the patch off, prediction by prediction), draws its pictures; returns the task's result
    and its training scalars file."""
    log(f"== patching task {task.name!r}: {task.title}")
    summary, patch_file, scalars, train_seconds = _train_patch(cfg)
    t = time.perf_counter()
    patched = init_patched_model(cfg, base.record["checkpoint"], patch=patch_file)
    task_meta = dict(patched.dataset_meta)
    new_eval = evaluate(patched, cfg)
    with delta_disabled(patched):
        off_eval = evaluate(patched, base.cfg)
    base_on_task = evaluate(base.model, cfg)
    eval_seconds = time.perf_counter() - t
    del patched
    difference = first_difference(base.evaluation.predictions, off_eval.predictions)
    pictures = _pictures(story, task, base, base_on_task, new_eval, task_meta, summary, size, out)

    patch_bytes = os.path.getsize(patch_file)
    result = dict(
        task=task.name,
        title=task.title,
        classes=list(task_meta["classes"]),
        base_task=dict(
            base=base.metric,
            patched_patch_off=_metric(story, off_eval),
            identical_predictions=difference is None,
            first_difference=difference,
            images=len(base.evaluation.predictions),
        ),
        new_task=dict(
            base=_metric(story, base_on_task) if task.same_classes else None,
            patched=_metric(story, new_eval),
            images=len(new_eval.predictions),
        ),
        delta_fraction=summary.delta_fraction,
        patch_fraction=summary.patch_fraction,
        delta_params=summary.delta_params,
        owned_params=summary.owned_params,
        patch_file=str(patch_file),
        patch_bytes=patch_bytes,
        checkpoint_bytes=base.checkpoint_bytes,
        patch_to_checkpoint=patch_bytes / base.checkpoint_bytes,
        iterations=cfg.train_cfg.max_iters,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        pictures=pictures,
    )
    log(
        f"== {task.name}: new task {story.metric_label} "
        f"{_fmt(result['new_task']['base'])} (base) → {result['new_task']['patched']:.3f} "
        f"(patched); base task with the patch off {result['base_task']['patched_patch_off']:.3f}"
        f" (base {base.metric:.3f}), predictions identical: {difference is None}"
    )
    return result, scalars


def _train_patch(cfg):
    """Trains the patch of ``cfg`` (``DeltaRunner``); returns its summary, its file, the
    run's scalars file and the training time."""
    t = time.perf_counter()
    runner = build_runner(cfg)
    runner.train()
    seconds = time.perf_counter() - t
    return runner.patch_summary, runner.final_patch_file, scalars_file(runner), seconds


def _pictures(story, task, base: _Base, base_on_task, new_eval, task_meta, summary, size, out):
    """The first ``size.pictures`` test images under the base's and the patch's predictions."""
    pictures = []
    for i, (b, p) in enumerate(zip(base_on_task.predictions, new_eval.predictions, strict=True)):
        if i == size.pictures:
            break
        pictures.append(
            side_by_side(
                b.img_path,
                [
                    (f"base ({len(base.meta['classes'])} classes)", b, base.meta),
                    (f"patched: {summary.name}", p, task_meta),
                ],
                out / "pictures" / f"{task.name}_{i}.png",
                task=story.name,
            )
        )
    return pictures


def _report(story, size, out, roots, base: _Base, results, curves_png, timings) -> dict:
    return dict(
        story=story.name,
        title=story.title,
        size=size.name,
        out=str(out),
        metric=story.metric_label,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=describe_machine(),
        data={name: root for name, root in roots.items()},
        base=dict(
            metric=base.metric,
            checkpoint=base.record["checkpoint"],
            checkpoint_bytes=base.checkpoint_bytes,
            cached=base.record["cached"],
            train_seconds=base.record["train_seconds"],
            iterations=base.cfg.train_cfg.max_iters,
            images=len(base.evaluation.predictions),
        ),
        tasks=results,
        quality=_quality(base.metric, results),
        curves=curves_png,
        seconds=timings,
    )


# --------------------------------------------------------------------------- steps


def _metric(story: Story, evaluation: Evaluation) -> float:
    if story.metric_key not in evaluation.metrics:
        raise KeyError(
            f"the evaluator returned {sorted(evaluation.metrics)}, not {story.metric_key!r}"
        )
    return float(evaluation.metrics[story.metric_key]) * story.metric_scale


def _quality(base_metric: float, results: list[dict]) -> dict:
    """The issue's targets: base ≥ 0.7; shifted before ≤ 60 % of it; after ≥ 90 % of it."""
    quality = dict(base=base_metric, base_ok=base_metric >= 0.7)
    for r in results:
        if r["new_task"]["base"] is None:
            continue
        before = r["new_task"]["base"] / max(base_metric, 1e-12)
        after = r["new_task"]["patched"] / max(base_metric, 1e-12)
        quality[r["task"]] = dict(
            before=before, before_ok=before <= 0.6, after=after, after_ok=after >= 0.9
        )
    return quality


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
