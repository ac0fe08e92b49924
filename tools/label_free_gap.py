"""How much of the labelled patch's gain a label-free (AdaBN) patch recovers, on the main job's
appearance-shift task.

    .venv/bin/python tools/label_free_gap.py [--task det seg] [--max-images 64 600]
        [--batch-size 4] [--demo-out work_dirs/demo] [--out work_dirs/label_free]

Uses what ``tools/demo.py`` left (it never trains a base): the cached base
``<demo-out>/<task>/base/base.pth``, the labelled shift patch's score from
``<demo-out>/<task>/report.json`` and the generated data it names. Per task:

1. the base on its own test set (kept for the exactness check) and on the shifted test set;
2. for each ``--max-images`` K: a label-free patch from the first K shifted *training*
   images, read without their labels (``mmdelta.label_free.adapt_norm_stats``), scored on
   the shifted test set; with the patch off, the base test set's predictions compared with
   the base's, bit for bit; the patch saved as ``<out>/<task>/adabn_<K>.safetensors``;
3. gap closed = (label-free − base) / (labelled − base) on the shifted test set.

Writes ``<out>/<task>/label_free_gap.json`` and prints a Markdown table (the README's).
"""

import argparse
import datetime
import json
import platform
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

import torch
from mmengine.config import Config

from mmdelta import delta_disabled, remove_patch, save_patch, set_active_patch
from mmdelta.apis import init_base_model
from mmdelta.apps.demo.stories import STORIES
from mmdelta.evaluation import evaluate, first_difference
from mmdelta.label_free import adapt_norm_stats

ROOT = Path(__file__).resolve().parent.parent
LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", nargs="+", choices=sorted(STORIES), default=["det", "seg"])
    parser.add_argument(
        "--max-images",
        nargs="+",
        type=int,
        default=[600],
        help="unlabelled images per label-free patch (one patch per value; default 600 = all)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--own-domain-check",
        action="store_true",
        help="also adapt on the base's own training images (as many as the largest "
        "--max-images) and score on the base test set: a sanity check of the statistics "
        "pass (it should about keep the base's score)",
    )
    parser.add_argument("--demo-out", default=str(ROOT / "work_dirs/demo"))
    parser.add_argument("--configs", default=str(ROOT / "configs/demo"))
    parser.add_argument("--out", default=str(ROOT / "work_dirs/label_free"))
    return parser.parse_args(argv)


def _config(path: Path, data_root: str) -> Config:
    cfg = Config.fromfile(str(path))
    cfg.merge_from_dict({f"{key}.dataset.data_root": data_root for key in LOADERS})
    return cfg


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


def _metric(story, evaluation) -> float:
    return float(evaluation.metrics[story.metric_key]) * story.metric_scale


def measure(
    task: str,
    max_images: list[int],
    batch_size: int,
    demo_out: Path,
    configs: Path,
    out: Path,
    own_domain_check: bool = False,
    log=print,
) -> dict:
    story = STORIES[task]
    report_file = demo_out / task / "report.json"
    if not report_file.is_file():
        raise SystemExit(
            f"{report_file} does not exist: run `.venv/bin/python tools/demo.py --task {task}` "
            "first (it trains and caches the base and the labelled patch)"
        )
    report = json.loads(report_file.read_text())
    checkpoint = Path(report["base"]["checkpoint"])
    if not checkpoint.is_file():
        raise SystemExit(
            f"the cached base {checkpoint} is missing: run `.venv/bin/python tools/demo.py "
            f"--task {task}` first"
        )
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
    runs = []
    for k in max_images:
        name = f"adabn_{k}"
        start = time.perf_counter()
        adapt_norm_stats(
            model, files, name=name, cfg=shift_cfg, max_images=k, batch_size=batch_size
        )
        adapt_seconds = time.perf_counter() - start
        label_free = _metric(story, evaluate(model, shift_cfg))
        with delta_disabled(model):
            off = evaluate(model, base_cfg)
        difference = first_difference(base_eval.predictions, off.predictions)
        patch_file = save_patch(
            model, _mkdir(out / task) / f"{name}.safetensors", name, overwrite=True
        )
        gap = (label_free - base_shift) / (labelled - base_shift)
        runs.append(
            dict(
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
        )
        log(
            f"== {task}: label-free patch from {runs[-1]['images']} unlabelled images "
            f"({adapt_seconds:.0f} s): {label_free:.3f} on the shifted test set, gap closed "
            f"{gap:.1%}; patch off identical to the base: {difference is None}"
        )
        set_active_patch(model, None)
        remove_patch(model, name)
    own = None
    if own_domain_check:
        k = max(max_images)
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


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _machine() -> dict:
    return dict(
        platform=platform.platform(),
        cpus=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
    )


def table(results: list[dict]) -> str:
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


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    results = [
        measure(
            task,
            args.max_images,
            args.batch_size,
            Path(args.demo_out),
            Path(args.configs),
            Path(args.out),
            args.own_domain_check,
        )
        for task in args.task
    ]
    print(table(results))
    print(
        f"({_now()}, {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, {time.perf_counter() - start:.0f} s)"
    )
    ok = all(run["patch_off_identical"] for r in results for run in r["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
