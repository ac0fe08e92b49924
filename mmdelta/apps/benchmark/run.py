"""The benchmark: train every method on one task from one base, choose its lr on a validation
split, score it on the test set, cost it, interpolate.

Protocol (:mod:`.protocol`): the new task's training set is split deterministically into a
*fit* part (what every method trains on) and a *val* part (``--val-fraction``, by a stable
hash of each image's path; no val image may be a test image). Every method trains at each lr
of its grid on the fit part (full fine-tuning: ``--ft-lr``; patch methods: ``--lr-scales`` ×
the config's own lr), is scored on the val part, and only the lr with the best validation
metric is scored on the test set — the test set chooses nothing. The top rows
(``Options.top_rows``) are retrained at the chosen lr with ``--seeds`` seeds (test mean,
min, max) and once more at equal wall-clock (as many iterations as full fine-tuning's
schedule takes time, at most ``--equal-time-cap`` × the schedule).

Output folder (``out``)::

    methods/<id>/lr<lr>/        each run of the lr sweep (mmengine logs, its patch file or
                                full_ft.pth, config.py: what the cost runs train)
    methods/<id>/seed<k>/       the top rows' further seeds at the chosen lr
    methods/<id>/equal_time/    the top rows' equal wall-clock run
    val_split.txt               the val part's images, one path a line
    benchmark.json              every number (fields: :data:`~.report.METHOD_FIELDS` …)
    benchmark.md, tradeoff.png, frontier.png   the tables and plots

Scores: *new task* = the method's model on the task's test set; *base task* = the model as
it would serve the base's own test set — Δ methods with their patch **off** (and checked
prediction by prediction to equal the base's), full fine-tuning and PAINT as they are.
"""

from __future__ import annotations

import copy
import datetime
import os
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.runner import Runner

from ...apis import init_base_model, init_patched_model
from ...evaluation import Evaluation, evaluate, first_difference
from ...fileio import write_atomic, write_text_atomic
from ...patching import delta_disabled, merge_patch
from ...runner.checkpoint import mmengine_checkpoints
from ...runner.cli import build_runner
from .costs import inference_latency, training_costs
from .methods import BenchmarkError, Method, comparison_methods, method_config
from .paint import ALPHAS, interpolate
from .protocol import (
    Split,
    apply_split,
    check_split,
    choose,
    equal_time_iterations,
    lr_grid,
    model_bytes,
    val_split,
)
from .report import assemble, write_outputs

#: mmseg reports these in percent
PERCENT_METRICS = ("mIoU", "mAcc", "aAcc", "mDice", "mFscore", "mPrecision", "mRecall")
#: metric keys tried in order when none is given
KNOWN_METRICS = ("pascal_voc/mAP", "coco/bbox_mAP", "coco/segm_mAP", "mIoU")


@dataclass
class Setting:
    """What is compared: the patch-training config of the new task (its ``delta_patch`` is
    Δ-Patching's default, its ``load_from`` the base), the base checkpoint, the base task's
    test config (``None``: no base-task scores; exactness is then checked on the new task),
    and an optional full fine-tuning config (needed when the class set changes)."""

    name: str
    title: str
    task_cfg: Config
    checkpoint: str
    base_cfg: Config | None = None
    finetune_cfg: Config | None = None
    metric_key: str | None = None
    metric_label: str | None = None

    @property
    def same_classes(self) -> bool:
        return self.task_cfg.delta_patch.get("classes") is None


#: full fine-tuning's lr grid when it runs the Δ config's optimiser and schedule; on the
#: embedded shift task 1e-4 / 3e-4 gave 0.779 / 0.871 test mAP
DEFAULT_FT_LRS = (1e-4, 3e-4, 1e-3)
#: the patch methods' lr grid: multiples of the config's own lr
DEFAULT_LR_SCALES = (0.33, 1.0, 3.0)
#: the rows retrained with several seeds and at equal wall-clock (those that exist)
TOP_ROWS = ("full_ft", "delta", "delta_fast")


