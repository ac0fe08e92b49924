"""The benchmark's outputs: ``benchmark.json``, ``benchmark.md``, ``tradeoff.png`` and
``frontier.png``.

Ratios are to full fine-tuning (training step time, peak training memory, new-task metric)
or to the base (inference latency); *retention* is the base-task metric over the base's;
patch files are compared with the base model's weights (its state dict's tensors), not with
whatever checkpoint file held them. Every lr was chosen on the validation split; the test
set scored the chosen runs only. The targets are the project's; a missed target is
reported, never tuned away.

Paths inside the repository are recorded relative to it (:func:`portable_paths`), so a
committed record does not carry the machine it ran on.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

from ...fileio import write_atomic, write_text_atomic
from ...machine import describe_machine

#: fields of every method row in benchmark.json (the smoke test checks each)
#: what recorded paths are relative to: the repository holding this package
REPO_ROOT = Path(__file__).resolve().parents[3]

METHOD_FIELDS = (
    "id",
    "family",
    "label",
    "axis",
    "value",
    "notes",
    "delta_patch",
    "lr",
    "lr_grid",
    "lr_sweep",
    "val_metric",
    "seed",
    "seeds",
    "iterations",
    "train_seconds",
    "work_dir",
    "config",
    "checkpoint",
    "trained_params",
    "delta_params",
    "owned_params",
    "delta_fraction",
    "patch_fraction",
    "stages",
    "patch_bytes",
    "patch_to_model",
    "new_task",
    "new_task_min",
    "new_task_max",
    "new_task_vs_full_ft",
    "new_task_equal_time",
    "equal_time",
    "base_task",
    "retention",
    "base_identical",
    "first_difference",
    "exactness_checked_on",
    "train_step_seconds",
    "train_step_ratio",
    "step_seconds",
    "step_time_ratio",
    "peak_memory_bytes",
    "peak_memory_ratio",
    "cost_runs",
    "latency",
)
#: fields of each run of a row's lr_sweep (its seeds add new_task)
RUN_FIELDS = ("lr", "seed", "iterations", "val_metric", "train_seconds", "work_dir")
LATENCY_FIELDS = (
    "base_seconds",
    "unmerged_seconds",
    "merged_seconds",
    "unmerged_ratio",
    "merged_ratio",
)
PAINT_FIELDS = ("alpha", "new_task", "base_task", "retention")
TOP_FIELDS = (
    "setting",
    "machine",
    "date",
    "seconds",
    "base",
    "methods",
    "paint",
    "targets",
    "recommended",
    "presets",
)
#: (key, what, target, comparison). Accurate default = the row 'delta', fast = 'delta_fast'
#: (when benchmarked); full fine-tuning is val-tuned like every method.
TARGETS = (
    (
        "base_identical",
        "every patch's base-task predictions with the patch off = the base's",
        True,
        "==",
    ),
    ("delta_vs_full_ft", "Δ default new-task metric / val-tuned full fine-tuning's", 1.0, ">="),
    ("delta_fraction", "Δ default Δ fraction", 0.03, "<="),
    ("patch_size", "Δ default patch file / model weights", 0.03, "<="),
    ("fast_step_time", "Δ fast training step time / full fine-tuning's", 0.5, "<="),
    ("fast_peak_memory", "Δ fast peak training memory / full fine-tuning's", 0.5, "<="),
    (
        "fast_vs_full_ft",
        "Δ fast new-task metric − full fine-tuning's (absolute, as a fraction)",
        -0.02,
        ">=",
    ),
    (
        "head_only_vs_full_ft",
        "head-only new-task metric / full fine-tuning's (clearly below)",
        0.9,
        "<=",
    ),
    (
        "beats_paint",
        "Δ default new-task metric − the best PAINT α's that retains as much of the base",
        0.0,
        ">",
    ),
    (
        "paint_dominates",
        "PAINT α at least as good as Δ default on both tasks (count)",
        0,
        "==",
    ),
    ("inference_unmerged", "Δ default inference latency, unmerged / base", 1.15, "<="),
    ("inference_merged", "Δ default inference latency, merged / base", 1.03, "<="),
)


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def _met(value, target, op) -> bool | None:
    if value is None:
        return None
    return {
        "==": value == target,
        ">=": value >= target,
        "<=": value <= target,
        ">": value > target,
    }[op]


def assemble(setting, base, rows, costs, paint, date, seconds) -> dict:
    """The report dict: per-method rows with costs and ratios, PAINT points, targets."""
    weights = setting["model_bytes"]
    full = next((r for r in rows if r["family"] == "full_ft"), None)
    full_cost = costs.get(full["id"]) if full else None
    for row in rows:
        cost = costs.get(row["id"], {})
        row["patch_to_model"] = row["patch_bytes"] / weights
        row["new_task_vs_full_ft"] = _ratio(row["new_task"], full and full["new_task"])
        row["new_task_equal_time"] = (row.get("equal_time") or {}).get("new_task")
        row["retention"] = _ratio(row["base_task"], base["base_task"])
        row["train_step_ratio"] = _ratio(
            row.get("train_step_seconds"), full and full.get("train_step_seconds")
        )
        row["step_seconds"] = cost.get("step_seconds")
        row["peak_memory_bytes"] = cost.get("peak_memory_bytes")
        row["cost_runs"] = cost.get("runs")
        row["step_time_ratio"] = _ratio(
            row["step_seconds"], full_cost and full_cost["step_seconds"]
        )
        row["peak_memory_ratio"] = _ratio(
            row["peak_memory_bytes"], full_cost and full_cost["peak_memory_bytes"]
        )
    for point in paint:
        point["retention"] = _ratio(point["base_task"], base["base_task"])
    report = dict(
        setting=setting,
        machine=describe_machine(),
        date=date,
        seconds=seconds,
        base=base,
        methods=rows,
        paint=paint,
    )
    report["targets"] = targets(report)
    report["recommended"] = recommend(rows)
    report["presets"] = presets(rows)
    return report


def _row(report, method_id):
    return next((r for r in report["methods"] if r["id"] == method_id), None)


def targets(report: dict) -> dict:
    """Each target's measured value, the target and whether it is met (None: not measured)."""
    delta, head = _row(report, "delta"), _row(report, "head_only")
    fast, full = _row(report, "delta_fast"), _row(report, "full_ft")
    patches = [r for r in report["methods"] if r["delta_patch"] is not None]
    lat = (delta or {}).get("latency") or {}
    paint = [p for p in report["paint"] if p["base_task"] is not None]
    best_paint = dominating = None
    if delta is not None and delta["base_task"] is not None and paint:
        # α = 0 is the base itself, so some α always retains as much as Δ (100 %)
        best_paint = max(
            (p["new_task"] for p in paint if p["base_task"] >= delta["base_task"]), default=None
        )
        dominating = sum(
            p["new_task"] >= delta["new_task"] and p["base_task"] >= delta["base_task"]
            for p in paint
        )
    values = dict(
        base_identical=all(r["base_identical"] for r in patches) if patches else None,
        delta_vs_full_ft=delta and delta["new_task_vs_full_ft"],
        delta_fraction=delta and delta["delta_fraction"],
        patch_size=delta and delta.get("patch_to_model"),
        fast_step_time=fast and fast["step_time_ratio"],
        fast_peak_memory=fast and fast["peak_memory_ratio"],
        fast_vs_full_ft=fast and full and fast["new_task"] - full["new_task"],
        head_only_vs_full_ft=head and head["new_task_vs_full_ft"],
        beats_paint=None if best_paint is None else delta["new_task"] - best_paint,
        paint_dominates=dominating,
        inference_unmerged=lat.get("unmerged_ratio"),
        inference_merged=lat.get("merged_ratio"),
    )
    return {
        key: dict(
            what=what, value=values[key], target=target, op=op, met=_met(values[key], target, op)
        )
        for key, what, target, op in TARGETS
    }


