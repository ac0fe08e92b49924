"""The benchmark's protocol without training: the validation split (deterministic, disjoint
from the fit part and the test set, independent of order, filtering and wrappers), the lr
chosen on validation only, the equal wall-clock arithmetic, patch sizes against the model's
weights and the report's new fields (tables, frontier plot)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import BaseDataset, ConcatDataset, RepeatDataset
from torch import nn

from mmdelta.apps.benchmark import BenchmarkError, Method
from mmdelta.apps.benchmark import run as bench
from mmdelta.apps.benchmark.protocol import (
    as_test_dataset,
    check_split,
    choose,
    equal_time_iterations,
    lr_grid,
    model_bytes,
    val_evaluator,
    val_split,
)
from mmdelta.apps.benchmark.report import METHOD_FIELDS, PAINT_FIELDS, TARGETS, assemble, rerender
from mmdelta.apps.demo.stories import STORIES
from mmdelta.datasets import TrainValSplit, image_key, in_validation, write_voc_dataset

ROOT = Path(__file__).resolve().parents[1]
DEMO_SHIFT = ROOT / "configs/demo/det_shapes_shifted.py"


# --------------------------------------------------------------------------- the split


class Images(BaseDataset):
    """An mmengine dataset of image paths only (no files read)."""

    def __init__(self, names, data_root="/data/x", **kwargs):
        self._names = list(names)
        super().__init__(data_root=data_root, serialize_data=False, **kwargs)

    def load_data_list(self):
        return [dict(img_path=f"{self.data_root}/img/{n}.jpg", n=n) for n in self._names]


NAMES = [f"{i:04d}" for i in range(400)]


def _val(dataset) -> set[str]:
    split = TrainValSplit(dataset, part="val", val_fraction=0.2, seed=3)
    return {split.get_data_info(i)["n"] for i in range(len(split))}


def test_split_is_deterministic_disjoint_complete_and_near_its_fraction():
    fit = TrainValSplit(Images(NAMES), part="fit", val_fraction=0.2, seed=3)
    val = TrainValSplit(Images(NAMES), part="val", val_fraction=0.2, seed=3)
    fit_names = {fit.get_data_info(i)["n"] for i in range(len(fit))}
    val_names = {val.get_data_info(i)["n"] for i in range(len(val))}
    assert not fit_names & val_names and fit_names | val_names == set(NAMES)
    assert 0.14 < len(val_names) / len(NAMES) < 0.26
    assert val_names == _val(Images(NAMES))  # the same again
    assert fit[0]["n"] == fit.get_data_info(0)["n"] and fit.metainfo == Images(NAMES).metainfo
    # another seed, another split; the membership rule is the documented hash
    assert _val(Images(NAMES)) != {
        Images(NAMES).get_data_info(i)["n"]
        for i in range(400)
        if in_validation(f"img/{NAMES[i]}.jpg", 0.2, seed=4)
    }
    assert val_names == {n for n in NAMES if in_validation(f"img/{n}.jpg", 0.2, seed=3)}


def test_split_ignores_order_filtering_wrappers_and_the_data_location():
    every = _val(Images(NAMES))
    assert _val(Images(reversed(NAMES))) == every
    kept = NAMES[::3]  # a dataset that drops images (mmdet's filter_empty_gt in train mode)
    assert _val(Images(kept)) == every & set(kept)
    assert _val(RepeatDataset(Images(NAMES), times=3)) == every
    halves = ConcatDataset([Images(NAMES[:150]), Images(NAMES[150:])])
    assert _val(halves) == every
    assert _val(Images(NAMES, data_root="/elsewhere/y")) == every  # keyed relative to data_root
    assert image_key("/d/r/img/a.jpg", "/d/r") == "img/a.jpg"
    assert image_key("/other/a.jpg", "/d/r") == "/other/a.jpg"
    repeated = TrainValSplit(RepeatDataset(Images(NAMES), times=2), part="val", val_fraction=0.2)
    assert len(repeated.image_paths()) * 2 == len(repeated)  # each image once


def test_split_refuses_bad_arguments():
    with pytest.raises(ValueError, match="part"):
        TrainValSplit(Images(NAMES), part="test")
    with pytest.raises(ValueError, match="val_fraction"):
        TrainValSplit(Images(NAMES), val_fraction=1.0)


def test_val_configs_use_the_test_pipeline_in_test_mode_through_wrappers():
    train = dict(type="VOCDataset", pipeline=["train"], filter_cfg=dict(filter_empty_gt=True))
    assert as_test_dataset(dict(type="RepeatDataset", times=3, dataset=train), ["test"]) == dict(
        train, pipeline=["test"], test_mode=True
    )
    concat = as_test_dataset(dict(type="ConcatDataset", datasets=[train, train]), ["test"])
    assert [d["pipeline"] for d in concat["datasets"]] == [["test"], ["test"]]
    assert all(d["test_mode"] for d in concat["datasets"])
    # mmdet's XML datasets refuse bbox_min_size in test mode (voc0712.py sets it for training)
    voc = as_test_dataset(dict(train, filter_cfg=dict(min_size=32, bbox_min_size=32)), ["t"])
    assert voc["filter_cfg"] == dict(min_size=32) and voc["test_mode"]
    coco = dict(type="CocoMetric", ann_file="a.json", metric="bbox")
    assert val_evaluator(coco)["ann_file"] is None and coco["ann_file"] == "a.json"
    assert val_evaluator([dict(type="VOCMetric")]) == [dict(type="VOCMetric")]


@pytest.fixture(scope="module")
def demo_cfg(tmp_path_factory):
    """The embedded det shift task's config on tiny generated data (20 train, 6 test)."""
    story = STORIES["det"]
    task = next(t for t in story.tasks if t.same_classes)
    root = write_voc_dataset(
        tmp_path_factory.mktemp("voc") / "shifted",
        task.classes,
        20,
        6,
        seed=task.seed,
        style=task.style,
        **story.data,
    )
    cfg = Config.fromfile(str(DEMO_SHIFT))
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[key].dataset.data_root = root
    return cfg