@dataclass
class Options:
    #: full fine-tuning's lr grid; None: the --finetune-config's own lr, else DEFAULT_FT_LRS
    ft_lrs: tuple[float, ...] | None = None
    #: the patch methods' lr grid as multiples of the config's lr
    lr_scales: tuple[float, ...] = DEFAULT_LR_SCALES
    placements: tuple[str, ...] = ("3", "4", "none")
    branch_types: tuple[str, ...] = ("ScaleShiftDelta", "BlockDelta")
    ranks: tuple[int, ...] = (4, 16)
    methods: tuple[str, ...] | None = None  # ids to run (None: all)
    cost_repeats: int = 3
    cost_steps: int = 8
    cost_warmup: int = 2
    latency_images: int = 20
    latency_repeats: int = 2
    paint: bool = True  # PAINT α sweep (same-class tasks)
    iterations: int | None = None  # training iterations of every method (None: the config's)
    val_fraction: float = 0.15  # of the new task's training images, for choosing the lr
    split_seed: int = 0
    seeds: int = 2  # of the top rows (seed = randomness.seed = 0, 1, …)
    top_rows: tuple[str, ...] = TOP_ROWS
    equal_time: bool = True
    equal_time_cap: float = 4.0  # at most this × the schedule's iterations


def metric_value(evaluation: Evaluation, key: str) -> float:
    if not evaluation.metrics:
        return 0.0  # mmdet's CocoMetric returns no metric when the model predicts no box
    if key not in evaluation.metrics:
        raise BenchmarkError(
            f"the evaluator returned {sorted(evaluation.metrics)}, not {key!r}: pass --metric"
        )
    value = float(evaluation.metrics[key])
    return value / 100 if key.split("/")[-1] in PERCENT_METRICS else value


def _pick_metric(evaluation: Evaluation, cfg: Config) -> str:
    """The metric compared on ``cfg``'s test set: the first of :data:`KNOWN_METRICS` its
    evaluator returned (or would return: an evaluation of a model that predicted nothing
    can be empty), else its first number."""
    for key in KNOWN_METRICS:
        if key in evaluation.metrics:
            return key
    if not evaluation.metrics:
        expected = _expected_keys(cfg.test_evaluator)
        if expected:
            return expected[0]
    floats = [k for k, v in evaluation.metrics.items() if isinstance(v, (int, float))]
    if not floats:
        raise BenchmarkError(f"no numeric metric in {sorted(evaluation.metrics)}: pass --metric")
    return floats[0]


def _expected_keys(evaluator) -> list[str]:
    """The :data:`KNOWN_METRICS` keys an evaluator config returns (by its metric types)."""
    if isinstance(evaluator, list | tuple):
        return [k for e in evaluator for k in _expected_keys(e)]
    kind = str(evaluator.get("type", "")).split(".")[-1]
    if kind == "VOCMetric":
        return [f"{evaluator.get('prefix') or 'pascal_voc'}/mAP"]
    if kind == "CocoMetric":
        metrics = evaluator.get("metric", "bbox")
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        return [f"{evaluator.get('prefix') or 'coco'}/{m}_mAP" for m in metrics if m != "proposal"]
    if kind == "IoUMetric":
        return ["mIoU"]
    return []


@dataclass
class Context:
    """What every run of one benchmark shares."""

    setting: Setting
    out: Path
    options: Options
    key: str  # the new task's metric
    splits: dict[str, Split]  # 'task' (patch methods) and 'full_ft' (its own config's)
    base_model: torch.nn.Module | None = None
    exact_cfg: Config | None = None
    base_exact: Evaluation | None = None
    latency_batches: list = field(default_factory=list)
    log: Callable[[str], None] = print
    base_key: str | None = None  # the base task's metric (its own evaluator's)