def recommend(rows: list[dict], max_delta_fraction: float = 0.03) -> dict | None:
    """The default the table supports: among the Δ rows (default and variants) within the
    budget — Δ fraction ≤ ``max_delta_fraction`` and mergeable (merged inference at the
    base's cost; a row with no merged latency is not) — the best new-task metric; equal
    metrics go to the lower step time. Rows within the seed-to-seed spread of the choice are
    listed as ``close`` (the table, not this rule, says whether one of them is the better
    trade)."""
    deltas = [r for r in rows if r["family"] == "delta"]
    within = [
        r
        for r in deltas
        if (r["delta_fraction"] or 0) <= max_delta_fraction
        and (r.get("latency") or {}).get("merged_ratio") is not None
    ]
    if not within:
        return None
    within.sort(key=lambda r: (-r["new_task"], r["step_seconds"] or float("inf")))
    choice = within[0]
    return dict(
        id=choice["id"],
        label=choice["label"],
        delta_patch=choice["delta_patch"],
        rule=f"best new-task metric among the mergeable Δ rows with a Δ fraction ≤ "
        f"{max_delta_fraction:.0%}",
        excluded=sorted({r["id"] for r in deltas} - {r["id"] for r in within}),
        close=[r["id"] for r in within[1:] if r["new_task"] >= 0.99 * choice["new_task"]],
    )


