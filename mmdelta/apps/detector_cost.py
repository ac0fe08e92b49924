"""What the presets cost on a whole Faster R-CNN R-50 FPN: training step, peak memory, inference.

(``tools/bench_detector_cost.py`` is its command line.)

torchvision's Faster R-CNN with a ResNet-50 FPN backbone (randomly initialised, frozen
BatchNorm like mmdet's ``norm_eval``; no OpenMMLab package, no download: it runs where only
torch, torchvision and mmengine are installed) trained on random boxes. Rows, each trained
with SGD from its own copy of one base, side by side in interleaved rounds:

* full fine-tuning (every weight);
* head only (backbone and FPN frozen: nothing before the heads gets a gradient), the floor;
* Δ accurate: rank-8 ``LowRankDelta`` on the backbone, the FPN, the RPN conv and the box
  head's FCs (the demo detector's ``delta_patch``);
* Δ fast: ``preset='fast'``: a ``SideDelta`` network beside the ResNet (which then runs
  without gradients) and rank-8 ``LowRankDelta`` on the FPN, the RPN conv and the box head.

Each (round, row) moves its model to the device, builds its optimiser, runs warm-up and timed
steps, and records the peak memory allocated above what was allocated before the model came
(weights, gradients, optimiser state, activations); the model then leaves the device. Printed:
median step time and peak memory with ratios to full fine-tuning, and inference latency of
the base, the patches (accurate: weight form, folded once; fast: base + side network) with
ratios to the base.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Sequence

import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from ..patching import apply_delta_patch

#: the demo detector's Δ targets, in torchvision's module names
HEAD_TARGETS = ["backbone.fpn", "rpn.head.conv", "roi_heads.box_head"]
ROWS = {
    "full fine-tuning": "full",
    "head only": "head",
    "Δ accurate (LowRankDelta r8)": dict(targets=["backbone.body", *HEAD_TARGETS]),
    "Δ fast (preset='fast')": dict(
        preset="fast", side=dict(at="backbone.body"), targets=HEAD_TARGETS
    ),
}

#: where the fast preset's cost goes (--ablations)
ABLATIONS = {
    "fast, no Δ in the FPN": dict(
        preset="fast", side=dict(at="backbone.body"), targets=HEAD_TARGETS[1:]
    ),
    "fast, side w32, no image stem": dict(
        preset="fast", side=dict(at="backbone.body", width=32, image=False), targets=HEAD_TARGETS
    ),
    "side only (no Δ after the body)": dict(side=dict(at="backbone.body"), branch=None),
    "side beside body+FPN, Δ heads": dict(
        preset="fast", side=dict(at="backbone"), targets=HEAD_TARGETS[1:]
    ),
}


def build_detector(num_classes: int = 91) -> FasterRCNN:
    """Faster R-CNN R-50 FPN (torchvision), random weights, frozen BatchNorm."""
    resnet = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(resnet, trainable_layers=5)
    return FasterRCNN(backbone, num_classes=num_classes, min_size=800, max_size=1333)


def make_row(base: torch.nn.Module, spec) -> tuple[torch.nn.Module, str]:
    """A copy of ``base`` set up to train as ``spec`` says; returns it and a summary line."""
    model = copy.deepcopy(base)
    if spec == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, f"{sum(p.numel() for p in model.parameters()):,} trainable"
    if spec == "head":
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        return model, f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable"
    summary = apply_delta_patch(model, spec)
    with torch.no_grad():  # a trained-looking patch: every Δ non-zero
        for name, p in model.named_parameters():
            if ".delta." in name and p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    return model, summary.line()


def random_targets(batch: int, size, device, generator) -> list[dict]:
    h, w = size
    targets = []
    for _ in range(batch):
        n = 6
        xy = torch.rand(n, 2, generator=generator) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(n, 2, generator=generator) * torch.tensor([w * 0.3, h * 0.3]) + 16
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(1, 91, (n,), generator=generator)
        targets.append(dict(boxes=boxes.to(device), labels=labels.to(device)))
    return targets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_round(model, images, targets, device, dtype, warmup, iters) -> tuple[list, int]:
    """Moves ``model`` to ``device``, trains ``warmup + iters`` steps; returns the timed step
    seconds and the peak bytes allocated above the level before the model arrived."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    for step in range(warmup + iters):
        sync(device)
        start = time.perf_counter()
        with autocast:
            losses = model(images, targets)
        loss = sum(losses.values())
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
    del optim
    for p in params:
        p.grad = None
    model.to("cpu")
    return times, peak