def run_benchmark(
    setting: Setting, out: str | os.PathLike, options: Options, log: Callable = print
) -> dict:
    """Runs the comparison and writes ``benchmark.json`` / ``.md`` / ``tradeoff.png`` /
    ``frontier.png`` / ``val_split.txt``; returns the report."""
    out = Path(out)
    started = time.perf_counter()
    splits = _prepare_splits(setting, options, out, log)
    base_model, exact_cfg, base_exact, (key, base_key), base_scores = _score_base(setting, log)
    methods, top = _select_methods(setting.task_cfg, base_model, options)

    ctx = Context(
        setting=setting,
        out=out,
        options=options,
        key=key,
        splits=splits,
        base_model=base_model,
        exact_cfg=exact_cfg,
        base_exact=base_exact,
        latency_batches=_batches(setting.task_cfg, options.latency_images),
        log=log,
        base_key=base_key,
    )
    rows = [
        evaluate_method(m, ctx, seeds=max(1, options.seeds) if m.id in top else 1) for m in methods
    ]
    full = next(r for r in rows if r["family"] == "full_ft")

    paint = []
    if options.paint and setting.same_classes:
        ft_state = init_base_model(_cfg_of(full), full["checkpoint"]).state_dict()
        paint = _paint(setting, (key, base_key), ft_state, log)
    costs = _costs_and_equal_time(rows, methods, top, full, ctx)

    report = assemble(
        setting=_setting_record(ctx, full, top),
        base=base_scores,
        rows=rows,
        costs=costs,
        paint=paint,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        seconds=time.perf_counter() - started,
    )
    write_outputs(report, out)
    log(f"== benchmark written to {out} ({report['seconds']:.0f} s)")
    return report


def _prepare_splits(setting: Setting, options: Options, out: Path, log) -> dict[str, Split]:
    """Sets every method's iterations (``options.iterations``), splits the new task's
    training set into fit / val and writes ``val_split.txt``."""
    if options.iterations:
        _set_iterations(setting.task_cfg, options.iterations)
        if setting.finetune_cfg is not None:
            _set_iterations(setting.finetune_cfg, options.iterations)
    splits = _splits(setting, options)
    task_split = splits["task"]
    log(
        f"== split: {task_split.images['fit']} fit / {task_split.images['val']} val images "
        f"(val fraction {options.val_fraction}, seed {options.split_seed}), "
        f"{task_split.images['test']} test images"
    )
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "val_split.txt", "".join(f"{p}\n" for p in task_split.val_paths))
    return splits


def _score_base(setting: Setting, log):
    """The base model, where its patch-off predictions are compared (and its predictions
    there), the metric key and the base's scores on both tasks."""
    task_cfg, base_cfg = setting.task_cfg, setting.base_cfg
    base_model = init_base_model(base_cfg or task_cfg, setting.checkpoint)
    exact_cfg = base_cfg or task_cfg  # where patch-off predictions are compared with the base
    base_exact = evaluate(base_model, exact_cfg)
    base_on_new = evaluate(base_model, task_cfg) if setting.same_classes else None
    # the new task's metric and the base task's: two datasets (VOC / COCO) have two
    if setting.metric_key:
        key = setting.metric_key
    elif base_on_new is not None:
        key = _pick_metric(base_on_new, task_cfg)
    elif base_cfg is None:  # (base_exact is the base on the new task's test set)
        key = _pick_metric(base_exact, exact_cfg)
    else:  # other classes, another task: the new task's evaluator says
        expected = _expected_keys(task_cfg.test_evaluator)
        if not expected:
            raise BenchmarkError(
                f"cannot tell which metric of {task_cfg.filename}'s test_evaluator to compare: "
                "pass --metric"
            )
        key = expected[0]
    base_key = _pick_metric(base_exact, exact_cfg) if base_cfg is not None else key
    base_scores = dict(
        base_task=metric_value(base_exact, base_key) if base_cfg is not None else None,
        new_task=metric_value(base_on_new, key) if base_on_new is not None else None,
    )
    log(
        f"== base: base task {_fmt(base_scores['base_task'])} ({base_key}), new task "
        f"{_fmt(base_scores['new_task'])} ({key})"
    )
    return base_model, exact_cfg, base_exact, (key, base_key), base_scores