#: new-task metric a fast preset may give up against full fine-tuning (as a fraction)
FAST_TOLERANCE = 0.02


def presets(rows: list[dict], tolerance: float = FAST_TOLERANCE) -> dict:
    """Which row each named preset stands for, by a written rule.

    ``accurate``: :func:`recommend` (the best new-task metric among mergeable Δ rows within
    the Δ budget). ``fast``: among the Δ rows whose new-task metric is within ``tolerance``
    of full fine-tuning's (the validation-tuned one), the lowest training step time (ties:
    the lower peak memory); where none is, the same among the rows within ``tolerance`` of
    the best Δ row."""
    deltas = [r for r in rows if r["family"] == "delta" and r.get("step_time_ratio") is not None]
    full = next((r for r in rows if r["family"] == "full_ft"), None)
    rec = recommend(rows)
    out = dict(
        accurate=dict(id=rec["id"], rule=rec["rule"]) if rec else None,
        fast=None,
    )
    if not deltas:
        return out
    reference, against = (
        (full["new_task"], "full fine-tuning")
        if full is not None and any(r["new_task"] >= full["new_task"] - tolerance for r in deltas)
        else (max(r["new_task"] for r in deltas), "the best Δ row")
    )
    near = [r for r in deltas if r["new_task"] >= reference - tolerance]
    near.sort(key=lambda r: (r["step_time_ratio"], r.get("peak_memory_ratio") or float("inf")))
    out["fast"] = dict(
        id=near[0]["id"],
        rule=f"lowest step time among the Δ rows within {tolerance:.2f} of {against}'s "
        "new-task metric (ties: lower peak memory)",
    )
    return out


def rerender(out: str | os.PathLike) -> dict:
    """Recomputes targets and recommendation of ``out/benchmark.json`` and rewrites its
    markdown and plot (after a change to the report code; no training)."""
    report = json.loads((Path(out) / "benchmark.json").read_text())
    report["targets"] = targets(report)
    report["recommended"] = recommend(report["methods"])
    report["presets"] = presets(report["methods"])
    write_outputs(report, out)
    return report


def machine_line(machine: dict) -> str:
    return (
        f"{machine['processor']}, {machine['cpus']} CPUs, {machine['torch_threads']} torch "
        f"threads · torch {machine['torch']} · {machine['platform']}"
    )


# --------------------------------------------------------------------------- writing


def write_outputs(report: dict, out: str | os.PathLike) -> dict:
    """Writes benchmark.json, benchmark.md, tradeoff.png and frontier.png under ``out``
    (atomically)."""
    out = Path(out)
    report["files"] = dict(
        json=str(out / "benchmark.json"),
        markdown=str(out / "benchmark.md"),
        plot=str(out / "tradeoff.png"),
        frontier=str(out / "frontier.png"),
    )
    plot_tradeoff(report, out / "tradeoff.png")
    plot_frontier(report, out / "frontier.png")
    record = portable_paths(report)
    write_text_atomic(out / "benchmark.md", render_markdown(record))
    write_text_atomic(out / "benchmark.json", json.dumps(record, indent=2) + "\n")
    return report["files"]


def portable_paths(value, root: str | os.PathLike = REPO_ROOT):
    """A copy of ``value`` (a report, or any JSON value) in which every absolute path
    inside ``root`` (default: the repository) is relative to ``root``: the record names
    ``work_dirs/benchmark/...``, not the machine it ran on. Other strings are kept."""
    if isinstance(value, dict):
        return {key: portable_paths(item, root) for key, item in value.items()}
    if isinstance(value, list):
        return [portable_paths(item, root) for item in value]
    if isinstance(value, str) and os.path.isabs(value):
        root = Path(os.path.abspath(root))
        path = Path(os.path.abspath(value))
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return value


def _f(value, digits=3, suffix=""):
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _pct(value, digits=1):
    return "–" if value is None else f"{100 * value:.{digits}f} %"


def _x(value):
    return "–" if value is None else f"{value:.2f}×"


