"""``report.json`` and ``report.md`` of the main job (written atomically, side by side)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ...fileio import write_text_atomic

#: fields every task row of report.json carries (tests check them)
TASK_FIELDS = (
    "task",
    "title",
    "classes",
    "base_task",
    "new_task",
    "delta_fraction",
    "patch_fraction",
    "delta_params",
    "owned_params",
    "patch_file",
    "patch_bytes",
    "checkpoint_bytes",
    "patch_to_checkpoint",
    "iterations",
    "train_seconds",
    "eval_seconds",
    "pictures",
)


def write_report(report: dict, out: str | os.PathLike) -> tuple[str, str]:
    """Writes ``out/report.json`` and ``out/report.md``; returns their paths."""
    out = Path(out)
    paths = (out / "report.json", out / "report.md")
    write_text_atomic(paths[0], json.dumps(report, indent=2) + "\n")
    write_text_atomic(paths[1], render_markdown(report, out))
    return tuple(str(p) for p in paths)


def render_markdown(report: dict, out: Path) -> str:
    m = report["metric"]
    base = report["base"]
    lines = [
        f"# mmdelta main job: {report['title']}",
        "",
        f"{report['date']} · {report['machine']['processor']}, {report['machine']['cpus']} CPUs"
        f" · torch {report['machine']['torch']} · size `{report['size']}`",
        "",
        f"Base model: {m} **{base['metric']:.3f}** on its own task ({base['images']} test "
        f"images), {base['iterations']} training iterations, "
        + (
            "cached"
            if base["cached"]
            else f"trained in {base['train_seconds'] / 60:.1f} min in this run"
        )
        + f"; checkpoint {_bytes(base['checkpoint_bytes'])}.",
        "",
        f"| task | base task {m}: base | base task: patched, patch off | identical predictions "
        f"| new task {m}: base | new task: patched | Δ fraction | patch fraction "
        "| patch file / checkpoint | train time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["tasks"]:
        lines.append(
            f"| {r['title']} | {r['base_task']['base']:.3f} | {r['base_task']['patched_patch_off']:.3f} "
            f"| {'yes' if r['base_task']['identical_predictions'] else 'NO'} "
            f"| {_num(r['new_task']['base'])} | **{r['new_task']['patched']:.3f}** "
            f"| {100 * r['delta_fraction']:.2f} % | {100 * r['patch_fraction']:.2f} % "
            f"| {_bytes(r['patch_bytes'])} / {_bytes(r['checkpoint_bytes'])} "
            f"({100 * r['patch_to_checkpoint']:.1f} %) "
            f"| {r['train_seconds'] / 60:.1f} min ({r['iterations']} it) |"
        )
    lines += ["", "Quality targets (fractions of the base's own-task score):", ""]
    q = report["quality"]
    lines.append(f"- base {m} ≥ 0.7: {q['base']:.3f} — {_ok(q['base_ok'])}")
    for name, row in q.items():
        if isinstance(row, dict):
            lines.append(
                f"- {name}: base before patching {100 * row['before']:.0f} % (≤ 60 %: "
                f"{_ok(row['before_ok'])}); patched {100 * row['after']:.0f} % (≥ 90 %: "
                f"{_ok(row['after_ok'])})"
            )
    s = report["seconds"]
    lines += [
        "",
        f"Wall time: {s['total'] / 60:.1f} min in all (data {s['data']:.0f} s, base training "
        f"{s['base_train']:.0f} s).",
        "",
        "Base (left) and patched (right) predictions on the patching tasks' test images:",
        "",
    ]
    for r in report["tasks"]:
        for pic in r["pictures"]:
            lines.append(f"![{r['task']}]({_rel(pic, out)})")
    lines += ["", f"![training curves]({_rel(report['curves'], out)})", ""]
    return "\n".join(lines)


def _rel(path: str, out: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def _num(value) -> str:
    return "n/a (other classes)" if value is None else f"{value:.3f}"


def _ok(flag: bool) -> str:
    return "met" if flag else "**missed**"


def _bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"
