"""What a patch costs at inference and in a training step, side by side in one run.

(``tools/bench_patch_cost.py`` is its command line.)

A torchvision ResNet-50 trunk (randomly initialised; no OpenMMLab package, no download)
stands in for a detector backbone, so the script also runs where only torch is installed
(plus mmengine, which mmdelta imports). Each row is timed in the same process, interleaved
over rounds; the printed figures are medians and ratios to the base (inference) or to full
fine-tuning (training step), with peak memory.

Inference rows: the base; patch inactive; the default LowRankDelta patch active in weight
form (``W + ΔW`` folded once, what ``compute='auto'`` does in eval + no_grad) and in branch
form; ScaleShiftDelta. Training rows: full fine-tuning (every weight, BatchNorm in eval like
mmdet's ``norm_eval``); LowRankDelta in branch form (``compute='auto'``) and in weight form
(``compute='weight'``), ScaleShiftDelta, BlockDelta, and ``task_norm`` with no Δ branches.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from ..patching import apply_delta_patch, set_active_patch

TARGETS = ["layer1", "layer2", "layer3", "layer4"]


class Trunk(nn.Module):
    """ResNet-50 without pooling and classifier: (N, 3, H, W) -> (N, 2048, H/32, W/32)."""

    def __init__(self):
        super().__init__()
        net = torchvision.models.resnet50()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )

    def forward(self, x):
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters):
    for _ in range(3):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return times, peak


def run_patch_cost(
    device: str | torch.device,
    size: tuple[int, int] = (800, 1344),
    batch: int = 2,
    iters: int = 20,
    rounds: int = 3,
    bf16: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, tuple[list[float], int]]:
    """Times every row (interleaved over ``rounds`` of ``iters`` iterations) and logs the
    tables; returns each row's times (seconds) and peak memory (bytes, CUDA only)."""
    device = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, *size, device=device)
    base = Trunk().to(device).eval()
    models, summaries = _patched_models(base)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    rows_inf = {label: _infer(model, x, autocast) for label, model in models["inference"]}
    rows_train = {
        label: _train_step(model, x, autocast, full) for label, model, full in models["training"]
    }
    results = _measure(rows_inf, rows_train, device, rounds, iters)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(
        f"device {name}, torch {torch.__version__}, batch {batch}, "
        f"{size[0]}x{size[1]}, {'bf16 autocast' if bf16 else 'fp32'}, "
        f"{rounds}x{iters} iterations per row"
    )
    for label, summary in summaries.items():
        log(f"  {label}: {summary.line()}")
    _table(results, "inference", list(rows_inf), "base", log)
    train_labels = [f"train {k}" for k in rows_train]
    _table(results, "training step", train_labels, "train full fine-tuning", log)
    for label, (_, trainable) in rows_train.items():
        log(f"  trainable parameters, {label}: {trainable:,}")
    return results


def _patched(base, cfg):
    """A copy of ``base`` with a ``cfg`` patch on :data:`TARGETS`, every Δ non-zero."""
    model = copy.deepcopy(base)
    summary = apply_delta_patch(model, dict(targets=TARGETS, **cfg))
    with torch.no_grad():  # a trained-looking patch: non-zero Δ everywhere
        for name, p in model.named_parameters():
            if ".delta." in name and p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    return model, summary


def _patched_models(base) -> tuple[dict, dict]:
    """The inference rows ``(label, model)``, the training rows ``(label, model, full)``
    and each patch kind's summary."""
    lowrank, lr_summary = _patched(base, {})
    lowrank_branch = copy.deepcopy(lowrank)
    lowrank_weight = copy.deepcopy(lowrank)
    for model, compute in [(lowrank_branch, "branch"), (lowrank_weight, "weight")]:
        for module in model.modules():
            if hasattr(module, "compute"):
                module.compute = compute
    scale_shift, ss_summary = _patched(base, dict(branch=dict(type="ScaleShiftDelta")))
    block, bl_summary = _patched(base, dict(branch=dict(type="BlockDelta")))
    norms, tn_summary = _patched(base, dict(branch=None, task_norm=True))
    inactive = copy.deepcopy(lowrank)
    set_active_patch(inactive, None)
    models = dict(
        inference=[
            ("base", base),
            ("patch inactive", inactive),
            ("LowRankDelta, weight form (auto)", lowrank),
            ("LowRankDelta, branch form", lowrank_branch),
            ("ScaleShiftDelta", scale_shift),
        ],
        training=[
            ("full fine-tuning", base, True),
            ("LowRankDelta, branch form (auto)", lowrank, False),
            ("LowRankDelta, weight form", lowrank_weight, False),
            ("ScaleShiftDelta", scale_shift, False),
            ("BlockDelta", block, False),
            ("task_norm only", norms, False),
        ],
    )
    summaries = {
        "LowRankDelta": lr_summary,
        "ScaleShiftDelta": ss_summary,
        "BlockDelta": bl_summary,
        "task_norm": tn_summary,
    }
    return models, summaries


def _infer(model, x, autocast):
    def run():
        with torch.no_grad(), autocast:
            model(x)

    return run


def _train_step(model, x, autocast, full=False):
    """One SGD step of a copy of ``model`` (every weight when ``full``, BatchNorm in eval
    like mmdet's ``norm_eval``) and its trainable parameter count."""
    model = copy.deepcopy(model)
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    if full:  # norm_eval, as mmdet detectors train ResNet
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def run():
        with autocast:
            loss = model(x).float().square().mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()

    return run, sum(p.numel() for p in params)


def _measure(rows_inf, rows_train, device, rounds, iters) -> dict:
    results = {k: ([], 0) for k in [*rows_inf, *(f"train {k}" for k in rows_train)]}
    for _ in range(rounds):  # interleaved rounds: drift hits every row alike
        for label, fn in rows_inf.items():
            times, peak = timed(fn, device, iters)
            results[label] = (results[label][0] + times, max(results[label][1], peak))
        for label, (fn, _) in rows_train.items():
            times, peak = timed(fn, device, iters)
            key = f"train {label}"
            results[key] = (results[key][0] + times, max(results[key][1], peak))
    return results


def _table(results, title, labels, ref, log) -> None:
    ref_time = statistics.median(results[ref][0])
    ref_peak = results[ref][1]
    log(f"\n{title:<40}{'median ms':>11}{'ratio':>8}{'peak MiB':>10}{'mem ratio':>10}")
    for label in labels:
        times, peak = results[label]
        med = statistics.median(times)
        mem = f"{peak / ref_peak:>9.2f}x" if ref_peak else f"{'-':>10}"
        log(f"{label:<40}{1000 * med:>11.2f}{med / ref_time:>7.2f}x{peak / 2**20:>10.0f}{mem}")
