"""Quick end-to-end Δ-patch: build a small mmdet detector, patch it, train a few steps on
generated images, check that the patch-off model is still the base bit for bit, save the
patch file, load it onto an independently built base, and merge it into plain weights.

    .venv/bin/python tools/quickcheck.py [--steps 20] [--config configs/demo/...py] [--out DIR]

Everything runs offline on the CPU in well under a minute.
"""

import argparse
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

import torch
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope

from mmdelta import (
    apply_delta_patch,
    base_state_dict,
    delta_disabled,
    load_patch,
    merge_patch,
    save_patch,
)
from mmdelta.exactness import identical, tensor_outputs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs/demo/quickcheck_faster-rcnn_r18_fpn_tiny.py"


def shapes_batch(seed: int, num_classes: int, size: int = 128, batch: int = 2) -> dict:
    """Images with 1-4 filled squares / discs / bars on noise, and their boxes and labels.

    Returns the raw batch format of mmdet's ``PackDetInputs``: ``inputs`` (uint8 CHW) and
    ``data_samples`` (``DetDataSample`` with ``gt_instances``).
    """
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inputs, samples = [], []
    for _ in range(batch):
        img = torch.randint(0, 96, (3, size, size), generator=gen).float()
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 5, (1,), generator=gen))):
            label = int(torch.randint(0, num_classes, (1,), generator=gen))
            w, h = (int(v) for v in torch.randint(16, 48, (2,), generator=gen))
            if label == 2:  # bars are long and thin
                h = max(6, h // 4)
            x0, y0 = (int(torch.randint(0, size - s, (1,), generator=gen)) for s in (w, h))
            inside = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            if label == 1:  # discs: the ellipse inscribed in the box
                cx, cy = x0 + w / 2, y0 + h / 2
                inside &= ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1
            colour = torch.rand(3, 1, generator=gen) * 155 + 100
            img[:, inside] = colour.expand(3, int(inside.sum()))
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label)
        sample = DetDataSample(
            metainfo=dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0))
        )
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor(labels)
        )
        inputs.append(img.to(torch.uint8))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def build_detector(cfg: Config, seed: int) -> torch.nn.Module:
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope("mmdet"):
        return MODELS.build(cfg.model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument(
        "--out", help="folder for the patch file (default: a temporary folder, removed after)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()

    cfg = Config.fromfile(args.config)
    if "delta_patch" not in cfg:
        parser.error(f"{args.config} has no `delta_patch` key")
    model = build_detector(cfg, seed=0)
    base = build_detector(cfg, seed=1)  # built independently, then given the same weights
    base.load_state_dict(model.state_dict())
    num_classes = cfg.model.roi_head.bbox_head.num_classes
    probe = shapes_batch(seed=10_000, num_classes=num_classes)
    base_out = tensor_outputs(base, probe)

    print(f"== patching {Path(args.config).name} with delta_patch={cfg.delta_patch}")
    summary = apply_delta_patch(model, cfg.delta_patch)
    print(summary)
    base_keys = set(base.state_dict())
    before = {k: v.clone() for k, v in base_state_dict(model).items()}

    print(f"== training the patch for {args.steps} steps (SGD lr {args.lr}) on generated shapes")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = OptimWrapper(torch.optim.SGD(trainable, lr=args.lr, momentum=0.9, weight_decay=1e-4))
    model.train()
    for step in range(args.steps):
        losses = model.train_step(shapes_batch(seed=step, num_classes=num_classes), optim)
        total = sum(float(v.detach()) for k, v in losses.items() if "loss" in k)
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step + 1:3d}/{args.steps}  loss {total:.4f}")

    after = base_state_dict(model)
    checks = {
        "base state dict keys are the upstream keys": set(after) == base_keys,
        "base tensors bitwise unchanged (BatchNorm buffers included)": all(
            torch.equal(before[k], after[k]) for k in before
        ),
        "patch off == independently built base, bit for bit": False,
        "patch on differs from the base": False,
    }
    with delta_disabled(model):
        checks["patch off == independently built base, bit for bit"] = identical(
            tensor_outputs(model, probe), base_out
        )
    patched_out = tensor_outputs(model, probe)
    checks["patch on differs from the base"] = not identical(patched_out, base_out)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.out or tmp) / f"{summary.name}.safetensors"
        save_patch(model, path, overwrite=args.out is None)
        full = io.BytesIO()
        torch.save({"state_dict": base.state_dict()}, full)
        size = path.stat().st_size
        print(
            f"== patch file {path if args.out else path.name}: {size:,} bytes, "
            f"{100 * size / full.getbuffer().nbytes:.2f}% of a full checkpoint "
            f"({full.getbuffer().nbytes:,} bytes)"
        )
        load_patch(base, path)  # onto the independently built base
    checks["patch file loaded onto the independent base == the trained patch"] = identical(
        tensor_outputs(base, probe), patched_out
    )
    merged_out = tensor_outputs(merge_patch(model), probe)
    checks["merged plain model == the patched model (1e-5 relative)"] = all(
        torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
        for a, b in zip(merged_out, patched_out, strict=True)
    )

    print("== exactness check")
    for what, ok in checks.items():
        print(f"[{'ok' if ok else 'FAILED'}] {what}")
    print(f"== done in {time.perf_counter() - start:.1f} s")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