def _select_methods(task_cfg, base_model, options: Options) -> tuple[list[Method], list[str]]:
    """The methods to run (``options.methods``; full fine-tuning always) and the top rows
    among them."""
    methods = comparison_methods(
        task_cfg,
        base_model,
        None,
        options.placements,
        options.branch_types,
        options.ranks,
    )
    if options.methods is not None:
        unknown = sorted(set(options.methods) - {m.id for m in methods})
        if unknown:
            raise BenchmarkError(
                f"--methods {unknown} unknown; the methods are {[m.id for m in methods]}"
            )
        methods = [m for m in methods if m.id in options.methods or m.id == "full_ft"]
    top = [i for i in options.top_rows if any(m.id == i for m in methods)]
    return methods, top


def _costs_and_equal_time(rows, methods, top, full, ctx: Context) -> dict:
    """Each row's training cost (step time, peak memory) and the top rows' equal-time runs;
    returns the costs."""
    options, log = ctx.options, ctx.log
    costs = {}
    if options.cost_repeats > 0:
        configs = {r["id"]: r["config"] for r in rows}
        log(f"== training cost: {len(configs)} methods × {options.cost_repeats} repeats")
        costs = training_costs(
            configs, options.cost_repeats, options.cost_steps, options.cost_warmup, log=log
        )
    for row in rows:
        row["train_step_seconds"] = _train_step_seconds(row)
    if options.equal_time:
        by_id = {m.id: m for m in methods}
        for row in rows:
            if row["id"] in top:
                row["equal_time"] = equal_time_run(by_id[row["id"]], row, full, costs, ctx)
    return costs


def _setting_record(ctx: Context, full: dict, top: list[str]) -> dict:
    """The report's ``setting``: what was compared and how."""
    setting, options = ctx.setting, ctx.options
    task_cfg, base_cfg = setting.task_cfg, setting.base_cfg
    task_split = ctx.splits["task"]
    return dict(
        name=setting.name,
        title=setting.title,
        metric=ctx.key,
        metric_label=setting.metric_label or ctx.key,
        base_metric=ctx.base_key,
        checkpoint=setting.checkpoint,
        checkpoint_bytes=os.path.getsize(setting.checkpoint),
        model_bytes=model_bytes(ctx.base_model),
        task_config=task_cfg.filename,
        base_config=base_cfg.filename if base_cfg is not None else None,
        iterations=task_cfg.train_cfg.get("max_iters"),
        ft_lr=full["lr"],
        ft_lr_grid=[p["lr"] for p in full["lr_sweep"]],
        lr_scales=list(options.lr_scales),
        split=dict(
            val_fraction=options.val_fraction,
            seed=options.split_seed,
            images=dict(task_split.images),
            val_list=str(ctx.out / "val_split.txt"),
            selection="validation",
        ),
        seeds=options.seeds,
        top_rows=top,
        equal_time=dict(enabled=options.equal_time, cap=options.equal_time_cap),
        cost=dict(
            repeats=options.cost_repeats,
            steps=options.cost_steps,
            warmup=options.cost_warmup,
            latency_images=len(ctx.latency_batches),
            latency_repeats=options.latency_repeats,
        ),
    )


# --------------------------------------------------------------------------- protocol


def _splits(setting: Setting, options: Options) -> dict[str, Split]:
    """The task config's fit / val split (checked against its test set), and full
    fine-tuning's (its own config's datasets, the same images) when it has its own config."""

    def carve(cfg) -> Split:
        split = val_split(cfg, options.val_fraction, options.split_seed)
        return check_split(cfg, split, str(cfg.filename))

    task = carve(setting.task_cfg)
    splits = dict(task=task, full_ft=task)
    if setting.finetune_cfg is not None:
        splits["full_ft"] = carve(setting.finetune_cfg)
    return splits


def _grid(method: Method, ctx: Context) -> tuple[float, ...]:
    setting, options = ctx.setting, ctx.options
    if not method.is_patch:
        if options.ft_lrs:
            return tuple(options.ft_lrs)
        if setting.finetune_cfg is not None:
            return (float(setting.finetune_cfg.optim_wrapper.optimizer.lr),)
        return DEFAULT_FT_LRS
    return lr_grid(float(setting.task_cfg.optim_wrapper.optimizer.lr), options.lr_scales)


