"""How much of the labelled patch's gain a label-free (AdaBN) patch recovers, on the main
job's appearance-shift task (``tools/label_free_gap.py``).

Uses what the demo (``tools/demo.py``) left (it never trains a base): the cached base
``<demo_out>/<task>/base/base.pth``, the labelled shift patch's score from
``<demo_out>/<task>/report.json`` and the generated data it names. Per task:

1. the base on its own test set (kept for the exactness check) and on the shifted test set;
2. for each ``max_images`` K: a label-free patch from the first K shifted *training*
   images, read without their labels (``mmdelta.label_free.adapt_norm_stats``), scored on
   the shifted test set; with the patch off, the base test set's predictions compared with
   the base's, bit for bit; the patch saved as ``<out>/<task>/adabn_<K>.safetensors``;
3. gap closed = (label-free − base) / (labelled − base) on the shifted test set.

Writes ``<out>/<task>/label_free_gap.json``; :func:`table` is the README's Markdown table.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from mmengine.config import Config

from ..apis import init_base_model
from ..evaluation import evaluate, first_difference
from ..label_free import adapt_norm_stats
from ..machine import describe_machine
from ..patching import delta_disabled, remove_patch, save_patch, set_active_patch
from .demo.preparation import LOADERS
from .demo.stories import STORIES


class DemoOutputMissing(FileNotFoundError):
    """What the demo leaves (its report, the cached base) is not there: run it first."""


def run_label_free_gap(
    tasks: Sequence[str], log: Callable[[str], None] = print, **options
) -> list[dict]:
    """Measures every task of ``tasks`` (:func:`measure`, given ``options``: its keyword
    arguments), then logs the table and the machine line; returns the per-task results."""
    start = time.perf_counter()
    results = [measure(task, log=log, **options) for task in tasks]
    log(table(results))
    log(
        f"({_now()}, {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, {time.perf_counter() - start:.0f} s)"
    )
    return results


def patch_off_identical(results: list[dict]) -> bool:
    """Whether every label-free patch, switched off, left the base's predictions as they were."""
    return all(run["patch_off_identical"] for r in results for run in r["runs"])


def train_images(cfg) -> list[Path]:
    """The image files of the config's training set, listed without reading any label:
    VOC layout (``ann_file`` ids -> ``JPEGImages``) or mmseg layout (``img_path`` folder)."""
    dataset = cfg.train_dataloader.dataset
    root = Path(dataset.data_root)
    if dataset.type.endswith("VOCDataset"):
        sub = root / dataset.data_prefix["sub_data_root"]
        ids = (root / dataset.ann_file).read_text().split()
        return [sub / "JPEGImages" / f"{i}.jpg" for i in ids]
    folder = root / dataset.data_prefix["img_path"]
    return sorted(folder.glob(f"*{dataset.get('img_suffix', '.jpg')}"))


def measure(
    task: str,
    max_images: Sequence[int],
    batch_size: int,
    demo_out: str | os.PathLike,
    configs: str | os.PathLike,
    out: str | os.PathLike,
    own_domain_check: bool = False,
    log=print,
) -> dict:
    """One task: the base, one label-free patch per ``max_images`` value and (optionally) the
    own-domain sanity check; writes and returns the task's record.

    Raises:
        DemoOutputMissing: the demo's report or cached base of ``task`` is missing.
    """
    story = STORIES[task]
    demo_out, configs, out = Path(demo_out), Path(configs), Path(out)
    report, checkpoint = _demo_record(task, demo_out)
    shifted = next(t for t in report["tasks"] if t["task"] == "shifted")
    labelled = shifted["new_task"]["patched"]
    base_cfg = _config(configs / story.base.config, report["data"]["base"])
    shift_cfg = _config(configs / story.base.config, report["data"]["shifted"])
    files = train_images(shift_cfg)

    model = init_base_model(base_cfg, str(checkpoint))
    base_eval = evaluate(model, base_cfg)
    base_shift = _metric(story, evaluate(model, shift_cfg))
    log(
        f"== {task}: base {story.metric_label} on its own test set {_metric(story, base_eval):.3f}"
        f", on the shifted test set {base_shift:.3f}; labelled patch {labelled:.3f} (report)"
    )
    scores = dict(base_eval=base_eval, base_shift=base_shift, labelled=labelled)
    runs = [
        _label_free_run(model, task, files, k, batch_size, (base_cfg, shift_cfg), scores, out, log)
        for k in max_images
    ]
    own = None
    if own_domain_check:
        own = _own_domain_check(model, task, base_cfg, max(max_images), batch_size, base_eval, log)
    result = dict(
        task=task,
        own_domain_check=own,
        metric=story.metric_label,
        date=_now(),
        machine=_machine(),
        base_checkpoint=str(checkpoint),
        base_own=_metric(story, base_eval),
        base_shifted=base_shift,
        labelled=labelled,
        labelled_patch=shifted["patch_file"],
        unlabelled_pool=len(files),
        test_images=len(base_eval.predictions),
        runs=runs,
    )
    (_mkdir(out / task) / "label_free_gap.json").write_text(json.dumps(result, indent=2))
    return result


