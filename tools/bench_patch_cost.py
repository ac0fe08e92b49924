"""What a patch costs at inference and in a training step, side by side in one run.

    python tools/bench_patch_cost.py [--device cuda] [--size 800 1344] [--batch 2]
        [--iters 20] [--bf16]

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

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torchvision
from torch import nn

from mmdelta import apply_delta_patch, set_active_patch

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1344))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, *args.size, device=device)
    base = Trunk().to(device).eval()

    def patched(cfg):
        model = copy.deepcopy(base)
        summary = apply_delta_patch(model, dict(targets=TARGETS, **cfg))
        with torch.no_grad():  # a trained-looking patch: non-zero Δ everywhere
            for name, p in model.named_parameters():
                if ".delta." in name and p.requires_grad:
                    p.add_(torch.randn_like(p) * 1e-3)
        return model, summary

    lowrank, lr_summary = patched({})
    lowrank_branch = copy.deepcopy(lowrank)
    lowrank_weight = copy.deepcopy(lowrank)
    for model, compute in [(lowrank_branch, "branch"), (lowrank_weight, "weight")]:
        for module in model.modules():
            if hasattr(module, "compute"):
                module.compute = compute
    scale_shift, ss_summary = patched(dict(branch=dict(type="ScaleShiftDelta")))
    block, bl_summary = patched(dict(branch=dict(type="BlockDelta")))
    norms, tn_summary = patched(dict(branch=None, task_norm=True))
    inactive = copy.deepcopy(lowrank)
    set_active_patch(inactive, None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def infer(model):
        def run():
            with torch.no_grad(), autocast:
                model(x)

        return run

    def train_step(model, full=False):
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

    rows_inf = {
        "base": infer(base),
        "patch inactive": infer(inactive),
        "LowRankDelta, weight form (auto)": infer(lowrank),
        "LowRankDelta, branch form": infer(lowrank_branch),
        "ScaleShiftDelta": infer(scale_shift),
    }
    rows_train = {}
    for label, model, full in [
        ("full fine-tuning", base, True),
        ("LowRankDelta, branch form (auto)", lowrank, False),
        ("LowRankDelta, weight form", lowrank_weight, False),
        ("ScaleShiftDelta", scale_shift, False),
        ("BlockDelta", block, False),
        ("task_norm only", norms, False),
    ]:
        rows_train[label] = train_step(model, full)

    results = {k: ([], 0) for k in [*rows_inf, *(f"train {k}" for k in rows_train)]}
    for _ in range(args.rounds):  # interleaved rounds: drift hits every row alike
        for label, fn in rows_inf.items():
            times, peak = timed(fn, device, args.iters)
            results[label] = (results[label][0] + times, max(results[label][1], peak))
        for label, (fn, _) in rows_train.items():
            times, peak = timed(fn, device, args.iters)
            key = f"train {label}"
            results[key] = (results[key][0] + times, max(results[key][1], peak))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {name}, torch {torch.__version__}, batch {args.batch}, "
        f"{args.size[0]}x{args.size[1]}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
        f"{args.rounds}x{args.iters} iterations per row"
    )
    for label, summary in [
        ("LowRankDelta", lr_summary),
        ("ScaleShiftDelta", ss_summary),
        ("BlockDelta", bl_summary),
        ("task_norm", tn_summary),
    ]:
        print(f"  {label}: {summary.line()}")

    def table(title, labels, ref):
        ref_time = statistics.median(results[ref][0])
        ref_peak = results[ref][1]
        print(f"\n{title:<40}{'median ms':>11}{'ratio':>8}{'peak MiB':>10}{'mem ratio':>10}")
        for label in labels:
            times, peak = results[label]
            med = statistics.median(times)
            mem = f"{peak / ref_peak:>9.2f}x" if ref_peak else f"{'-':>10}"
            print(
                f"{label:<40}{1000 * med:>11.2f}{med / ref_time:>7.2f}x{peak / 2**20:>10.0f}{mem}"
            )

    table("inference", list(rows_inf), "base")
    train_labels = [f"train {k}" for k in rows_train]
    table("training step", train_labels, "train full fine-tuning")
    for label, (_, trainable) in rows_train.items():
        print(f"  trainable parameters, {label}: {trainable:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