#: fields of a run in a row's lr_sweep / seeds
RUN_FIELDS = ("lr", "seed", "iterations", "val_metric", "train_seconds", "work_dir")


def _public(run: dict, *extra: str) -> dict:
    return {k: run.get(k) for k in (*RUN_FIELDS, *extra)}


def evaluate_method(method: Method, ctx: Context, seeds: int = 1) -> dict:
    """The method's row: each lr of its grid trained (seed 0) and scored on the val part;
    the best on validation scored on the test set (new task, base task, exactness,
    latency); with ``seeds`` > 1 retrained at that lr with seeds 1 … and scored on the test
    set's new task. ``new_task`` is the mean over seeds."""
    grid = _grid(method, ctx)
    ctx.log(f"== {method.id}: {method.label}, lr grid {', '.join(f'{lr:g}' for lr in grid)}")
    sweep = [train_run(method, ctx, lr=lr, seed=0, tag=f"lr{lr:g}") for lr in grid]
    chosen = choose(sweep)
    ctx.log(f"   chosen on validation: lr {chosen['lr']:g} (val {chosen['val_metric']:.3f})")
    row = {k: v for k, v in chosen.items() if not k.startswith("_")}
    row.update(score_chosen(method, chosen, ctx))
    runs = [dict(_public(chosen), new_task=row["new_task"])]
    for seed in range(1, seeds):
        run = train_run(method, ctx, lr=chosen["lr"], seed=seed, tag=f"seed{seed}")
        runs.append(dict(_public(run), new_task=new_task_score(method, run, ctx)))
        ctx.log(f"   seed {seed}: new task {runs[-1]['new_task']:.3f}")
    values = [r["new_task"] for r in runs]
    row.update(
        lr_grid=list(grid),
        lr_sweep=[_public(r) for r in sweep],
        seeds=runs,
        new_task=statistics.fmean(values),
        new_task_min=min(values),
        new_task_max=max(values),
        equal_time=None,
    )
    ctx.log(
        f"   new task {row['new_task']:.3f}"
        + (f" (seeds {', '.join(f'{v:.3f}' for v in values)})" if len(values) > 1 else "")
        + f", base task {_fmt(row['base_task'])}, identical with patch off: "
        f"{row['base_identical']}"
    )
    return row


def train_run(
    method: Method, ctx: Context, lr: float, seed: int, tag: str, iterations: int | None = None
) -> dict:
    """One training run on the fit part, scored on the val part. Returns the run's record
    (``_cfg``: its config, also written to ``work_dir/config.py``)."""
    cfg = _method_cfg(ctx, method, lr, seed, tag)
    if iterations is not None:
        _scale_schedule(cfg, iterations)
    config = str(Path(cfg.work_dir) / "config.py")
    cfg.dump(config)
    run, model = _train(method, cfg)
    val = evaluate(model, cfg, "val_dataloader", "val_evaluator")
    del model
    run.update(seed=seed, val_metric=metric_value(val, ctx.key), config=config, _cfg=cfg)
    ctx.log(
        f"   {method.id} lr {lr:g} seed {seed}: val {run['val_metric']:.3f} "
        f"({run['iterations']} iterations, {run['train_seconds']:.0f} s)"
    )
    return run


def score_chosen(method: Method, run: dict, ctx: Context) -> dict:
    """The chosen run on the test sets: new task, base task (Δ methods with the patch off,
    checked prediction by prediction), latency."""
    cfg, setting = run["_cfg"], ctx.setting
    if not method.is_patch:
        scores = _score_full(cfg, run["checkpoint"], setting, (ctx.key, ctx.base_key))
        scores["latency"] = None
        return scores
    keys = (ctx.key, ctx.base_key)
    scores = _score_patch(run, cfg, setting, ctx.exact_cfg, ctx.base_exact, keys, ctx.base_model)
    scores["latency"] = _latency(
        ctx.base_model, scores.pop("_model"), ctx.latency_batches, ctx.options
    )
    return scores


