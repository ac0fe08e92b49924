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
        f"({now()}, {platform.machine()}, {torch.get_num_threads()} threads, torch "
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
    base_cfg = config_on(configs / story.base.config, report["data"]["base"])
    shift_cfg = config_on(configs / story.base.config, report["data"]["shifted"])
    files = train_images(shift_cfg)

    model = init_base_model(base_cfg, str(checkpoint))
    base_eval = evaluate(model, base_cfg)
    base_shift = story_metric(story, evaluate(model, shift_cfg))
    log(
        f"== {task}: base {story.metric_label} on its own test set {story_metric(story, base_eval):.3f}"
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
        date=now(),
        machine=machine_record(),
        base_checkpoint=str(checkpoint),
        base_own=story_metric(story, base_eval),
        base_shifted=base_shift,
        labelled=labelled,
        labelled_patch=shifted["patch_file"],
        unlabelled_pool=len(files),
        test_images=len(base_eval.predictions),
        runs=runs,
    )
    (made_dir(out / task) / "label_free_gap.json").write_text(json.dumps(result, indent=2))
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
    label_free = story_metric(story, evaluate(model, shift_cfg))
    with delta_disabled(model):
        off = evaluate(model, base_cfg)
    difference = first_difference(scores["base_eval"].predictions, off.predictions)
    patch_file = save_patch(
        model, made_dir(out / task) / f"{name}.safetensors", name, overwrite=True
    )
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
        patch_off_metric=story_metric(story, off),
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
    own = dict(images=k, metric=story_metric(story, evaluate(model, base_cfg)), seconds=seconds)
    log(
        f"== {task}: sanity: label-free patch from {k} of the base's own training images: "
        f"{own['metric']:.3f} on the base test set (base {story_metric(story, base_eval):.3f})"
    )
    set_active_patch(model, None)
    remove_patch(model, "own")
    return own


def config_on(path: Path, data_root: str) -> Config:
    """The config file ``path`` with every loader's dataset reading ``data_root``."""
    cfg = Config.fromfile(str(path))
    cfg.merge_from_dict({f"{key}.dataset.data_root": data_root for key in LOADERS})
    return cfg


def story_metric(story, evaluation) -> float:
    """The story's metric from an :class:`~mmdelta.evaluation.Evaluation`, in [0, 1]."""
    return float(evaluation.metrics[story.metric_key]) * story.metric_scale


def made_dir(path: Path) -> Path:
    """``path``, created with its parents if missing."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def now() -> str:
    """The local time, ISO 8601 to the second (the records' ``date``)."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def machine_record() -> dict:
    """The record's machine fields (``cpus`` is the torch thread count here, as before)."""
    machine = describe_machine()
    return dict(
        platform=machine["platform"],
        cpus=machine["torch_threads"],
        python=machine["python"],
        torch=machine["torch"],
    )
