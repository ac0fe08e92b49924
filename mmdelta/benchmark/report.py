"""The benchmark's outputs: ``benchmark.json``, ``benchmark.md`` and ``tradeoff.png``.

Ratios are to full fine-tuning (training step time, peak training memory, new-task metric)
or to the base (inference latency); *retention* is the base-task metric over the base's.
The targets are the project's (issue 6); a missed target is reported, never tuned away.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

from ..fileio import write_atomic, write_text_atomic

#: fields of every method row in benchmark.json (the smoke test checks each)
METHOD_FIELDS = (
    "id",
    "family",
    "label",
    "axis",
    "value",
    "notes",
    "delta_patch",
    "lr",
    "iterations",
    "train_seconds",
    "work_dir",
    "checkpoint",
    "trained_params",
    "delta_params",
    "owned_params",
    "delta_fraction",
    "patch_fraction",
    "stages",
    "patch_bytes",
    "patch_to_checkpoint",
    "new_task",
    "new_task_vs_full_ft",
    "base_task",
    "retention",
    "base_identical",
    "first_difference",
    "exactness_checked_on",
    "step_seconds",
    "step_time_ratio",
    "peak_memory_bytes",
    "peak_memory_ratio",
    "cost_runs",
    "latency",
)
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
)
#: (key, what, target, comparison)
TARGETS = (
    (
        "base_identical",
        "Δ methods' base-task predictions with the patch off = the base's",
        True,
        "==",
    ),
    ("delta_vs_full_ft", "Δ default new-task metric / full fine-tuning's", 0.95, ">="),
    ("delta_fraction", "Δ default Δ fraction", 0.05, "<="),
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
    ("step_time", "Δ default training step time / full fine-tuning's", 0.8, "<="),
    ("peak_memory", "Δ default peak training memory / full fine-tuning's", 0.9, "<="),
    ("inference_unmerged", "Δ default inference latency, unmerged / base", 1.15, "<="),
    ("inference_merged", "Δ default inference latency, merged / base", 1.03, "<="),
    ("patch_size", "Δ default patch file / full checkpoint", 0.05, "<="),
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
    ckpt = setting["checkpoint_bytes"]
    full = next((r for r in rows if r["family"] == "full_ft"), None)
    full_cost = costs.get(full["id"]) if full else None
    for row in rows:
        cost = costs.get(row["id"], {})
        row["patch_to_checkpoint"] = row["patch_bytes"] / ckpt
        row["new_task_vs_full_ft"] = _ratio(row["new_task"], full and full["new_task"])
        row["retention"] = _ratio(row["base_task"], base["base_task"])
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
        machine=_machine(),
        date=date,
        seconds=seconds,
        base=base,
        methods=rows,
        paint=paint,
    )
    report["targets"] = targets(report)
    report["recommended"] = recommend(rows)
    return report


def _row(report, method_id):
    return next((r for r in report["methods"] if r["id"] == method_id), None)


def targets(report: dict) -> dict:
    """Each target's measured value, the target and whether it is met (None: not measured)."""
    delta, head = _row(report, "delta"), _row(report, "head_only")
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
        head_only_vs_full_ft=head and head["new_task_vs_full_ft"],
        beats_paint=None if best_paint is None else delta["new_task"] - best_paint,
        paint_dominates=dominating,
        step_time=delta and delta["step_time_ratio"],
        peak_memory=delta and delta["peak_memory_ratio"],
        inference_unmerged=lat.get("unmerged_ratio"),
        inference_merged=lat.get("merged_ratio"),
        patch_size=delta and delta["patch_to_checkpoint"],
    )
    return {
        key: dict(
            what=what, value=values[key], target=target, op=op, met=_met(values[key], target, op)
        )
        for key, what, target, op in TARGETS
    }


def recommend(rows: list[dict], max_delta_fraction: float = 0.05) -> dict | None:
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


def rerender(out: str | os.PathLike) -> dict:
    """Recomputes targets and recommendation of ``out/benchmark.json`` and rewrites its
    markdown and plot (after a change to the report code; no training)."""
    report = json.loads((Path(out) / "benchmark.json").read_text())
    report["targets"] = targets(report)
    report["recommended"] = recommend(report["methods"])
    write_outputs(report, out)
    return report


def _machine() -> dict:
    from ..demo.main_job import _machine as machine

    return machine()


def machine_line(machine: dict) -> str:
    return (
        f"{machine['processor']}, {machine['cpus']} CPUs, {machine['torch_threads']} torch "
        f"threads · torch {machine['torch']} · {machine['platform']}"
    )


# --------------------------------------------------------------------------- writing


def write_outputs(report: dict, out: str | os.PathLike) -> dict:
    """Writes benchmark.json, benchmark.md and tradeoff.png under ``out`` (atomically)."""
    out = Path(out)
    report["files"] = dict(
        json=str(out / "benchmark.json"),
        markdown=str(out / "benchmark.md"),
        plot=str(out / "tradeoff.png"),
    )
    plot_tradeoff(report, out / "tradeoff.png")
    write_text_atomic(out / "benchmark.md", render_markdown(report))
    write_text_atomic(out / "benchmark.json", json.dumps(report, indent=2) + "\n")
    return report["files"]