def test_demo_data_split_is_disjoint_from_the_fit_part_and_the_test_set(demo_cfg):
    split = check_split(demo_cfg, val_split(demo_cfg, 0.3, seed=0), "demo")
    assert split.images["fit"] + split.images["val"] == 20 and split.images["test"] == 6
    assert len(split.val_paths) == split.images["val"] > 0
    loader = split.val_dataloader
    assert loader["dataset"]["part"] == "val" and loader["dataset"]["dataset"]["test_mode"]
    assert loader["dataset"]["dataset"]["pipeline"] == demo_cfg.test_dataloader.dataset.pipeline
    assert split.fit_dataset["dataset"] == demo_cfg.train_dataloader.dataset
    again = check_split(demo_cfg, val_split(demo_cfg, 0.3, seed=0), "demo")
    assert again.val_paths == split.val_paths
    # fit ∩ val = ∅ and val ∩ test = ∅ on the built datasets
    from mmdelta.apps.benchmark.protocol import _build, _paths

    fit = set(_build(split.fit_dataset, "mmdet").image_paths())
    test = set(_paths(_build(demo_cfg.test_dataloader.dataset, "mmdet")))
    assert not fit & set(split.val_paths) and not test & set(split.val_paths)
    assert len(fit) == split.images["fit"]


def test_a_val_image_in_the_test_set_stops_the_benchmark(demo_cfg):
    leaky = copy.deepcopy(demo_cfg)
    leaky.test_dataloader.dataset.ann_file = leaky.train_dataloader.dataset.ann_file
    with pytest.raises(BenchmarkError, match=r"leaky\.py.*also in the test set"):
        check_split(leaky, val_split(leaky, 0.3), "leaky.py")
    with pytest.raises(BenchmarkError, match="empty: change --val-fraction"):
        check_split(demo_cfg, val_split(demo_cfg, 1e-9), "demo")


