"""tools/benchmark.py: a tiny smoke run checks every JSON field, the plot and the Δ methods'
exactness (independently of the tool); the methods, PAINT, targets and errors in isolation."""

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from mm_models import build_model
from mmengine.config import Config
from tool_runs import run_tool

from mmdelta.apis import init_base_model, init_patched_model
from mmdelta.apps.benchmark import BenchmarkError, comparison_methods, interpolate, method_config
from mmdelta.apps.benchmark.methods import backbone_stages, heads
from mmdelta.apps.benchmark.report import (
    LATENCY_FIELDS,
    METHOD_FIELDS,
    TARGETS,
    TOP_FIELDS,
    recommend,
)
from mmdelta.apps.benchmark.run import _set_iterations
from mmdelta.apps.benchmark.settings import real_setting
from mmdelta.evaluation import evaluate, first_difference
from mmdelta.patching import apply_delta_patch, delta_disabled
from mmdelta.patching.config import resolve_config
from mmdelta.runner.cli import config_file

ROOT = Path(__file__).resolve().parents[1]
DEMO_SHIFT = ROOT / "configs/demo/det_shapes_shifted.py"


# --------------------------------------------------------------------------- smoke run


@pytest.mark.slow
def test_tiny_benchmark_writes_every_field_plot_and_keeps_the_base_exact(tmp_path):
    out = tmp_path / "bench"
    proc = run_tool(
        ROOT / "tools/benchmark.py",
        "--size",
        "tiny",
        "--out",
        out,
        "--data",
        tmp_path / "data",
        "--base-dir",
        tmp_path / "base",
        "--methods",
        "delta,delta_fast",
        "--ft-lr",
        "1e-4,3e-4",
        "--lr-scales",
        "1,3",
        "--seeds",
        "2",
        "--top-rows",
        "full_ft,delta_fast",
        "--val-fraction",
        "0.25",
        "--equal-time-cap",
        "2",
        "--no-paint",  # PAINT: its unit test below and the report test in test_benchmark_protocol
        "--placements",
        "",
        "--branch-types",
        "",
        "--ranks",
        "",
        "--cost-repeats",
        "1",  # one cost process per method; repeats and their rotation: the test below
        "--cost-steps",
        "1",
        "--cost-warmup",
        "1",
        "--latency-images",
        "2",
        timeout=1500,
    )
    assert "## Targets" in proc.stdout
    report = json.loads((out / "benchmark.json").read_text())
    assert set(TOP_FIELDS) <= set(report), set(TOP_FIELDS) - set(report)
    ids = [r["id"] for r in report["methods"]]
    assert ids == ["full_ft", "delta", "delta_fast"]
    setting = report["setting"]
    ckpt = setting["checkpoint_bytes"]
    assert ckpt == os.path.getsize(setting["checkpoint"])
    # patch sizes are compared with the base model's weights, not the checkpoint file
    state = torch.load(setting["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    weights = sum(t.numel() * t.element_size() for t in state.values())
    assert setting["model_bytes"] == weights
    # the val split: carved from the 8 training images, none of them a test image
    split = setting["split"]
    assert split["val_fraction"] == 0.25 and split["seed"] == 0
    assert split["selection"] == "validation"
    assert split["images"]["fit"] + split["images"]["val"] == 8
    assert split["images"]["val"] >= 1 and split["images"]["test"] == 4
    val_paths = (out / "val_split.txt").read_text().split()
    assert len(val_paths) == split["images"]["val"]
    assert all("/JPEGImages/" in p for p in val_paths)
    test_ids = (tmp_path / "data/det_shifted_tiny/shapes/ImageSets/Main/test.txt").read_text()
    assert not {Path(p).stem for p in val_paths} & set(test_ids.split())
    assert setting["ft_lr_grid"] == [1e-4, 3e-4] and setting["lr_scales"] == [1.0, 3.0]
    assert setting["top_rows"] == ["full_ft", "delta_fast"]
    for row in report["methods"]:
        assert set(METHOD_FIELDS) <= set(row), (row["id"], set(METHOD_FIELDS) - set(row))
        assert 0 <= row["new_task"] <= 1 and 0 <= row["base_task"] <= 1
        assert row["iterations"] == 2 and row["train_seconds"] > 0
        assert row["patch_bytes"] == os.path.getsize(row["checkpoint"])
        assert row["patch_to_model"] == pytest.approx(row["patch_bytes"] / weights)
        assert row["step_seconds"] > 0 and row["peak_memory_bytes"] > 0
        assert len(row["cost_runs"]) == 1  # one fresh process per (method, repeat)
        assert row["step_time_ratio"] > 0 and row["peak_memory_ratio"] > 0
        # the lr: each of the grid trained (seed 0) and scored on validation, the best kept
        sweep = row["lr_sweep"]
        assert [p["lr"] for p in sweep] == row["lr_grid"] and len(sweep) == 2
        assert all(0 <= p["val_metric"] <= 1 and p["seed"] == 0 for p in sweep)
        best = max(sweep, key=lambda p: p["val_metric"])  # ties: the first, as the tool
        assert row["lr"] == best["lr"] and row["val_metric"] == best["val_metric"]
        assert row["work_dir"] == best["work_dir"] and row["config"].startswith(row["work_dir"])
        # seeds: the top rows twice at the chosen lr (seed 0 = the sweep's run), others once
        seeds = row["seeds"]
        top = row["id"] in ("full_ft", "delta_fast")
        assert [p["seed"] for p in seeds] == ([0, 1] if top else [0])
        assert all(p["lr"] == row["lr"] for p in seeds) and seeds[0]["work_dir"] == row["work_dir"]
        values = [p["new_task"] for p in seeds]
        assert row["new_task"] == pytest.approx(sum(values) / len(values))
        assert (row["new_task_min"], row["new_task_max"]) == (min(values), max(values))
        eq = row["equal_time"]
        if top:
            assert 1 <= eq["iterations"] <= 4 and 0 <= eq["new_task"] <= 1
            assert row["new_task_equal_time"] == eq["new_task"]
            if eq["reused"]:
                assert eq["new_task"] == seeds[0]["new_task"]
        else:
            assert eq is None and row["new_task_equal_time"] is None
        if row["family"] == "full_ft":
            assert row["delta_patch"] is None and row["latency"] is None
            assert row["patch_fraction"] == 1.0 and row["step_time_ratio"] == 1.0
            assert row["lr"] == setting["ft_lr"] and row["lr_grid"] == [1e-4, 3e-4]
            assert eq["iterations"] == 2 and eq["reused"]
        else:
            assert row["lr_grid"] == pytest.approx([5e-3, 1.5e-2])
            assert row["base_identical"] is True, row["first_difference"]
            assert row["retention"] == 1.0 and row["exactness_checked_on"] == "base task"
            assert set(LATENCY_FIELDS) == set(row["latency"])
            assert row["latency"]["unmerged_ratio"] > 0
            # the fast preset's side network does not merge: it serves unmerged
            assert (row["latency"]["merged_ratio"] is None) == (row["id"] == "delta_fast")
            assert 0 < row["patch_fraction"] < 0.2
    by_id = {r["id"]: r for r in report["methods"]}
    fast = by_id["delta_fast"]
    assert fast["delta_patch"]["preset"] == "fast" and fast["owned_params"] == 0
    assert fast["stages"]["backbone"]["layers"] == 1  # one side network, nothing inside
    assert by_id["delta"]["delta_patch"]["targets"][0] == "backbone"
    # every training config trains on the fit part and validates on the val part
    trained = Config.fromfile(by_id["delta"]["config"])
    assert trained.train_dataloader.dataset.type == "TrainValSplit"
    assert trained.train_dataloader.dataset.part == "fit"
    assert trained.val_dataloader.dataset.part == "val"

    assert report["paint"] == [] and report["targets"]["beats_paint"]["value"] is None
    assert set(report["targets"]) == {t[0] for t in TARGETS}
    for t in report["targets"].values():
        assert {"what", "value", "target", "op", "met"} == set(t)
    assert report["targets"]["base_identical"]["met"] is True
    assert report["recommended"]["id"] in ids
    for plot in ("tradeoff.png", "frontier.png"):
        png = (out / plot).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    markdown = (out / "benchmark.md").read_text()
    assert "chosen on validation" in markdown and "(n=2)" in markdown
    # --rerender rewrites the markdown and the plots from the JSON alone (no training)
    (out / "benchmark.md").unlink()
    (out / "tradeoff.png").unlink()
    (out / "frontier.png").unlink()
    again = run_tool(ROOT / "tools/benchmark.py", "--rerender", out)
    assert "## Targets" in again.stdout and (out / "tradeoff.png").is_file()
    assert (out / "frontier.png").is_file()
    assert json.loads((out / "benchmark.json").read_text())["methods"] == report["methods"]

    # independently of the tool: each Δ method's patch, switched off, predicts what the base does
    cfg = Config.fromfile(by_id["delta"]["config"])
    base_cfg = copy.deepcopy(cfg)
    base_cfg.test_dataloader.dataset.data_root = str(tmp_path / "data" / "det_base_tiny")
    base = evaluate(init_base_model(cfg, report["setting"]["checkpoint"]), base_cfg)
    for row in report["methods"][1:]:
        patched = init_patched_model(cfg, report["setting"]["checkpoint"], row["checkpoint"])
        with delta_disabled(patched):
            off = evaluate(patched, base_cfg)
        assert first_difference(base.predictions, off.predictions) is None, row["id"]


def test_training_costs_one_process_per_method_and_repeat_in_rotated_order(monkeypatch):
    """The cost runs' bookkeeping, without their processes (the smoke run above runs one real
    process per method): a child per (method, repeat), the order rotated every repeat, the
    medians over repeats."""
    from mmdelta.apps.benchmark import costs

    calls = []

    def child(config, steps, warmup):
        calls.append(config)
        n = len(calls)
        return dict(step_seconds=0.1 * n, step_times=[0.1 * n], peak_memory_bytes=1000 * n)

    monkeypatch.setattr(costs, "_child", child)
    configs = {"a": "a.py", "b": "b.py", "c": "c.py"}
    result = costs.training_costs(configs, repeats=3, steps=1, warmup=0, log=lambda _: None)
    assert calls == ["a.py", "b.py", "c.py", "b.py", "c.py", "a.py", "c.py", "a.py", "b.py"]
    assert list(result) == ["a", "b", "c"]
    # "a" ran as calls 1, 6 and 8: the medians of its three runs
    assert [r["peak_memory_bytes"] for r in result["a"]["runs"]] == [1000, 6000, 8000]
    assert result["a"]["peak_memory_bytes"] == 6000
    assert result["a"]["step_seconds"] == pytest.approx(0.6)


def test_tool_reports_a_config_without_delta_patch(tmp_path):
    proc = run_tool(
        ROOT / "tools/benchmark.py",
        "--config",
        ROOT / "configs/demo/det_shapes_base.py",
        "--checkpoint",
        DEMO_SHIFT,  # any existing file: the config is refused first
        check=False,
    )
    assert proc.returncode == 1
    assert "benchmark: error" in proc.stderr and "delta_patch" in proc.stderr


# --------------------------------------------------------------------------- methods


@pytest.fixture(scope="module")
def shift_cfg():
    return Config.fromfile(str(DEMO_SHIFT))


def _demo_model(cfg):
    from mmdelta.apis.inference import build_model

    model, _ = build_model(copy.deepcopy(cfg), None)
    return model


def test_methods_cover_the_issue_and_each_config_applies(shift_cfg):
    model = _demo_model(shift_cfg)
    methods = comparison_methods(shift_cfg, model, ft_lr=3e-4)
    ids = [m.id for m in methods]
    assert ids[:5] == ["full_ft", "head_only", "norm_only", "lora_conv", "delta"]
    assert {"delta_stages_3", "delta_stages_4", "delta_stages_none"} <= set(ids)
    assert {"delta_ScaleShiftDelta", "delta_BlockDelta", "delta_rank4", "delta_rank16"} <= set(ids)
    assert heads(model) == ["rpn_head", "roi_head"]
    for method in methods:
        cfg = method_config(shift_cfg, method)
        if method.id == "full_ft":
            assert "delta_patch" not in cfg and cfg.get("runner_type") != "DeltaRunner"
            assert cfg.load_from == shift_cfg.load_from
            assert cfg.optim_wrapper.optimizer.lr == 3e-4
            assert not any("mmdelta" in str(h) for h in cfg.get("custom_hooks", []))
            continue
        assert cfg.optim_wrapper.optimizer.lr == shift_cfg.optim_wrapper.optimizer.lr
        target = copy.deepcopy(model)
        summary = apply_delta_patch(target, cfg.delta_patch)  # raises if it does not apply
        assert summary.delta_params + summary.owned_params > 0, method.id
    by_id = {m.id: m for m in methods}
    assert by_id["delta"].delta_patch == dict(shift_cfg.delta_patch)
    assert by_id["head_only"].delta_patch["trainable"] == ["rpn_head", "roi_head"]
    assert by_id["lora_conv"].delta_patch["task_norm"] is False
    assert by_id["delta_stages_3"].delta_patch["targets"][:2] == [
        "backbone.layer3",
        "backbone.layer4",
    ]
    assert by_id["delta_rank16"].delta_patch["branch"]["rank"] == 16
    # the original config is not touched
    assert shift_cfg.delta_patch["targets"][0] == "backbone"


def test_backbone_stages_of_resnet_and_convnext():
    assert backbone_stages(build_model("retinanet_r18_fpn")) == [
        [f"backbone.layer{i}"] for i in range(1, 5)
    ]
    stages = backbone_stages(build_model("upernet_convnext"))
    assert stages[0] == ["backbone.downsample_layers.0", "backbone.stages.0"]
    assert len(stages) == 4


def test_methods_refuse_bad_settings(shift_cfg):
    model = _demo_model(shift_cfg)
    with pytest.raises(BenchmarkError, match="stages 1–4"):
        comparison_methods(shift_cfg, model, 1e-4, placements=("5",))
    plain = copy.deepcopy(shift_cfg)
    plain.pop("delta_patch")
    with pytest.raises(BenchmarkError, match="must carry a `delta_patch`"):
        comparison_methods(plain, model, 1e-4)
    classes = copy.deepcopy(shift_cfg)
    classes.delta_patch["classes"] = ["a", "b"]
    ft = comparison_methods(classes, model, 1e-4, placements=())[0]
    with pytest.raises(BenchmarkError, match="--finetune-config"):
        method_config(classes, ft)
    resolve_config(model, comparison_methods(classes, model, 1e-4)[1].delta_patch)


# --------------------------------------------------------------------------- PAINT


def test_paint_interpolation_ends_exact_and_mixes_floats_only():
    torch.manual_seed(0)
    base = {"w": torch.randn(3, 4), "n": torch.tensor(5)}
    ft = {"w": torch.randn(3, 4), "n": torch.tensor(9)}
    assert torch.equal(interpolate(base, ft, 0.0)["w"], base["w"])
    assert torch.equal(interpolate(base, ft, 1.0)["w"], ft["w"])
    mid = interpolate(base, ft, 0.3)
    assert torch.allclose(mid["w"], 0.7 * base["w"] + 0.3 * ft["w"], atol=1e-6)
    assert mid["n"].item() == 5 and interpolate(base, ft, 0.7)["n"].item() == 9
    with pytest.raises(ValueError, match="same state dict keys"):
        interpolate(base, {"w": ft["w"]}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interpolate(base, {"w": torch.zeros(2), "n": ft["n"]}, 0.5)


# --------------------------------------------------------------------------- choice, errors


def test_recommended_default_is_the_best_mergable_row_within_the_delta_budget():
    def row(i, new, step, fraction=0.03, merged=1.0):
        latency = dict(merged_ratio=merged)
        return dict(
            id=i,
            label=i,
            family="delta",
            new_task=new,
            step_seconds=step,
            delta_fraction=fraction,
            latency=latency,
            delta_patch={},
        )

    rows = [
        row("a", 0.880, 1.0),
        row("b", 0.875, 0.5),
        row("c", 0.80, 0.1),
        row("big", 0.95, 1.0, fraction=0.06),
        row("block", 0.90, 1.0, merged=None),
        dict(row("ft", 0.99, 2.0), family="full_ft"),
    ]
    choice = recommend(rows)
    assert choice["id"] == "a" and choice["close"] == ["b"]
    assert choice["excluded"] == ["big", "block"]
    assert recommend(rows, max_delta_fraction=0.1)["id"] == "big"


def test_real_setting_names_what_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--config"):
        real_setting(tmp_path / "nope.py")
    with pytest.raises(FileNotFoundError, match="base checkpoint"):
        real_setting(DEMO_SHIFT, checkpoint=str(tmp_path / "base.pth"))
    ckpt = tmp_path / "base.pth"
    ckpt.write_bytes(b"x")
    from mmdelta.datasets.paths import DatasetPathError

    with pytest.raises(DatasetPathError, match=str(tmp_path / "nodata")):
        real_setting(DEMO_SHIFT, checkpoint=str(ckpt), data_root=str(tmp_path / "nodata"))
    # the real configs' load_from is a URL: nothing is downloaded, the message says what to do
    with pytest.raises(FileNotFoundError, match="download it or pass --checkpoint"):
        real_setting(ROOT / "configs/delta_faster_rcnn_voc.py")
    # package::path names resolve to the installed configs
    assert Path(config_file("mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py")).is_file()
    with pytest.raises(FileNotFoundError, match=r"--base-config 'mmdet::x/nope\.py'"):
        real_setting(DEMO_SHIFT, checkpoint=str(ckpt), base_config="mmdet::x/nope.py")


def test_iterations_override_iteration_and_epoch_based_schedules(shift_cfg):
    cfg = copy.deepcopy(shift_cfg)
    _set_iterations(cfg, 7)
    assert cfg.train_cfg.max_iters == 7 and cfg.param_scheduler[-1]["end"] == 7
    # an epoch-based schedule (mmdet's VOC: 4 epochs, x0.1 after epoch 3) compressed into 8
    # iterations with its shape: the step after 3/4 of them
    epochs = Config.fromfile(str(ROOT / "configs/delta_faster_rcnn_voc.py"))
    epochs.train_cfg.val_begin = 2**31  # (what the benchmark's split sets)
    _set_iterations(epochs, 8)
    assert epochs.train_cfg == dict(
        type="IterBasedTrainLoop", max_iters=8, val_interval=8, val_begin=2**31
    )
    (step,) = epochs.param_scheduler
    assert (step.type, step.by_epoch, step.begin, step.end, step.milestones) == (
        "MultiStepLR",
        False,
        0,
        8,
        [6],
    )
    assert epochs.log_processor.by_epoch is False
    assert epochs.default_hooks.checkpoint.by_epoch is False
    # any other loop is refused
    other = Config(dict(train_cfg=dict(type="MyLoop")))
    with pytest.raises(BenchmarkError, match="iteration- or epoch-based"):
        _set_iterations(other, 7)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