def _f(value, digits=3, suffix=""):
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _pct(value, digits=1):
    return "–" if value is None else f"{100 * value:.{digits}f} %"


def _x(value):
    return "–" if value is None else f"{value:.2f}×"


def render_markdown(report: dict) -> str:
    s, base = report["setting"], report["base"]
    lines = [
        f"# Benchmark: {s['title']}",
        "",
        f"{report['date']} · {machine_line(report['machine'])} · {report['seconds'] / 60:.0f} min",
        "",
        f"Metric: {s['metric_label']} (`{s['metric']}`). Base model: base task "
        f"{_f(base['base_task'])}, new task {_f(base['new_task'])}. Every method trains "
        f"{s['iterations']} iterations from the same base checkpoint "
        f"({s['checkpoint_bytes'] / 1e6:.1f} MB). Step time and peak memory: median of "
        f"{s['cost']['repeats']} fresh processes per method (side by side, order rotated), "
        f"{s['cost']['steps']} timed steps each; latency: median over "
        f"{s['cost']['latency_images']} images × {s['cost']['latency_repeats']}, batch 1.",
        "",
        "| method | new task | ×full FT | base task (retention) | patch off = base | Δ fraction "
        "| patch fraction | file (of ckpt) | step time ×FT | peak mem ×FT | inference unmerged "
        "| merged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["methods"]:
        lat = r["latency"] or {}
        lines.append(
            f"| {r['label']} | {_f(r['new_task'])} | {_x(r['new_task_vs_full_ft'])} | "
            f"{_f(r['base_task'])} ({_pct(r['retention'])}) | "
            f"{'–' if r['base_identical'] is None else ('yes' if r['base_identical'] else 'NO')} | "
            f"{_pct(r['delta_fraction'], 2)} | {_pct(r['patch_fraction'], 2)} | "
            f"{r['patch_bytes'] / 1e6:.2f} MB ({_pct(r['patch_to_checkpoint'])}) | "
            f"{_x(r['step_time_ratio'])} | {_x(r['peak_memory_ratio'])} | "
            f"{_x(lat.get('unmerged_ratio'))} | {_x(lat.get('merged_ratio'))} |"
        )
    sweep = s.get("ft_lr_sweep") or []
    if len(sweep) > 1:
        lines += [
            "",
            "Full fine-tuning, each lr trained (the best is the row above): "
            + ", ".join(
                f"lr {p['lr']:g} → new {_f(p['new_task'])} / base {_f(p['base_task'])}"
                for p in sweep
            )
            + ".",
        ]
    variants = [r for r in report["methods"] if r["family"] == "delta"]
    if len(variants) > 1:
        lines += [
            "",
            "## Δ placement × branch type × rank (one axis at a time from the default)",
            "",
            "| variant | axis | new task | Δ fraction | patch MB | step time ×FT | peak mem ×FT |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in variants:
            lines.append(
                f"| {r['label']} | {r['axis'] or 'default'} | {_f(r['new_task'])} | "
                f"{_pct(r['delta_fraction'], 2)} | {r['patch_bytes'] / 1e6:.2f} | "
                f"{_x(r['step_time_ratio'])} | {_x(r['peak_memory_ratio'])} |"
            )
    if report["paint"]:
        lines += [
            "",
            "## PAINT: interpolating base → fully fine-tuned weights",
            "",
            "| α | new task | base task (retention) |",
            "|---|---|---|",
        ]
        for p in report["paint"]:
            lines.append(
                f"| {p['alpha']:.1f} | {_f(p['new_task'])} | {_f(p['base_task'])} "
                f"({_pct(p['retention'])}) |"
            )
    lines += ["", "## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    for t in report["targets"].values():
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        value = (
            t["value"]
            if isinstance(t["value"], int | None)  # bools and counts as they are
            else f"{t['value']:.3f}"
        )
        lines.append(f"| {t['what']} | {value} | {t['op']} {t['target']} | {met} |")
    rec = report["recommended"]
    if rec:
        lines += [
            "",
            f"Recommended default ({rec['rule']}): **{rec['label']}** (`{rec['id']}`); "
            f"within 1 % of it: {', '.join(rec['close']) or 'none'}; outside the budget: "
            f"{', '.join(rec['excluded']) or 'none'}.",
        ]
    lines += ["", "![trade-off](tradeoff.png)", ""]
    return "\n".join(lines)


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
    ax.set_xlabel(f"base task {s['metric_label']} (patch off for Δ methods)")
    ax.set_ylabel(f"new task {s['metric_label']}")
    ax.set_title("\n".join(textwrap.wrap(s["title"], 80)), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return str(path)