def test_a_method_config_trains_on_fit_and_validates_on_val_only_after_training(demo_cfg):
    split = val_split(demo_cfg, 0.3)
    setting = bench.Setting("s", "s", copy.deepcopy(demo_cfg), checkpoint="base.pth")
    ctx = bench.Context(setting, Path("/tmp/unused"), bench.Options(), "m", {"task": split})
    method = Method("delta", "delta", "Δ", dict(demo_cfg.delta_patch))
    cfg = bench._method_cfg(ctx, method, lr=1e-3, seed=1, tag="lr0.001")
    assert cfg.train_dataloader.dataset.type == "TrainValSplit"
    assert cfg.train_dataloader.dataset.part == "fit"
    assert cfg.val_dataloader.dataset.part == "val"
    assert cfg.test_dataloader == demo_cfg.test_dataloader  # the test set as it was
    assert cfg.train_cfg.val_begin > cfg.train_cfg.max_iters  # no validation while training
    assert cfg.randomness.seed == 1 and cfg.optim_wrapper.optimizer.lr == 1e-3
    assert "mmdelta.datasets.split" in cfg.custom_imports.imports
    Path(cfg.work_dir).rmdir()


# --------------------------------------------------------------------------- lr choice


def test_lr_grid_and_choice():
    assert lr_grid(5e-3, (0.33, 1, 3)) == (1.65e-3, 5e-3, 1.5e-2)
    assert lr_grid(1e-3, (1, 1.0)) == (1e-3,)
    runs = [dict(lr=1, val_metric=0.5), dict(lr=2, val_metric=0.7), dict(lr=3, val_metric=0.7)]
    assert choose(runs)["lr"] == 2  # ties: the earlier


def _fake_context(tmp_path, **options):
    cfg = Config(dict(optim_wrapper=dict(optimizer=dict(lr=1e-2))))
    setting = bench.Setting("s", "s", cfg, checkpoint="base.pth")
    return bench.Context(setting, tmp_path, bench.Options(**options), "m", {}, log=lambda *_: None)


def test_the_lr_is_chosen_on_validation_and_only_the_chosen_run_meets_the_test_set(
    tmp_path, monkeypatch
):
    """Validation prefers the middle lr, the test set would prefer the largest: the middle
    one is chosen, and the test set scores only runs at that lr."""
    val = {3.3e-3: 0.40, 1e-2: 0.60, 3e-2: 0.50}
    test = {3.3e-3: 0.10, 1e-2: 0.20, 3e-2: 0.90}
    trained, scored = [], []

    def train_run(method, ctx, lr, seed, tag, iterations=None):
        trained.append((lr, seed))
        return dict(
            id=method.id,
            family=method.family,
            lr=lr,
            seed=seed,
            iterations=10,
            val_metric=val[lr] + 0.01 * seed,
            train_seconds=1.0,
            work_dir=f"w/{tag}",
            checkpoint=f"{tag}.patch",
            base_task=None,
            _cfg=None,
        )

    def score_chosen(method, run, ctx):
        scored.append(("chosen", run["lr"], run["seed"]))
        return dict(new_task=test[run["lr"]], base_task=0.5, base_identical=True, latency=None)

    def new_task_score(method, run, ctx):
        scored.append(("seed", run["lr"], run["seed"]))
        return test[run["lr"]] + 0.02

    monkeypatch.setattr(bench, "train_run", train_run)
    monkeypatch.setattr(bench, "score_chosen", score_chosen)
    monkeypatch.setattr(bench, "new_task_score", new_task_score)
    ctx = _fake_context(tmp_path, lr_scales=(0.33, 1, 3))
    method = Method("delta", "delta", "Δ", dict(branch=None))
    row = bench.evaluate_method(method, ctx, seeds=3)
    assert row["lr"] == 1e-2 and row["val_metric"] == 0.60
    assert [p["lr"] for p in row["lr_sweep"]] == [3.3e-3, 1e-2, 3e-2]
    assert [p["val_metric"] for p in row["lr_sweep"]] == [0.40, 0.60, 0.50]
    assert trained == [(3.3e-3, 0), (1e-2, 0), (3e-2, 0), (1e-2, 1), (1e-2, 2)]
    assert scored == [("chosen", 1e-2, 0), ("seed", 1e-2, 1), ("seed", 1e-2, 2)]
    assert [s["seed"] for s in row["seeds"]] == [0, 1, 2]
    assert row["new_task_min"] == 0.20 and row["new_task_max"] == pytest.approx(0.22)
    assert row["new_task"] == pytest.approx((0.20 + 0.22 + 0.22) / 3)
    assert not any(k.startswith("_") for k in row)

    # full fine-tuning: its own grid (--ft-lr), chosen the same way
    trained.clear()
    scored.clear()
    ctx = _fake_context(tmp_path, ft_lrs=(3.3e-3, 3e-2))
    row = bench.evaluate_method(Method("full_ft", "full_ft", "full", None), ctx, seeds=1)
    assert row["lr"] == 3e-2 and trained == [(3.3e-3, 0), (3e-2, 0)]
    assert scored == [("chosen", 3e-2, 0)] and len(row["seeds"]) == 1