def table(results: list[dict]) -> str:
    """The results as the README's Markdown table (one row per label-free patch)."""
    lines = [
        "| task | metric | base on shifted | label-free (AdaBN) | unlabelled images | labelled "
        "patch | gap closed | patch off == base | adapt time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for run in r["runs"]:
            lines.append(
                f"| {r['task']} | {r['metric']} | {r['base_shifted']:.3f} | "
                f"**{run['label_free']:.3f}** | {run['images']} | {r['labelled']:.3f} | "
                f"{run['gap_closed']:.1%} | {'yes' if run['patch_off_identical'] else 'NO'} | "
                f"{run['adapt_seconds']:.0f} s |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- steps


def _demo_record(task: str, demo_out: Path) -> tuple[dict, Path]:
    """The demo's report of ``task`` and its cached base checkpoint."""
    report_file = demo_out / task / "report.json"
    if not report_file.is_file():
        raise DemoOutputMissing(
            f"{report_file} does not exist: run `.venv/bin/python tools/demo.py --task {task}` "
            "first (it trains and caches the base and the labelled patch)"
        )
    report = json.loads(report_file.read_text())
    checkpoint = Path(report["base"]["checkpoint"])
    if not checkpoint.is_file():
        raise DemoOutputMissing(
            f"the cached base {checkpoint} is missing: run `.venv/bin/python tools/demo.py "
            f"--task {task}` first"
        )
    return report, checkpoint


def _label_free_run(model, task, files, k, batch_size, cfgs, scores, out, log) -> dict:
    """A label-free patch from the first ``k`` of ``files``: scored on the shifted test set,
    compared with the base when off, saved, then removed from ``model`` again."""
    story, (base_cfg, shift_cfg) = STORIES[task], cfgs
    name = f"adabn_{k}"
    start = time.perf_counter()
    adapt_norm_stats(model, files, name=name, cfg=shift_cfg, max_images=k, batch_size=batch_size)
    adapt_seconds = time.perf_counter() - start
    label_free = _metric(story, evaluate(model, shift_cfg))
    with delta_disabled(model):
        off = evaluate(model, base_cfg)
    difference = first_difference(scores["base_eval"].predictions, off.predictions)
    patch_file = save_patch(model, _mkdir(out / task) / f"{name}.safetensors", name, overwrite=True)
    base_shift = scores["base_shift"]
    gap = (label_free - base_shift) / (scores["labelled"] - base_shift)
    run = dict(
        images=min(k, len(files)),
        batch_size=batch_size,
        label_free=label_free,
        gap_closed=gap,
        adapt_seconds=adapt_seconds,
        patch_off_identical=difference is None,
        first_difference=difference,
        patch_off_metric=_metric(story, off),
        patch_file=str(patch_file),
        patch_bytes=patch_file.stat().st_size,
    )
    log(
        f"== {task}: label-free patch from {run['images']} unlabelled images "
        f"({adapt_seconds:.0f} s): {label_free:.3f} on the shifted test set, gap closed "
        f"{gap:.1%}; patch off identical to the base: {difference is None}"
    )
    set_active_patch(model, None)
    remove_patch(model, name)
    return run


def _own_domain_check(model, task, base_cfg, k, batch_size, base_eval, log) -> dict:
    """Sanity check of the statistics pass: a label-free patch from ``k`` of the base's own
    training images, scored on the base test set (it should about keep the base's score)."""
    story = STORIES[task]
    start = time.perf_counter()
    adapt_norm_stats(
        model,
        train_images(base_cfg),
        name="own",
        cfg=base_cfg,
        max_images=k,
        batch_size=batch_size,
    )
    seconds = time.perf_counter() - start
    own = dict(images=k, metric=_metric(story, evaluate(model, base_cfg)), seconds=seconds)
    log(
        f"== {task}: sanity: label-free patch from {k} of the base's own training images: "
        f"{own['metric']:.3f} on the base test set (base {_metric(story, base_eval):.3f})"
    )
    set_active_patch(model, None)
    remove_patch(model, "own")
    return own


def _config(path: Path, data_root: str) -> Config:
    cfg = Config.fromfile(str(path))
    cfg.merge_from_dict({f"{key}.dataset.data_root": data_root for key in LOADERS})
    return cfg


def _metric(story, evaluation) -> float:
    return float(evaluation.metrics[story.metric_key]) * story.metric_scale


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _machine() -> dict:
    """The record's machine fields (``cpus`` is the torch thread count here, as before)."""
    machine = describe_machine()
    return dict(
        platform=machine["platform"],
        cpus=machine["torch_threads"],
        python=machine["python"],
        torch=machine["torch"],
    )


# --------------------------------------------------------------------------- methods x shifts

#: the label-free shifts measured per method: the realistic one (fog, haze over the base's
#: scenes) and the demo's strong one (light shapes on coloured clutter)
SHIFTS = ("fog", "shifted")
METHODS = ("adabn", "self-training")
VALIDATION_IMAGES = 100  # the last training images of the new domain: for choices, not used


def shift_roots(task: str, shift: str, data_dir: Path, demo_data: Path) -> tuple[str, str]:
    """The generated base data (the demo's) and the ``shift`` data (seed 1, as the demo's
    shifted task; full size: 600 training, 120 test images); generated once, then cached."""
    from .demo.preparation import write_task_data
    from .demo.stories import SIZES

    story = STORIES[task]
    base_root = write_task_data(story, story.base, SIZES["full"], demo_data)
    size = SIZES["full"]
    shift_root = story.writer(
        data_dir / f"{task}_{shift}",
        story.base.classes,
        size.num_train,
        size.num_test,
        seed=1,
        style=shift,
        **story.data,
    )
    return base_root, shift_root


def labelled_patch(task: str, shift: str, shift_root: str, checkpoint: Path, out: Path, log):
    """The labelled reference patch on ``shift``: the demo's shifted-task recipe (config,
    iterations, lr) on the labelled training images; trained once, then cached."""
    from ..runner.cli import build_runner

    folder = out / task / shift / "labelled"
    patch = folder / "labelled.patch.safetensors"
    if patch.is_file():
        return patch, None
    story = STORIES[task]
    cfg = _config(Path("configs/demo") / story.tasks[0].config, shift_root)
    cfg.delta_patch["name"] = "labelled"
    cfg.load_from, cfg.work_dir = str(checkpoint), str(folder)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.train_cfg.val_interval = cfg.train_cfg.max_iters + 1
    cfg.visualizer.name = f"mmdelta-label-free-labelled-{task}-{shift}"
    log(f"== {task}/{shift}: training the labelled reference patch (cached afterwards)")
    start = time.perf_counter()
    build_runner(cfg).train()
    return patch, time.perf_counter() - start


def measure_shift(
    task: str,
    shift: str,
    methods: Sequence[str],
    out: str | os.PathLike,
    data_dir: str | os.PathLike = "data/label_free",
    demo_data: str | os.PathLike = "data/demo",
    demo_out: str | os.PathLike = "work_dirs/demo",
    rounds: int = 1,
    score_thr: float | None = None,
    max_iters: int | None = None,
    batch_size: int = 4,
    log=print,
) -> dict:
    """One task on one shift: the base, the labelled reference patch and one label-free patch
    per method; gap closed on the shift's test set, and every patch switched off compared
    with the base on the base's own test set, bit for bit. Writes and returns the record."""
    from ..label_free import LabelFreeError
    from ..label_free.self_training import (
        THRESHOLDS,
        choose_threshold,
        file_sha256,
        pseudo_label_quality,
        self_train,
        stats_records,
    )
    from ..patching import load_patch

    story = STORIES[task]
    out, data_dir, demo_data = Path(out), Path(data_dir), Path(demo_data)
    checkpoint = Path(demo_out) / task / "base" / "base.pth"
    if not checkpoint.is_file():
        raise DemoOutputMissing(
            f"the cached base {checkpoint} is missing: run `.venv/bin/python tools/demo.py "
            f"--task {task}` first"
        )
    base_sha = file_sha256(checkpoint)
    base_root, shift_root = shift_roots(task, shift, data_dir, demo_data)
    base_cfg = _config(Path("configs/demo") / story.base.config, base_root)
    shift_cfg = _config(Path("configs/demo") / story.base.config, shift_root)
    recipe = _config(Path("configs/demo") / story.tasks[0].config, shift_root)
    files = train_images(shift_cfg)
    pool = files[: len(files) - VALIDATION_IMAGES]

    model = init_base_model(base_cfg, str(checkpoint))
    base_eval = evaluate(model, base_cfg)
    base_shift = _metric(story, evaluate(model, shift_cfg))
    log(
        f"== {task}/{shift}: base {story.metric_label} {_metric(story, base_eval):.3f} on its "
        f"own test set, {base_shift:.3f} on the {shift} test set"
    )
    labelled_file, labelled_seconds = labelled_patch(task, shift, shift_root, checkpoint, out, log)

    def score(name: str, patch: str, seconds: float | None, extra: dict | None = None) -> dict:
        value = _metric(story, evaluate(model, shift_cfg))
        with delta_disabled(model):
            off = evaluate(model, base_cfg)
        difference = first_difference(base_eval.predictions, off.predictions)
        run = dict(
            method=name,
            score=value,
            seconds=seconds,
            patch_off_identical=difference is None,
            first_difference=difference,
            **(extra or {}),
        )
        log(f"== {task}/{shift}: {name}: {value:.3f}; patch off == base: {difference is None}")
        set_active_patch(model, None)
        remove_patch(model, patch)
        return run

    load_patch(model, labelled_file, name="labelled")
    labelled = score("labelled", "labelled", labelled_seconds, dict(patch_file=str(labelled_file)))
    runs, choice = [], None
    for method in methods:
        start = time.perf_counter()
        if method == "adabn":
            adapt_norm_stats(model, pool, name="adabn", cfg=shift_cfg, batch_size=batch_size)
            patch_file = save_patch(
                model, _mkdir(out / task / shift) / "adabn.safetensors", "adabn", overwrite=True
            )
            run = score(
                "adabn", "adabn", time.perf_counter() - start, dict(patch_file=str(patch_file))
            )
        elif method == "self-training":
            folder = out / task / shift / "self_training"
            if score_thr is None:  # chosen on the validation split, never on the test set
                adapt_norm_stats(model, pool, name="teacher", cfg=shift_cfg, batch_size=batch_size)
                choice = pseudo_label_quality(
                    model, shift_cfg, files[len(pool) :], THRESHOLDS[task], batch_size
                )
                set_active_patch(model, None)
                remove_patch(model, "teacher")
                score_thr = choose_threshold(choice)
                log(f"== {task}/{shift}: threshold {score_thr} chosen on validation: {choice}")
            settings = dict(rounds=rounds, score_thr=score_thr, max_iters=max_iters, pool=len(pool))
            cached = _cached_self_training(folder, settings)
            if cached is None:
                try:
                    patch_file, history = self_train(
                        recipe,
                        checkpoint,
                        pool,
                        folder,
                        name="self_training",
                        rounds=rounds,
                        score_thr=score_thr,
                        max_iters=max_iters,
                        batch_size=batch_size,
                        log=log,
                    )
                except LabelFreeError as err:  # nothing confident: no patch, the base's score
                    log(f"== {task}/{shift}: self-training: {err}")
                    runs.append(
                        dict(
                            threshold_choice=choice,
                            score_thr=score_thr,
                            method=method,
                            score=base_shift,
                            seconds=time.perf_counter() - start,
                            patch_off_identical=True,
                            gap_closed=0.0,
                            note=str(err),
                        )
                    )
                    continue
                seconds = time.perf_counter() - start
                record = dict(settings=settings, patch=str(patch_file), seconds=seconds)
                record["history"] = stats_records(history)
                (folder / "self_training.json").write_text(json.dumps(record, indent=2))
            else:
                log(f"== {task}/{shift}: self-training: cached {cached['patch']}")
                patch_file, seconds = Path(cached["patch"]), cached["seconds"]
                history = cached["history"]
            history = [h if isinstance(h, dict) else stats_records([h])[0] for h in history]
            load_patch(model, patch_file, name="self_training")
            run = score(
                "self-training",
                "self_training",
                seconds,
                dict(
                    patch_file=str(patch_file),
                    rounds=history,
                    score_thr=score_thr,
                    threshold_choice=choice,
                ),
            )
        else:
            raise ValueError(f"unknown method {method!r}; methods: {METHODS}")
        run["gap_closed"] = (run["score"] - base_shift) / (labelled["score"] - base_shift)
        log(f"== {task}/{shift}: {method}: gap closed {run['gap_closed']:.1%}")
        runs.append(run)
    if file_sha256(checkpoint) != base_sha:
        raise RuntimeError(f"the base checkpoint {checkpoint} changed")  # a bug
    result = dict(
        task=task,
        shift=shift,
        metric=story.metric_label,
        date=_now(),
        machine=_machine(),
        base_checkpoint=str(checkpoint),
        base_sha256=base_sha,
        base_own=_metric(story, base_eval),
        base_shifted=base_shift,
        labelled=labelled,
        unlabelled_pool=len(pool),
        validation_images=len(files) - len(pool),
        test_images=len(base_eval.predictions),
        runs=runs,
    )
    (_mkdir(out / task / shift) / "label_free_methods.json").write_text(
        json.dumps(result, indent=2)
    )
    return result


def _method_cell(run: dict) -> str:
    if run.get("note"):
        return f"{run['method']} (no confident pseudo-label: no patch)"
    if run["method"] == "self-training":
        return f"self-training (thr {run['score_thr']}, {len(run['rounds'])} round)"
    return run["method"]


def _cached_self_training(folder: Path, settings: dict) -> dict | None:
    """The recorded self-training run in ``folder`` if it used the same ``settings``."""
    record_file = folder / "self_training.json"
    if not record_file.is_file():
        return None
    record = json.loads(record_file.read_text())
    if record.get("settings") != settings or not Path(record["patch"]).is_file():
        return None
    return record


def methods_table(results: list[dict]) -> str:
    """The README's table: one row per task, shift and label-free method."""
    lines = [
        "| task | shift | metric | base (own domain) | base on shift | method | label-free | "
        "labelled patch | gap closed | patch off == base | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for run in r["runs"]:
            lines.append(
                f"| {r['task']} | {r['shift']} | {r['metric']} | {r['base_own']:.3f} | "
                f"{r['base_shifted']:.3f} | {_method_cell(run)} | **{run['score']:.3f}** | "
                f"{r['labelled']['score']:.3f} | {run['gap_closed']:.1%} | "
                f"{'yes' if run['patch_off_identical'] else 'NO'} | {run['seconds']:.0f} s |"
            )
    return "\n".join(lines)