def _lr(value):
    return "–" if value is None else f"{value:g}"


def _seeds(row) -> list[dict]:
    return row.get("seeds") or []


def _new_task(row) -> str:
    """The test new-task metric: mean ± half the min–max range over seeds where several."""
    runs = _seeds(row)
    if len(runs) > 1:
        half = (row["new_task_max"] - row["new_task_min"]) / 2
        return f"{row['new_task']:.3f} ± {half:.3f} (n={len(runs)})"
    return _f(row["new_task"])


def _step_ratio(row):
    """Step time / full fine-tuning's: the cost runs', else the training runs' (marked ~)."""
    if row.get("step_time_ratio") is not None:
        return _x(row["step_time_ratio"])
    if row.get("train_step_ratio") is not None:
        return "~" + _x(row["train_step_ratio"])
    return "–"


def render_markdown(report: dict) -> str:
    """``benchmark.md``: the setting and protocol, the main table, then one section each for
    the lr sweep, the seeds, the Δ variants, PAINT, the targets and the recommendation."""
    sections = (
        _md_header,
        _md_main_table,
        _md_lr_sweep,
        _md_seeds,
        _md_variants,
        _md_paint,
        _md_targets,
        _md_recommendation,
    )
    lines = [line for section in sections for line in section(report)]
    lines += ["", "![trade-off](tradeoff.png)", "", "![frontier](frontier.png)", ""]
    return "\n".join(lines)


def _md_header(report: dict) -> list[str]:
    s, base = report["setting"], report["base"]
    split = s.get("split") or {}
    images = split.get("images") or {}
    weights = s.get("model_bytes")
    return [
        f"# Benchmark: {s['title']}",
        "",
        f"{report['date']} · {machine_line(report['machine'])} · {report['seconds'] / 60:.0f} min",
        "",
        f"Metric: {s['metric_label']} (`{s['metric']}`)"
        + (
            f"; base task: `{s['base_metric']}`"
            if s.get("base_metric") and s.get("base_metric") != s["metric"]
            else ""
        )
        + ". Base model: base task "
        f"{_f(base['base_task'])}, new task {_f(base['new_task'])}; its weights "
        + (f"{weights / 1e6:.1f} MB" if weights else "–")
        + f" (checkpoint file {s['checkpoint_bytes'] / 1e6:.1f} MB). Every method trains "
        f"{s['iterations']} iterations from the same base checkpoint.",
        "",
        (
            f"Protocol: every method trains on the *fit* part of the new task's training set "
            f"({images.get('fit', '?')} images) at each lr of its grid (full fine-tuning "
            f"{', '.join(_lr(v) for v in s.get('ft_lr_grid') or [])}; patch methods "
            f"{', '.join(f'{v:g}' for v in s.get('lr_scales') or [])} × the config's lr) and "
            f"the lr is chosen on the *val* part ({images.get('val', '?')} images, a fraction "
            f"{split.get('val_fraction', '?')} by a hash of each image's path, split seed "
            f"{split.get('seed', '?')}; none of them in the test set). Only the chosen run is "
            f"scored on the test set ({images.get('test', '?')} images). Rows "
            f"{', '.join(s.get('top_rows') or []) or '–'} are retrained with {s.get('seeds', 1)} "
            "seeds (new task: mean ± half the min–max range) and once more at equal wall-clock "
            f"(full fine-tuning's schedule time, at most "
            f"{(s.get('equal_time') or {}).get('cap', '?')}× the iterations)."
            if split
            else "Protocol: this report predates the validation split (its full fine-tuning "
            "lr was picked on the test set, the patch methods' lrs were not swept)."
        ),
        "",
        (
            f"Step time and peak memory: median of {s['cost']['repeats']} fresh processes per "
            f"method (side by side, order rotated), {s['cost']['steps']} timed steps each"
            if s["cost"]["repeats"]
            else "Step time: no cost runs (~: the training runs' seconds per iteration, runner "
            "setup included); peak memory not measured"
        )
        + f"; latency: median over {s['cost']['latency_images']} images × "
        f"{s['cost']['latency_repeats']}, batch 1.",
    ]