def infer_round(models: dict, images, device, dtype, iters) -> dict[str, list]:
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    times = {k: [] for k in models}
    for model in models.values():
        model.to(device).eval()
    with torch.no_grad(), autocast:
        for model in models.values():  # warm-up; fills the accurate patch's weight fold
            model(images)
        for i in range(iters):
            names = list(models)
            k = i % len(names)
            for name in names[k:] + names[:k]:
                sync(device)
                start = time.perf_counter()
                models[name](images)
                sync(device)
                times[name].append(time.perf_counter() - start)
    for model in models.values():
        model.to("cpu")
    return times


def measure(
    device: str | torch.device,
    size: Sequence[int] = (800, 1333),
    batch: int = 2,
    iters: int = 15,
    warmup: int = 3,
    rounds: int = 3,
    precisions: Sequence[str] = ("fp32", "bf16"),
    ablations: bool = False,
) -> dict:
    """Every row (and the :data:`ABLATIONS` with ``ablations``) trained and timed at each of
    ``precisions`` (``fp32``, ``bf16``); returns the figures (:func:`render` prints them)."""
    device = torch.device(device)
    torch.manual_seed(0)
    base = build_detector().eval()
    rows, lines = {}, {}
    for label, spec in {**ROWS, **(ABLATIONS if ablations else {})}.items():
        rows[label], lines[label] = make_row(base, spec)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, *size, generator=g).to(device) for _ in range(batch)]
    targets = random_targets(batch, size, device, g)
    result = dict(
        device=torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        cuda=torch.version.cuda,
        size=list(size),
        batch=batch,
        rows=lines,
        precisions={},
    )
    data = (images, targets, device)
    for precision in precisions:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        train = _train_rounds(rows, data, dtype, warmup, iters, rounds)
        inference_models = {
            "base": base,
            "Δ accurate (weight form)": rows["Δ accurate (LowRankDelta r8)"],
            "Δ fast (base + side network)": rows["Δ fast (preset='fast')"],
        }
        infer = infer_round(inference_models, images, device, dtype, iters * rounds)
        result["precisions"][precision] = _figures(train, infer)
    return result


def _train_rounds(rows, data, dtype, warmup, iters, rounds) -> dict:
    """Each row's step times and peak memories over ``rounds`` interleaved rounds."""
    images, targets, device = data
    train = {label: ([], []) for label in rows}
    for r in range(rounds):  # interleaved, order rotated: drift hits every row
        labels = list(rows)
        labels = labels[r % len(labels) :] + labels[: r % len(labels)]
        for label in labels:
            times, peak = train_round(rows[label], images, targets, device, dtype, warmup, iters)
            train[label][0].extend(times)
            train[label][1].append(peak)
    return train


def _figures(train: dict, infer: dict) -> dict:
    """Medians, quartiles and ratios to full fine-tuning (training) or the base (inference)."""
    ref_t = statistics.median(train["full fine-tuning"][0])
    ref_m = max(train["full fine-tuning"][1])
    ref_i = statistics.median(infer["base"])
    return dict(
        train={
            label: dict(
                step_ms=1e3 * statistics.median(t),
                step_ms_quartiles=[1e3 * q for q in statistics.quantiles(t, n=4)],
                step_ratio=statistics.median(t) / ref_t,
                peak_mib=max(m) / 2**20,
                memory_ratio=max(m) / ref_m if ref_m else None,
            )
            for label, (t, m) in train.items()
        },
        inference={
            label: dict(ms=1e3 * statistics.median(t), ratio=statistics.median(t) / ref_i)
            for label, t in infer.items()
        },
    )


def render(result: dict) -> str:
    """The figures as the printed tables."""
    out = [
        f"{result['device']}, torch {result['torch']} (CUDA {result['cuda']}), torchvision "
        f"{result['torchvision']}: Faster R-CNN R-50 FPN, batch {result['batch']}, "
        f"{result['size'][0]}x{result['size'][1]}"
    ]
    out += [f"  {label}: {line}" for label, line in result["rows"].items()]
    for precision, res in result["precisions"].items():
        out.append(
            f"\n{precision}: training step (SGD)   median ms (IQR)      ratio   peak MiB  ratio"
        )
        for label, row in res["train"].items():
            q1, _, q3 = row["step_ms_quartiles"]
            mem = f"{row['memory_ratio']:.2f}x" if row["memory_ratio"] is not None else "-"
            out.append(
                f"  {label:<34}{row['step_ms']:>8.1f} ({q1:.1f}-{q3:.1f}){row['step_ratio']:>8.2f}x"
                f"{row['peak_mib']:>10.0f}  {mem}"
            )
        out.append(f"{precision}: inference (eval, no_grad)   median ms   ratio to base")
        for label, row in res["inference"].items():
            out.append(f"  {label:<32}{row['ms']:>8.1f}{row['ratio']:>12.2f}x")
    return "\n".join(out)