# --------------------------------------------------------------------------- equal time


def test_equal_time_iterations():
    assert equal_time_iterations(10, full_ft_step=0.2, step=0.1) == (20, False)
    assert equal_time_iterations(10, full_ft_step=0.1, step=0.2) == (5, False)  # slower
    assert equal_time_iterations(10, full_ft_step=1.0, step=0.1, cap=4) == (40, True)
    assert equal_time_iterations(2, full_ft_step=0.1, step=10.0) == (1, False)
    assert equal_time_iterations(3, full_ft_step=0.3, step=0.2) == (4, False)  # round(4.5)
    with pytest.raises(ValueError):
        equal_time_iterations(3, 0.0, 0.1)


def test_equal_time_run_scales_iterations_by_the_step_times(tmp_path, monkeypatch):
    cfg = Config(dict(train_cfg=dict(type="IterBasedTrainLoop", max_iters=10)))
    cfg.dump(str(tmp_path / "config.py"))
    calls = []

    def train_run(method, ctx, lr, seed, tag, iterations=None):
        calls.append((lr, seed, tag, iterations))
        return dict(val_metric=0.3, train_seconds=5.0, work_dir="w/eq", _cfg=None)

    monkeypatch.setattr(bench, "train_run", train_run)
    monkeypatch.setattr(bench, "new_task_score", lambda method, run, ctx: 0.77)
    ctx = _fake_context(tmp_path, equal_time_cap=4.0)
    row = dict(id="delta", lr=1e-3, iterations=10, config=str(tmp_path / "config.py"), seeds=[])
    row["seeds"] = [dict(seed=0, new_task=0.5)]
    full = dict(id="full_ft", iterations=10, seeds=[dict(seed=0, new_task=0.6)])
    costs = {"full_ft": dict(step_seconds=0.3), "delta": dict(step_seconds=0.1)}
    method = Method("delta", "delta", "Δ", {})
    eq = bench.equal_time_run(method, row, full, costs, ctx)
    assert calls == [(1e-3, 0, "equal_time", 30)]
    assert eq["iterations"] == 30 and eq["new_task"] == 0.77 and not eq["reused"]
    assert eq["step_ratio"] == pytest.approx(1 / 3) and eq["step_source"] == "cost runs"
    # without cost runs: the training runs' seconds per iteration
    row.update(train_step_seconds=0.5)
    full.update(train_step_seconds=0.5, config=row["config"], lr=1e-4)
    calls.clear()
    same = bench.equal_time_run(method, row, full, {}, ctx)
    assert calls == [] and same["reused"] and same["new_task"] == 0.5
    assert same["step_source"] == "training runs"
    own = bench.equal_time_run(Method("full_ft", "full_ft", "f", None), full, full, costs, ctx)
    assert own["iterations"] == 10 and own["new_task"] == 0.6 and calls == []


def test_schedule_stretched_for_equal_time():
    cfg = Config(
        dict(
            train_cfg=dict(type="IterBasedTrainLoop", max_iters=10, val_interval=10),
            default_hooks=dict(
                logger=dict(interval=5), checkpoint=dict(type="CheckpointHook", interval=10)
            ),
            param_scheduler=[dict(type="LinearLR", begin=0, end=2), dict(begin=0, end=10)],
        )
    )
    bench._scale_schedule(cfg, 30)
    assert cfg.train_cfg.max_iters == 30 and cfg.default_hooks.checkpoint.interval == 30
    assert [(s["begin"], s["end"]) for s in cfg.param_scheduler] == [(0, 6), (0, 30)]