def _md_main_table(report: dict) -> list[str]:
    lines = [
        "",
        "| method | lr | val | new task | ×full FT | new task at equal wall-clock "
        "| base task (retention) | patch off = base | Δ fraction | patch fraction "
        "| file (of model) | step time ×FT | peak mem ×FT | inference unmerged | merged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["methods"]:
        lat = r["latency"] or {}
        eq = r.get("equal_time") or {}
        equal = (
            f"{_f(eq['new_task'])} ({eq['iterations']} it)"
            if eq.get("new_task") is not None
            else ("–" if not eq else eq.get("skipped", "–"))
        )
        lines.append(
            f"| {r['label']} | {_lr(r['lr'])} | {_f(r.get('val_metric'))} | {_new_task(r)} | "
            f"{_x(r['new_task_vs_full_ft'])} | {equal} | "
            f"{_f(r['base_task'])} ({_pct(r['retention'])}) | "
            f"{'–' if r['base_identical'] is None else ('yes' if r['base_identical'] else 'NO')} | "
            f"{_pct(r['delta_fraction'], 2)} | {_pct(r['patch_fraction'], 2)} | "
            f"{r['patch_bytes'] / 1e6:.2f} MB ({_pct(r.get('patch_to_model'))}) | "
            f"{_step_ratio(r)} | {_x(r['peak_memory_ratio'])} | "
            f"{_x(lat.get('unmerged_ratio'))} | {_x(lat.get('merged_ratio'))} |"
        )
    return lines


def _md_lr_sweep(report: dict) -> list[str]:
    lines = [
        "",
        "## Learning rates, chosen on validation",
        "",
        "| method | lr → val metric (chosen in bold) |",
        "|---|---|",
    ]
    for r in report["methods"]:
        sweep = r.get("lr_sweep") or []
        cells = [
            (
                f"**{_lr(p['lr'])} → {_f(p['val_metric'])}**"
                if p["lr"] == r["lr"]
                else f"{_lr(p['lr'])} → {_f(p['val_metric'])}"
            )
            for p in sweep
        ]
        lines.append(f"| {r['label']} | {', '.join(cells) or '–'} |")
    return lines


def _md_seeds(report: dict) -> list[str]:
    lines = []
    seeded = [r for r in report["methods"] if len(_seeds(r)) > 1]
    if seeded:
        lines += [
            "",
            "## Seeds (at the chosen lr)",
            "",
            "| method | new task per seed | mean | min – max |",
            "|---|---|---|---|",
        ]
        for r in seeded:
            per = ", ".join(f"{p['seed']}: {_f(p['new_task'])}" for p in _seeds(r))
            lines.append(
                f"| {r['label']} | {per} | {_f(r['new_task'])} | "
                f"{_f(r['new_task_min'])} – {_f(r['new_task_max'])} |"
            )
    return lines


def _md_variants(report: dict) -> list[str]:
    lines = []
    variants = [r for r in report["methods"] if r["family"] == "delta"]
    if len(variants) > 1:
        lines += [
            "",
            "## Δ placement × branch type × rank (one axis at a time from the default)",
            "",
            "| variant | axis | lr | new task | Δ fraction | patch MB | step time ×FT "
            "| peak mem ×FT |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in variants:
            lines.append(
                f"| {r['label']} | {r['axis'] or 'default'} | {_lr(r['lr'])} | {_new_task(r)} | "
                f"{_pct(r['delta_fraction'], 2)} | {r['patch_bytes'] / 1e6:.2f} | "
                f"{_step_ratio(r)} | {_x(r['peak_memory_ratio'])} |"
            )
    return lines


def _md_paint(report: dict) -> list[str]:
    lines = []
    if report["paint"]:
        lines += [
            "",
            "## PAINT: interpolating base → fully fine-tuned weights (the chosen lr, seed 0)",
            "",
            "| α | new task | base task (retention) |",
            "|---|---|---|",
        ]
        for p in report["paint"]:
            lines.append(
                f"| {p['alpha']:.1f} | {_f(p['new_task'])} | {_f(p['base_task'])} "
                f"({_pct(p['retention'])}) |"
            )
    return lines


def _md_targets(report: dict) -> list[str]:
    lines = ["", "## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    for t in report["targets"].values():
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        value = (
            t["value"]
            if isinstance(t["value"], int | None)  # bools and counts as they are
            else f"{t['value']:.3f}"
        )
        lines.append(f"| {t['what']} | {value} | {t['op']} {t['target']} | {met} |")
    return lines


def _md_recommendation(report: dict) -> list[str]:
    lines = []
    rec = report["recommended"]
    if rec:
        lines += [
            "",
            f"Recommended default ({rec['rule']}): **{rec['label']}** (`{rec['id']}`); "
            f"within 1 % of it: {', '.join(rec['close']) or 'none'}; outside the budget: "
            f"{', '.join(rec['excluded']) or 'none'}.",
        ]
    for name, chosen in (report.get("presets") or {}).items():
        if chosen:
            lines.append(f"\nPreset `{name}` ({chosen['rule']}): `{chosen['id']}`.")
    return lines


def plot_tradeoff(report: dict, path: str | os.PathLike) -> str:
    """Base-task metric (x) vs new-task metric (y): one marker per method, PAINT's α path as
    a curve. Methods without a base-task score are drawn at the base's own score when they
    keep the base exactly (patch off), else left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = report["base"]
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=120)
    paint = [p for p in report["paint"] if p["base_task"] is not None]
    if paint:
        ax.plot(
            [p["base_task"] for p in paint],
            [p["new_task"] for p in paint],
            "-o",
            color="0.55",
            markersize=4,
            label="PAINT α = 0 … 1",
        )
        for p in paint:
            ax.annotate(
                f"{p['alpha']:.1f}",
                (p["base_task"], p["new_task"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, -8),
                color="0.4",
            )
    markers = dict(full_ft="s", head_only="v", norm_only="^", lora_conv="D", delta="*")
    for r in report["methods"]:
        x = r["base_task"]
        if x is None and r["base_identical"]:
            x = base["base_task"]
        if x is None:
            continue
        main = r["family"] != "delta" or r["id"] == "delta"
        ax.scatter(
            x,
            r["new_task"],
            marker=markers.get(r["family"], "o"),
            s=140 if r["id"] == "delta" else (60 if main else 30),
            alpha=1.0 if main else 0.6,
            label=r["label"],
            zorder=3,
        )
    if base["base_task"] is not None:
        ax.axvline(base["base_task"], color="0.8", linestyle="--", linewidth=1, zorder=0)
    s = report["setting"]
    ax.set_xlabel(
        f"base task {s.get('base_metric') or s['metric_label']} (patch off for Δ methods)"
    )
    ax.set_ylabel(f"new task {s['metric_label']}")
    ax.set_title("\n".join(textwrap.wrap(s["title"], 80)), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return str(path)


def plot_frontier(report: dict, path: str | os.PathLike) -> str:
    """New-task metric (y) against the training step-time ratio to full fine-tuning (left)
    and the peak-memory ratio (right): one labelled point per method, the top rows with an
    error bar over their seeds (min – max). Without cost runs the left panel uses the
    training runs' seconds per iteration; a panel with no ratios says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), dpi=120, sharey=True)
    rows = report["methods"]
    timed = any(r.get("step_time_ratio") is not None for r in rows)
    panels = (
        (
            axes[0],
            lambda r: r.get("step_time_ratio") if timed else r.get("train_step_ratio"),
            "training step time / full fine-tuning's"
            + ("" if timed else " (training runs, coarse)"),
        ),
        (
            axes[1],
            lambda r: r.get("peak_memory_ratio"),
            "peak training memory / full fine-tuning's",
        ),
    )
    markers = dict(full_ft="s", head_only="v", norm_only="^", lora_conv="D", delta="*")
    for ax, x_of, xlabel in panels:
        drawn = 0
        for r in rows:
            x = x_of(r)
            if x is None or r.get("new_task") is None:
                continue
            main = r["family"] != "delta" or r["id"] in ("delta", "delta_fast")
            if len(_seeds(r)) > 1:
                ax.errorbar(
                    x,
                    r["new_task"],
                    yerr=[[r["new_task"] - r["new_task_min"]], [r["new_task_max"] - r["new_task"]]],
                    fmt="none",
                    ecolor="0.3",
                    capsize=3,
                    zorder=2,
                )
            ax.scatter(
                x,
                r["new_task"],
                marker=markers.get(r["family"], "o"),
                s=120 if r["id"] in ("delta", "delta_fast") else (55 if main else 28),
                alpha=1.0 if main else 0.6,
                zorder=3,
            )
            ax.annotate(
                r["id"], (x, r["new_task"]), fontsize=7, textcoords="offset points", xytext=(5, 3)
            )
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.axvline(1.0, color="0.8", linestyle="--", linewidth=1, zorder=0)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    s = report["setting"]
    axes[0].set_ylabel(f"new task {s['metric_label']} (test, lr chosen on validation)")
    fig.suptitle("\n".join(textwrap.wrap(s["title"], 100)), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return str(path)