def new_task_score(method: Method, run: dict, ctx: Context) -> float:
    """The run's model on the new task's test set."""
    cfg = run["_cfg"]
    if method.is_patch:
        model = init_patched_model(cfg, ctx.setting.checkpoint, patch=run["checkpoint"])
    else:
        model = init_base_model(cfg, run["checkpoint"])
    return metric_value(evaluate(model, cfg), ctx.key)


def _train_step_seconds(row: dict) -> float | None:
    """Median training seconds per iteration over the method's runs (sweep and seeds; the
    runner's setup included: a coarse figure, used when no cost runs were made)."""
    runs = [*row.get("lr_sweep", []), *row.get("seeds", [])[1:]]
    per = [r["train_seconds"] / r["iterations"] for r in runs if r.get("iterations")]
    return statistics.median(per) if per else None


def _step_seconds(row: dict, costs: dict) -> tuple[float | None, str]:
    cost = costs.get(row["id"])
    if cost:
        return cost["step_seconds"], "cost runs"
    return row.get("train_step_seconds"), "training runs"


def equal_time_run(method: Method, row: dict, full: dict, costs: dict, ctx: Context) -> dict:
    """The method at its chosen lr (seed 0) for as many iterations as take it as long as full
    fine-tuning's schedule (``round(iters × full_ft step / its step)``, at most
    ``equal_time_cap`` × iters), scored on the new task's test set."""
    iters = row["iterations"]
    full_step, source = _step_seconds(full, costs)
    step, _ = _step_seconds(row, costs)
    cfg = _cfg_of(row)
    loop = str(cfg.train_cfg.get("type", "")).split(".")[-1]
    if loop != "IterBasedTrainLoop":
        return dict(skipped=f"{loop or 'epoch-based'} schedule (iteration-based only)")
    if not full_step or not step:
        return dict(skipped="no step times")
    n, capped = equal_time_iterations(iters, full_step, step, ctx.options.equal_time_cap)
    out = dict(
        iterations=n,
        step_ratio=step / full_step,
        step_source=source,
        capped=capped,
        new_task=row["seeds"][0]["new_task"],
        train_seconds=None,
        work_dir=None,
        reused=True,
    )
    if row["id"] == full["id"] or n == iters:
        return out  # the same run as the chosen one
    ctx.log(f"== {row['id']} at equal wall-clock: {n} iterations (schedule {iters})")
    run = train_run(method, ctx, lr=row["lr"], seed=0, tag="equal_time", iterations=n)
    out.update(
        new_task=new_task_score(method, run, ctx),
        val_metric=run["val_metric"],
        train_seconds=run["train_seconds"],
        work_dir=run["work_dir"],
        reused=False,
    )
    ctx.log(f"   new task at equal wall-clock {out['new_task']:.3f}")
    return out


def _cfg_of(row: dict) -> Config:
    return Config.fromfile(row["config"])


# --------------------------------------------------------------------------- steps


def _set_iterations(cfg: Config, iters: int) -> None:
    loop = str(cfg.train_cfg.get("type", "")).split(".")[-1]
    if loop == "EpochBasedTrainLoop":
        _epochs_to_iterations(cfg, iters)
    elif loop != "IterBasedTrainLoop":
        raise BenchmarkError(
            f"--iters needs an iteration- or epoch-based schedule; {cfg.filename} trains with "
            f"{loop or cfg.train_cfg} (set its schedule in the config instead)"
        )
    cfg.merge_from_dict(
        {
            "train_cfg.max_iters": iters,
            "train_cfg.val_interval": iters,
            "default_hooks.logger.interval": min(iters, 20),
        }
    )
    for scheduler in cfg.get("param_scheduler") or []:
        if scheduler.get("end", 0) > iters:
            scheduler["end"] = iters
        if scheduler.get("begin", 0) >= iters:
            scheduler["begin"] = 0


#: epoch-valued arguments of mmengine's parameter schedulers (besides begin / end)
_EPOCH_ARGS = ("milestones", "T_max", "step_size", "total_iters", "periods")