# --------------------------------------------------------------------------- sizes, report


def test_model_bytes_counts_every_tensor_of_the_state_dict():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).half()
    # Linear 12 + 4, BN weight / bias / mean / var 4 each: 32 halves; num_batches_tracked int64
    assert model_bytes(model) == 32 * 2 + 8
    assert model_bytes(model.state_dict()) == model_bytes(model)
    assert model_bytes({"w": torch.zeros(10), "meta": "x"}) == 40


def _row(i, family, new, patch_bytes, **extra):
    row = dict(
        id=i,
        family=family,
        label=i,
        axis=None,
        value=None,
        notes=[],
        delta_patch=None if family == "full_ft" else {},
        lr=1e-3,
        lr_grid=[1e-3, 3e-3],
        lr_sweep=[
            dict(lr=1e-3, seed=0, iterations=2, val_metric=0.5, train_seconds=2.0, work_dir="w"),
            dict(lr=3e-3, seed=0, iterations=2, val_metric=0.4, train_seconds=2.0, work_dir="w"),
        ],
        val_metric=0.5,
        seed=0,
        seeds=[dict(seed=0, new_task=new)],
        iterations=2,
        train_seconds=2.0,
        work_dir="w",
        config="c.py",
        checkpoint="p",
        trained_params=10,
        delta_params=None,
        owned_params=None,
        delta_fraction=None if family == "full_ft" else 0.02,
        patch_fraction=1.0,
        stages=None,
        patch_bytes=patch_bytes,
        new_task=new,
        new_task_min=new,
        new_task_max=new,
        equal_time=None,
        base_task=0.8,
        base_identical=None if family == "full_ft" else True,
        first_difference=None,
        exactness_checked_on=None,
        train_step_seconds=1.0,
        latency=None if family == "full_ft" else dict(merged_ratio=1.0, unmerged_ratio=1.1),
    )
    row.update(extra)
    return row


