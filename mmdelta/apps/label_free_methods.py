"""Label-free methods compared per task and shift (``tools/label_free_gap.py --methods``).

For each task (``det``, ``seg``: the main job's stories) and shift (``fog``: the base's own
scenes through haze, the realistic case; ``shifted``: the demo's strong shift), from the
demo's cached base alone:

1. the base on its own test set (kept for the exactness checks) and on the shift's test set;
2. the labelled reference patch: the demo's shifted-task recipe (config, iterations, lr) on
   the shift's labelled training images; trained once, then cached;
3. one label-free patch per method from the shift's first 500 training images read without
   their labels (the last :data:`VALIDATION_IMAGES` form the labelled *validation split*):
   ``adabn`` (statistics), ``self-training`` (pseudo-labels; threshold chosen on the
   validation split), ``entropy`` (segmentation only; norm-only or the recipe's Δ patch,
   chosen on the validation split);
4. every patch scored on the validation split and the shift's test set, and switched off,
   compared with the base on the base's test set prediction by prediction, bit for bit;
   gap closed = (label-free − base) / (labelled − base) on the test set.

The method to use per task and shift is the one with the best *validation* score
(``chosen``), if it beats the base there (else ``None``: keep the base); the test set never
decides anything. Writes
``<out>/<task>/<shift>/label_free_methods.json``; :func:`methods_table` is the README's table.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from ..apis import init_base_model
from ..evaluation import evaluate, first_difference
from ..label_free import LabelFreeError, adapt_norm_stats
from ..label_free.entropy import TRAINABLE, minimise_entropy
from ..label_free.self_training import (
    THRESHOLDS,
    choose_threshold,
    pseudo_label_quality,
    self_train,
    stats_records,
)
from ..label_free.training_inputs import file_sha256, training_only
from ..patching import delta_disabled, load_patch, remove_patch, save_patch, set_active_patch
from .demo.stories import STORIES
from .label_free_gap import (
    DemoOutputMissing,
    config_on,
    machine_record,
    made_dir,
    now,
    story_metric,
    train_images,
)

#: the realistic shift (fog, haze over the base's scenes) and the demo's strong one (light
#: shapes on coloured clutter)
SHIFTS = ("fog", "shifted")
METHODS = ("adabn", "self-training", "entropy")
SEGMENTATION_ONLY = ("entropy",)
VALIDATION_IMAGES = 100  # the last training images of the new domain: for choices only


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


def validation_config(shift_cfg, files: Sequence[Path], folder: Path):
    """``shift_cfg`` whose test loader reads the labelled validation split ``files`` (training
    images of the shift, with their labels) through an id list written to ``folder``."""
    cfg = copy.deepcopy(shift_cfg)
    dataset = cfg.test_dataloader.dataset
    train = cfg.train_dataloader.dataset
    ids = made_dir(folder) / "validation.txt"
    ids.write_text("".join(f"{f.stem}\n" for f in files))
    dataset.pop("data_prefix", None)
    dataset.data_prefix = dict(train.data_prefix)
    dataset.ann_file = str(ids.resolve())
    return cfg


def labelled_patch(task: str, shift: str, shift_root: str, checkpoint: Path, out: Path, log):
    """The labelled reference patch on ``shift``: the demo's shifted-task recipe (config,
    iterations, lr) on the labelled training images; trained once, then cached."""
    from ..runner.cli import build_runner

    folder = out / task / shift / "labelled"
    patch = folder / "labelled.patch.safetensors"
    if patch.is_file():
        return patch, None
    story = STORIES[task]
    cfg = config_on(Path("configs/demo") / story.tasks[0].config, shift_root)
    cfg.delta_patch["name"] = "labelled"
    cfg.load_from, cfg.work_dir = str(checkpoint), str(folder)
    training_only(cfg, None, f"mmdelta-label-free-labelled-{task}-{shift}")
    log(f"== {task}/{shift}: training the labelled reference patch (cached afterwards)")
    start = time.perf_counter()
    build_runner(cfg).train()
    return patch, time.perf_counter() - start


def _cached(record_file: Path, settings: dict) -> dict | None:
    """The recorded run in ``record_file`` if it used the same ``settings``."""
    if not record_file.is_file():
        return None
    record = json.loads(record_file.read_text())
    if record.get("settings") != settings or not Path(record["patch"]).is_file():
        return None
    return record


class _Bench:
    """One task on one shift: the model (the base, patches loaded in turn) and its scores."""

    def __init__(self, task, shift, out, data_dir, demo_data, demo_out, batch_size, log):
        self.task, self.shift, self.log = task, shift, log
        self.story = story = STORIES[task]
        self.out, self.batch_size = Path(out), batch_size
        self.checkpoint = Path(demo_out) / task / "base" / "base.pth"
        if not self.checkpoint.is_file():
            raise DemoOutputMissing(
                f"the cached base {self.checkpoint} is missing: run `.venv/bin/python "
                f"tools/demo.py --task {task}` first"
            )
        self.base_sha = file_sha256(self.checkpoint)
        base_root, self.shift_root = shift_roots(task, shift, Path(data_dir), Path(demo_data))
        configs = Path("configs/demo")
        self.base_cfg = config_on(configs / story.base.config, base_root)
        self.shift_cfg = config_on(configs / story.base.config, self.shift_root)
        self.recipe = config_on(configs / story.tasks[0].config, self.shift_root)
        files = train_images(self.shift_cfg)
        self.pool = files[: len(files) - VALIDATION_IMAGES]
        self.validation = files[len(self.pool) :]
        self.folder = made_dir(self.out / task / shift)
        self.val_cfg = validation_config(self.shift_cfg, self.validation, self.folder)
        self.model = init_base_model(self.base_cfg, str(self.checkpoint))
        self.base_eval = evaluate(self.model, self.base_cfg)
        self.base_shift = self.metric(self.shift_cfg)
        self.base_validation = self.metric(self.val_cfg)
        log(
            f"== {task}/{shift}: base {story.metric_label} {self.metric_of(self.base_eval):.3f} "
            f"on its own test set, {self.base_shift:.3f} on the {shift} test set, "
            f"{self.base_validation:.3f} on its validation split"
        )

    def metric_of(self, evaluation) -> float:
        return story_metric(self.story, evaluation)

    def metric(self, cfg) -> float:
        return self.metric_of(evaluate(self.model, cfg))

    def score(self, method: str, patch_name: str, seconds, extra: dict | None = None) -> dict:
        """Scores the active patch ``patch_name`` (validation, test, and switched off against
        the base), then removes it."""
        value, validation = self.metric(self.shift_cfg), self.metric(self.val_cfg)
        with delta_disabled(self.model):
            off = evaluate(self.model, self.base_cfg)
        difference = first_difference(self.base_eval.predictions, off.predictions)
        self.log(
            f"== {self.task}/{self.shift}: {method}: {value:.3f} (validation {validation:.3f}); "
            f"patch off == base: {difference is None}"
        )
        set_active_patch(self.model, None)
        remove_patch(self.model, patch_name)
        return dict(
            method=method,
            score=value,
            validation=validation,
            seconds=seconds,
            patch_off_identical=difference is None,
            first_difference=difference,
            **(extra or {}),
        )

    # ----------------------------------------------------------------------- methods

    def adabn(self) -> dict:
        start = time.perf_counter()
        adapt_norm_stats(
            self.model, self.pool, name="adabn", cfg=self.shift_cfg, batch_size=self.batch_size
        )
        patch = save_patch(self.model, self.folder / "adabn.safetensors", "adabn", overwrite=True)
        return self.score(
            "adabn", "adabn", time.perf_counter() - start, dict(patch_file=str(patch))
        )

    def self_training(self, rounds: int, score_thr: float | None, max_iters: int | None) -> dict:
        start, choice = time.perf_counter(), None
        if score_thr is None:  # chosen on the validation split, never on the test set
            adapt_norm_stats(
                self.model,
                self.pool,
                name="teacher",
                cfg=self.shift_cfg,
                batch_size=self.batch_size,
            )
            choice = pseudo_label_quality(
                self.model, self.shift_cfg, self.validation, THRESHOLDS[self.task], self.batch_size
            )
            set_active_patch(self.model, None)
            remove_patch(self.model, "teacher")
            score_thr = choose_threshold(choice)
            self.log(f"== {self.task}/{self.shift}: threshold {score_thr} chosen on validation")
        folder = self.folder / "self_training"
        settings = dict(
            rounds=rounds, score_thr=score_thr, max_iters=max_iters, pool=len(self.pool)
        )
        record = _cached(folder / "self_training.json", settings)
        if record is None:
            try:
                patch, history = self_train(
                    self.recipe,
                    self.checkpoint,
                    self.pool,
                    folder,
                    name="self_training",
                    rounds=rounds,
                    score_thr=score_thr,
                    max_iters=max_iters,
                    batch_size=self.batch_size,
                    log=self.log,
                )
            except LabelFreeError as err:  # nothing confident: no patch, the base's score
                self.log(f"== {self.task}/{self.shift}: self-training: {err}")
                return dict(
                    method="self-training",
                    score=self.base_shift,
                    validation=self.base_validation,
                    seconds=time.perf_counter() - start,
                    patch_off_identical=True,
                    score_thr=score_thr,
                    threshold_choice=choice,
                    note=str(err),
                )
            record = dict(
                settings=settings,
                patch=str(patch),
                seconds=time.perf_counter() - start,
                history=stats_records(history),
            )
            (folder / "self_training.json").write_text(json.dumps(record, indent=2))
        load_patch(self.model, record["patch"], name="self_training")
        return self.score(
            "self-training",
            "self_training",
            record["seconds"],
            dict(
                patch_file=record["patch"],
                rounds=record["history"],
                score_thr=score_thr,
                threshold_choice=choice,
            ),
        )

    def entropy(self, max_iters: int | None) -> dict:
        """Both trainable sets (norm-only, the recipe's patch); the one with the better
        validation score is the method's result, the other is kept as a candidate."""
        candidates = []
        for trainable in TRAINABLE:
            folder = self.folder / f"entropy_{trainable}"
            settings = dict(trainable=trainable, max_iters=max_iters, pool=len(self.pool))
            record = _cached(folder / "entropy.json", settings)
            if record is None:
                start = time.perf_counter()
                patch, stats = minimise_entropy(
                    self.recipe,
                    self.checkpoint,
                    self.pool,
                    folder,
                    name="entropy",
                    trainable=trainable,
                    max_iters=max_iters,
                    batch_size=self.batch_size,
                    log=self.log,
                )
                record = dict(
                    settings=settings,
                    patch=str(patch),
                    seconds=time.perf_counter() - start,
                    stats=stats.__dict__,
                )
                (folder / "entropy.json").write_text(json.dumps(record, indent=2))
            load_patch(self.model, record["patch"], name="entropy")
            candidates.append(
                self.score(
                    f"entropy ({trainable})",
                    "entropy",
                    record["seconds"],
                    dict(patch_file=record["patch"], trainable=trainable, stats=record["stats"]),
                )
            )
        best = max(candidates, key=lambda c: c["validation"])
        return dict(best, method="entropy", candidates=candidates)


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
    """One task on one shift (module docstring). Writes and returns the record."""
    bench = _Bench(task, shift, out, data_dir, demo_data, demo_out, batch_size, log)
    labelled_file, labelled_seconds = labelled_patch(
        task, shift, bench.shift_root, bench.checkpoint, bench.out, log
    )
    load_patch(bench.model, labelled_file, name="labelled")
    labelled = bench.score(
        "labelled", "labelled", labelled_seconds, dict(patch_file=str(labelled_file))
    )
    runs = []
    for method in methods:
        if method in SEGMENTATION_ONLY and task != "seg":
            log(f"== {task}/{shift}: {method}: segmentation only, skipped")
            continue
        if method == "adabn":
            run = bench.adabn()
        elif method == "self-training":
            run = bench.self_training(rounds, score_thr, max_iters)
        elif method == "entropy":
            run = bench.entropy(max_iters)
        else:
            raise ValueError(f"unknown method {method!r}; methods: {METHODS}")
        run["gap_closed"] = (run["score"] - bench.base_shift) / (
            labelled["score"] - bench.base_shift
        )
        log(f"== {task}/{shift}: {method}: gap closed {run['gap_closed']:.1%}")
        runs.append(run)
    if file_sha256(bench.checkpoint) != bench.base_sha:
        raise RuntimeError(f"the base checkpoint {bench.checkpoint} changed")  # a bug
    best = max(runs, key=lambda r: r["validation"], default=None)
    # a method is chosen only if it beats the base on validation; else keep the base
    chosen = best["method"] if best and best["validation"] > bench.base_validation else None
    log(f"== {task}/{shift}: chosen on the validation split: {chosen or 'the base (no patch)'}")
    result = dict(
        task=task,
        shift=shift,
        metric=bench.story.metric_label,
        date=now(),
        machine=machine_record(),
        base_checkpoint=str(bench.checkpoint),
        base_sha256=bench.base_sha,
        base_own=bench.metric_of(bench.base_eval),
        base_shifted=bench.base_shift,
        base_validation=bench.base_validation,
        labelled=labelled,
        unlabelled_pool=len(bench.pool),
        validation_images=len(bench.validation),
        test_images=len(bench.base_eval.predictions),
        runs=runs,
        chosen=chosen,
    )
    (bench.folder / "label_free_methods.json").write_text(json.dumps(result, indent=2))
    return result


def _method_cell(run: dict) -> str:
    if run.get("note"):
        return f"{run['method']} (no confident pseudo-label: no patch)"
    if run["method"] == "self-training":
        return f"self-training (thr {run['score_thr']}, {len(run['rounds'])} round)"
    if run["method"] == "entropy":
        return f"entropy ({run['trainable']})"
    return run["method"]


def methods_table(results: list[dict]) -> str:
    """The README's table: one row per task, shift and label-free method; the method chosen
    on the validation split in bold."""
    lines = [
        "| task | shift | base (own domain) | base on shift | method | validation | "
        "label-free | labelled patch | gap closed | patch off == base | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for run in r["runs"]:
            chosen = run["method"] == r["chosen"]
            cell = f"**{run['score']:.3f}**" if chosen else f"{run['score']:.3f}"
            method = _method_cell(run) + (" ← chosen" if chosen else "")
            lines.append(
                f"| {r['task']}, {r['metric']} | {r['shift']} | {r['base_own']:.3f} | "
                f"{r['base_shifted']:.3f} | {method} | {run['validation']:.3f} | {cell} | "
                f"{r['labelled']['score']:.3f} | {run['gap_closed']:.1%} | "
                f"{'yes' if run['patch_off_identical'] else 'NO'} | {run['seconds']:.0f} s |"
            )
    return "\n".join(lines)