def _epochs_to_iterations(cfg: Config, iters: int) -> None:
    """An epoch-based schedule compressed into ``iters`` iterations: an
    ``IterBasedTrainLoop`` of ``iters``, each epoch-based scheduler's begin / end and
    epoch-valued arguments (milestones, ``T_max``, …) scaled by ``iters / max_epochs``
    (the decay keeps its shape), logs and checkpoints by iteration. The data, its sampler and
    the iteration-based schedulers (warm-up) are the config's."""
    epochs = int(cfg.train_cfg.max_epochs)
    scale = iters / epochs

    def at(epoch) -> int:
        return max(0, round(epoch * scale))

    for scheduler in cfg.get("param_scheduler") or []:
        if not scheduler.get("by_epoch", True):
            continue
        scheduler["by_epoch"] = False
        scheduler["begin"] = at(scheduler.get("begin", 0))
        scheduler["end"] = at(min(scheduler.get("end", epochs), epochs))
        for key in _EPOCH_ARGS:
            value = scheduler.get(key)
            if isinstance(value, list | tuple):
                scheduler[key] = [at(v) for v in value]
            elif isinstance(value, int | float):
                scheduler[key] = max(1, at(value))
    val_begin = cfg.train_cfg.get("val_begin", 1)
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters)
    if val_begin > 1:
        cfg.train_cfg["val_begin"] = val_begin  # (the benchmark's: no validation in training)
    if cfg.get("log_processor") is not None:
        cfg.log_processor["by_epoch"] = False
    if (cfg.get("default_hooks") or {}).get("checkpoint") is not None:
        cfg.default_hooks.checkpoint.update(by_epoch=False, interval=iters)


def _scale_schedule(cfg: Config, iters: int) -> None:
    """``iters`` iterations with the schedule stretched to them: every scheduler's begin /
    end scaled by ``iters / max_iters`` (warm-up and decay keep their shape)."""
    old = cfg.train_cfg.max_iters
    for scheduler in cfg.get("param_scheduler") or []:
        for k in ("begin", "end"):
            if k in scheduler and scheduler[k] is not None:
                scheduler[k] = max(0, round(scheduler[k] * iters / old))
        if scheduler.get("end") is not None and scheduler["end"] <= scheduler.get("begin", 0):
            scheduler["end"] = scheduler.get("begin", 0) + 1
    cfg.merge_from_dict(
        {
            "train_cfg.max_iters": iters,
            "train_cfg.val_interval": iters,
            "default_hooks.logger.interval": min(iters, 20),
        }
    )
    checkpoint = cfg.get("default_hooks", {}).get("checkpoint")
    if checkpoint is not None and checkpoint.get("interval") == old:
        checkpoint["interval"] = iters


def _method_cfg(ctx: Context, method: Method, lr: float, seed: int, tag: str) -> Config:
    setting = ctx.setting
    if not method.is_patch and setting.finetune_cfg is not None:
        cfg = copy.deepcopy(setting.finetune_cfg)
    else:
        cfg = method_config(setting.task_cfg, method)
    cfg.optim_wrapper.optimizer.lr = lr
    cfg.randomness = dict(cfg.get("randomness") or {}, seed=seed)
    cfg.load_from = setting.checkpoint
    apply_split(cfg, ctx.splits["task" if method.is_patch else "full_ft"])
    cfg.work_dir = str(ctx.out / "methods" / method.id / tag)
    cfg.visualizer.name = f"mmdelta-benchmark-{method.id}-{uuid.uuid4().hex[:8]}"
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    return cfg