def test_report_compares_patches_with_the_model_weights_and_draws_the_frontier(tmp_path):
    rows = [
        _row(
            "full_ft",
            "full_ft",
            0.80,
            4000,
            seeds=[dict(seed=0, new_task=0.78), dict(seed=1, new_task=0.82)],
            new_task_min=0.78,
            new_task_max=0.82,
            equal_time=dict(iterations=2, new_task=0.80),
        ),
        _row("delta", "delta", 0.82, 20, equal_time=dict(iterations=8, new_task=0.85)),
        _row("delta_fast", "delta", 0.79, 10, train_step_seconds=0.4),
    ]
    setting = dict(
        name="t",
        title="t",
        metric="m",
        metric_label="m",
        checkpoint="c",
        checkpoint_bytes=100_000,  # a file holding optimiser state too: not the reference
        model_bytes=1000,
        iterations=2,
        ft_lr_grid=[1e-3, 3e-3],
        lr_scales=[1.0, 3.0],
        split=dict(val_fraction=0.15, seed=0, images=dict(fit=7, val=1, test=4)),
        seeds=2,
        top_rows=["full_ft", "delta", "delta_fast"],
        equal_time=dict(enabled=True, cap=4.0),
        cost=dict(repeats=0, steps=1, warmup=1, latency_images=2, latency_repeats=2),
    )
    base = dict(base_task=0.8, new_task=0.2)
    paint = [dict(alpha=a, new_task=0.2 + 0.6 * a, base_task=0.8 - 0.5 * a) for a in (0, 0.5, 1)]
    report = assemble(setting, base, rows, {}, paint, "today", 1.0)
    assert [set(p) for p in report["paint"]] == [set(PAINT_FIELDS)] * 3
    assert report["paint"][-1]["retention"] == pytest.approx(0.3 / 0.8)
    by_id = {r["id"]: r for r in report["methods"]}
    assert by_id["delta"]["patch_to_model"] == pytest.approx(0.02)
    assert by_id["delta"]["new_task_equal_time"] == 0.85
    assert by_id["delta_fast"]["train_step_ratio"] == pytest.approx(0.4)
    for row in report["methods"]:
        assert set(METHOD_FIELDS) <= set(row), set(METHOD_FIELDS) - set(row)
    t = report["targets"]
    assert set(t) == {k for k, *_ in TARGETS}
    assert t["patch_size"]["value"] == pytest.approx(0.02) and t["patch_size"]["met"]
    assert (
        t["delta_vs_full_ft"]["value"] == pytest.approx(0.82 / 0.80)
        and t["delta_vs_full_ft"]["met"]
    )
    assert t["fast_vs_full_ft"]["value"] == pytest.approx(-0.01) and t["fast_vs_full_ft"]["met"]
    assert t["fast_step_time"]["value"] is None  # no cost runs: not measured
    assert t["base_identical"]["met"] is True
    # the PAINT α that keeps the base (α = 0) is the only one retaining what Δ does
    assert (
        t["beats_paint"]["value"] == pytest.approx(0.82 - 0.2)
        and t["paint_dominates"]["value"] == 0
    )

    from mmdelta.apps.benchmark.report import write_outputs

    write_outputs(report, tmp_path)
    md = (tmp_path / "benchmark.md").read_text()
    assert "0.800 ± 0.020 (n=2)" in md and "**0.001 → 0.500**" in md
    assert "0.850 (8 it)" in md and "chosen on validation" in md
    png = (tmp_path / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (tmp_path / "frontier.png").unlink()
    again = rerender(tmp_path)
    assert (tmp_path / "frontier.png").is_file()
    assert json.loads((tmp_path / "benchmark.json").read_text())["methods"] == again["methods"]


def test_records_name_paths_inside_the_repository_relative_to_it(tmp_path):
    from mmdelta.apps.benchmark.report import REPO_ROOT, portable_paths

    inside = str(REPO_ROOT / "work_dirs" / "benchmark" / "x" / "config.py")
    report = dict(
        setting=dict(checkpoint=inside, task_config="configs/demo/x.py", iterations=8),
        methods=[dict(work_dir=str(REPO_ROOT / "work_dirs"), new_task=0.5, label="/ not a path")],
        files=dict(json=str(tmp_path / "benchmark.json")),
    )
    record = portable_paths(report)
    assert record["setting"] == dict(
        checkpoint="work_dirs/benchmark/x/config.py", task_config="configs/demo/x.py", iterations=8
    )
    assert record["methods"] == [dict(work_dir="work_dirs", new_task=0.5, label="/ not a path")]
    assert record["files"] == report["files"]  # outside the repository: kept as is
    assert report["setting"]["checkpoint"] == inside  # the report itself is not changed
    assert portable_paths(dict(a="/work/main/configs/x.py"), "/work/main") == dict(a="configs/x.py")


def test_presets_rule_picks_the_cheapest_row_near_full_fine_tuning():
    from mmdelta.apps.benchmark.report import presets

    def row(id_, new, step, mem=0.5, merged=0.95, fraction=0.02, family="delta"):
        return dict(
            id=id_,
            label=id_,
            family=family,
            new_task=new,
            step_time_ratio=step,
            peak_memory_ratio=mem,
            step_seconds=step,
            delta_fraction=fraction,
            delta_patch={},
            latency=dict(merged_ratio=merged),
        )

    rows = [
        row("full_ft", 0.93, 1.0, 1.0, family="full_ft"),
        row("delta", 0.92, 0.84),
        row("delta_fast", 0.915, 0.45, merged=None),
        row("delta_rank4", 0.80, 0.40),  # cheapest, but 13 points below
    ]
    chosen = presets(rows)
    assert chosen["accurate"]["id"] == "delta"  # mergeable, best within the Δ budget
    assert chosen["fast"]["id"] == "delta_fast"
    assert "full fine-tuning" in chosen["fast"]["rule"]
    # nothing within 0.02 of full fine-tuning: the rule falls back to the best Δ row
    rows[1]["new_task"], rows[2]["new_task"] = 0.85, 0.84
    chosen = presets(rows)
    assert chosen["fast"]["id"] == "delta_fast" and "best Δ row" in chosen["fast"]["rule"]
    rows[2]["new_task"] = 0.70
    assert presets(rows)["fast"]["id"] == "delta"
