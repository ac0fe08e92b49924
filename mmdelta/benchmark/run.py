"""The benchmark: train every method on one task from one base, score, cost, interpolate.

Output folder (``out``)::

    methods/<id>/               each method's training run (mmengine logs), its patch file
                                (or full_ft.pth) and config.py (what the cost runs train)
    benchmark.json              every number (fields: :data:`~.report.METHOD_FIELDS` …)
    benchmark.md, tradeoff.png  the tables and the base-task vs new-task plot

Scores: *new task* = the method's model on the task's test set; *base task* = the model as
it would serve the base's own test set — Δ methods with their patch **off** (and checked
prediction by prediction to equal the base's), full fine-tuning and PAINT as they are.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.runner import Runner

from ..apis import init_base_model, init_patched_model
from ..demo.evaluate import Evaluation, evaluate, first_difference
from ..fileio import write_atomic
from ..patching import delta_disabled, merge_patch
from ..runner.checkpoint import mmengine_checkpoints
from ..runner.cli import build_runner
from .costs import inference_latency, training_costs
from .methods import BenchmarkError, Method, comparison_methods, method_config
from .paint import ALPHAS, interpolate
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


#: full fine-tuning's lrs (the best on the new task is kept) when it runs the Δ config's
#: optimiser and schedule; on the embedded shift task 1e-4 / 3e-4 gave 0.779 / 0.871 mAP
DEFAULT_FT_LRS = (1e-4, 3e-4, 1e-3)


@dataclass
class Options:
    #: full fine-tuning's lrs, each trained, the best kept; None: the --finetune-config's
    #: own lr, else DEFAULT_FT_LRS
    ft_lrs: tuple[float, ...] | None = None
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


def metric_value(evaluation: Evaluation, key: str) -> float:
    if key not in evaluation.metrics:
        raise BenchmarkError(
            f"the evaluator returned {sorted(evaluation.metrics)}, not {key!r}: pass --metric"
        )
    value = float(evaluation.metrics[key])
    return value / 100 if key.split("/")[-1] in PERCENT_METRICS else value


def _pick_metric(evaluation: Evaluation) -> str:
    for key in KNOWN_METRICS:
        if key in evaluation.metrics:
            return key
    floats = [k for k, v in evaluation.metrics.items() if isinstance(v, (int, float))]
    if not floats:
        raise BenchmarkError(f"no numeric metric in {sorted(evaluation.metrics)}: pass --metric")
    return floats[0]


def run_benchmark(
    setting: Setting, out: str | os.PathLike, options: Options, log: Callable = print
) -> dict:
    """Runs the comparison and writes ``benchmark.json`` / ``.md`` / ``tradeoff.png``;
    returns the report."""
    out = Path(out)
    started = time.perf_counter()
    task_cfg, base_cfg = setting.task_cfg, setting.base_cfg
    if options.iterations:
        _set_iterations(task_cfg, options.iterations)
        if setting.finetune_cfg is not None:
            _set_iterations(setting.finetune_cfg, options.iterations)

    base_model = init_base_model(base_cfg or task_cfg, setting.checkpoint)
    exact_cfg = base_cfg or task_cfg  # where patch-off predictions are compared with the base
    base_exact = evaluate(base_model, exact_cfg)
    base_on_new = evaluate(base_model, task_cfg) if setting.same_classes else None
    key = setting.metric_key or _pick_metric(base_on_new or base_exact)
    base_scores = dict(
        base_task=metric_value(base_exact, key) if base_cfg is not None else None,
        new_task=metric_value(base_on_new, key) if base_on_new is not None else None,
    )
    log(
        f"== base: base task {_fmt(base_scores['base_task'])}, new task "
        f"{_fmt(base_scores['new_task'])} ({key})"
    )

    ft_lrs = options.ft_lrs or ((None,) if setting.finetune_cfg is not None else DEFAULT_FT_LRS)
    methods = comparison_methods(
        task_cfg,
        base_model,
        ft_lrs[0],
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

    latency_batches = _batches(task_cfg, options.latency_images)
    rows, configs, ft_state, ft_sweep = [], {}, None, []
    for method in methods:
        if not method.is_patch:
            row, ft_state, ft_sweep, configs[method.id] = _full_ft(
                method, ft_lrs, setting, out, key, log
            )
            rows.append(row)
            continue
        log(f"== {method.id}: {method.label}")
        cfg = _method_cfg(setting, method, out)
        configs[method.id] = str(Path(cfg.work_dir) / "config.py")
        cfg.dump(configs[method.id])
        row = _train(method, cfg, setting)
        row.update(_score_patch(row, cfg, setting, exact_cfg, base_exact, key, base_model))
        row["latency"] = _latency(base_model, row.pop("_model"), latency_batches, options)
        log(
            f"   new task {row['new_task']:.3f}, base task {_fmt(row['base_task'])}, "
            f"identical with patch off: {row['base_identical']}, {row['train_seconds']:.0f} s"
        )
        rows.append(row)

    paint = []
    if options.paint and ft_state is not None and setting.same_classes:
        paint = _paint(setting, key, ft_state, log)

    costs = {}
    if options.cost_repeats > 0:
        log(f"== training cost: {len(configs)} methods × {options.cost_repeats} repeats")
        costs = training_costs(
            configs, options.cost_repeats, options.cost_steps, options.cost_warmup, log=log
        )
    report = assemble(
        setting=dict(
            name=setting.name,
            title=setting.title,
            metric=key,
            metric_label=setting.metric_label or key,
            checkpoint=setting.checkpoint,
            checkpoint_bytes=os.path.getsize(setting.checkpoint),
            task_config=task_cfg.filename,
            base_config=base_cfg.filename if base_cfg is not None else None,
            iterations=task_cfg.train_cfg.get("max_iters"),
            ft_lr=next((r["lr"] for r in rows if r["family"] == "full_ft"), None),
            ft_lr_sweep=ft_sweep,
            cost=dict(
                repeats=options.cost_repeats,
                steps=options.cost_steps,
                warmup=options.cost_warmup,
                latency_images=len(latency_batches),
                latency_repeats=options.latency_repeats,
            ),
        ),
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


# --------------------------------------------------------------------------- steps


def _set_iterations(cfg: Config, iters: int) -> None:
    loop = str(cfg.train_cfg.get("type", "")).split(".")[-1]
    if loop != "IterBasedTrainLoop":
        raise BenchmarkError(
            f"--iters needs an iteration-based schedule; {cfg.filename} trains with "
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


def _method_cfg(setting: Setting, method: Method, out: Path) -> Config:
    if not method.is_patch and setting.finetune_cfg is not None:
        cfg = copy.deepcopy(setting.finetune_cfg)
        if method.lr is not None:
            cfg.optim_wrapper.optimizer.lr = method.lr
    else:
        cfg = method_config(setting.task_cfg, method)
    cfg.load_from = setting.checkpoint
    cfg.work_dir = str(out / "methods" / method.id)
    cfg.visualizer.name = f"mmdelta-benchmark-{method.id}-{uuid.uuid4().hex[:8]}"
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    return cfg


def _train(method: Method, cfg: Config, setting: Setting) -> dict:
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
        iterations=cfg.train_cfg.max_iters,
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
        params = sum(p.numel() for p in model.parameters())
        row.update(
            checkpoint=str(path),
            trained_params=params,
            delta_params=None,
            owned_params=None,
            delta_fraction=None,
            patch_fraction=1.0,
            stages=None,
            _state=state,
        )
    row["patch_bytes"] = os.path.getsize(row["checkpoint"])
    return row


def _full_ft(method: Method, lrs, setting: Setting, out: Path, key: str, log):
    """Full fine-tuning at each lr of ``lrs`` (None: the config's own); the best on the new
    task is the ``full_ft`` row. Returns (row, its state dict, the sweep, its config file)."""
    sweep, best = [], None
    for lr in lrs:
        variant = dataclasses.replace(method, lr=lr)
        if len(lrs) > 1:
            variant = dataclasses.replace(variant, id=f"full_ft_lr{lr:g}")
        log(f"== {variant.id}: {method.label}" + (f" (lr {lr:g})" if lr is not None else ""))
        cfg = _method_cfg(setting, variant, out)
        config_file = str(Path(cfg.work_dir) / "config.py")
        cfg.dump(config_file)
        row = _train(variant, cfg, setting)
        row.update(_score_full(cfg, row["checkpoint"], setting, key))
        row["latency"] = None
        log(f"   new task {row['new_task']:.3f}, base task {_fmt(row['base_task'])}")
        sweep.append(
            dict(
                lr=row["lr"],
                new_task=row["new_task"],
                base_task=row["base_task"],
                work_dir=row["work_dir"],
            )
        )
        if best is None or row["new_task"] > best[0]["new_task"]:
            if best is not None:
                best[0].pop("_state")
            best = (row, config_file)
        else:
            row.pop("_state")
    row, config_file = best
    state = row.pop("_state")
    row["id"] = method.id
    if len(lrs) > 1:
        row["label"] = f"{method.label} (lr {row['lr']:g}, best of {len(lrs)})"
    return row, state, sweep, config_file


def _score_patch(row, cfg, setting, exact_cfg, base_exact, key, base_model) -> dict:
    patched = init_patched_model(cfg, setting.checkpoint, patch=row["checkpoint"])
    new = evaluate(patched, cfg)
    with delta_disabled(patched):
        off = evaluate(patched, exact_cfg)
    difference = first_difference(base_exact.predictions, off.predictions)
    return dict(
        new_task=metric_value(new, key),
        base_task=metric_value(off, key) if setting.base_cfg is not None else None,
        base_identical=difference is None,
        first_difference=difference,
        exactness_checked_on="base task" if setting.base_cfg is not None else "new task",
        _model=patched,
    )


def _score_full(cfg, checkpoint, setting, key) -> dict:
    model = init_base_model(cfg, checkpoint)
    new = evaluate(model, cfg)
    base = evaluate(model, setting.base_cfg) if setting.base_cfg is not None else None
    return dict(
        new_task=metric_value(new, key),
        base_task=metric_value(base, key) if base is not None else None,
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


def _paint(setting: Setting, key: str, ft_state: dict, log) -> list[dict]:
    model = init_base_model(setting.task_cfg, setting.checkpoint)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    points = []
    for alpha in ALPHAS:
        model.load_state_dict(interpolate(base_state, ft_state, alpha))
        new = metric_value(evaluate(model, setting.task_cfg), key)
        base = (
            metric_value(evaluate(model, setting.base_cfg), key)
            if setting.base_cfg is not None
            else None
        )
        points.append(dict(alpha=alpha, new_task=new, base_task=base))
        log(f"   PAINT α={alpha:.1f}: new task {new:.3f}, base task {_fmt(base)}")
    return points


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