def _train(method: Method, cfg: Config) -> tuple[dict, torch.nn.Module]:
    start = time.perf_counter()
    with mmengine_checkpoints():
        runner = build_runner(cfg)
        model = runner.train()
    seconds = time.perf_counter() - start
    row = dict(
        id=method.id,
        family=method.family,
        label=method.label,
        axis=method.axis,
        value=method.value,
        notes=list(method.notes),
        delta_patch=copy.deepcopy(method.delta_patch),
        lr=cfg.optim_wrapper.optimizer.lr,
        iterations=cfg.train_cfg.get("max_iters"),
        train_seconds=seconds,
        work_dir=cfg.work_dir,
    )
    if method.is_patch:
        summary = runner.patch_summary
        row.update(
            checkpoint=runner.final_patch_file,
            trained_params=summary.delta_params + summary.owned_params,
            delta_params=summary.delta_params,
            owned_params=summary.owned_params,
            delta_fraction=summary.delta_fraction,
            patch_fraction=summary.patch_fraction,
            stages=dict(summary.stages()),
        )
    else:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        path = Path(cfg.work_dir) / "full_ft.pth"
        meta = dict(dataset_meta=dict(runner.train_dataloader.dataset.metainfo))
        write_atomic(path, lambda tmp: torch.save(dict(state_dict=state, meta=meta), tmp))
        del state
        params = sum(p.numel() for p in model.parameters())
        row.update(
            checkpoint=str(path),
            trained_params=params,
            delta_params=None,
            owned_params=None,
            delta_fraction=None,
            patch_fraction=1.0,
            stages=None,
        )
    row["patch_bytes"] = os.path.getsize(row["checkpoint"])
    return row, model


def _score_patch(row, cfg, setting, exact_cfg, base_exact, keys, base_model) -> dict:
    key, base_key = keys
    patched = init_patched_model(cfg, setting.checkpoint, patch=row["checkpoint"])
    new = evaluate(patched, cfg)
    with delta_disabled(patched):
        off = evaluate(patched, exact_cfg)
    difference = first_difference(base_exact.predictions, off.predictions)
    return dict(
        new_task=metric_value(new, key),
        base_task=metric_value(off, base_key) if setting.base_cfg is not None else None,
        base_identical=difference is None,
        first_difference=difference,
        exactness_checked_on="base task" if setting.base_cfg is not None else "new task",
        _model=patched,
    )


def _score_full(cfg, checkpoint, setting, keys) -> dict:
    key, base_key = keys
    model = init_base_model(cfg, checkpoint)
    new = evaluate(model, cfg)
    base = evaluate(model, setting.base_cfg) if setting.base_cfg is not None else None
    return dict(
        new_task=metric_value(new, key),
        base_task=metric_value(base, base_key) if base is not None else None,
        base_identical=None,
        first_difference=None,
        exactness_checked_on=None,
    )


def _batches(cfg: Config, n: int) -> list:
    loader_cfg = copy.deepcopy(cfg.test_dataloader)
    loader_cfg.batch_size = 1
    loader_cfg.num_workers = 0
    loader_cfg.persistent_workers = False
    loader = Runner.build_dataloader(loader_cfg, seed=0)
    batches = []
    for batch in loader:
        if len(batches) == n:
            break
        batches.append(batch)
    return batches


def _latency(base_model, patched, batches, options: Options) -> dict:
    models = {"base": base_model, "unmerged": patched}
    try:
        models["merged"] = merge_patch(patched).eval()
    except ValueError:
        pass  # a patch that cannot be merged (BlockDelta): no merged figure
    seconds = inference_latency(models, batches, options.latency_repeats)
    return dict(
        base_seconds=seconds["base"],
        unmerged_seconds=seconds["unmerged"],
        merged_seconds=seconds.get("merged"),
        unmerged_ratio=seconds["unmerged"] / seconds["base"],
        merged_ratio=seconds["merged"] / seconds["base"] if "merged" in seconds else None,
    )


def _paint(setting: Setting, keys: tuple[str, str], ft_state: dict, log) -> list[dict]:
    key, base_key = keys
    model = init_base_model(setting.task_cfg, setting.checkpoint)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    points = []
    for alpha in ALPHAS:
        model.load_state_dict(interpolate(base_state, ft_state, alpha))
        new = metric_value(evaluate(model, setting.task_cfg), key)
        base = (
            metric_value(evaluate(model, setting.base_cfg), base_key)
            if setting.base_cfg is not None
            else None
        )
        points.append(dict(alpha=alpha, new_task=new, base_task=base))
        log(f"   PAINT α={alpha:.1f}: new task {new:.3f}, base task {_fmt(base)}")
    return points


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
