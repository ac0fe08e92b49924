"""Export an mmseg segmenter / mmdet detector, its Δ-patch merged, to ONNX and check it.

    .venv/bin/python tools/export_onnx.py CONFIG BASE_CHECKPOINT [--patch PATCH.safetensors]
        --out OUT.onnx [--shape H W] [--batch N] [--static] [--no-fold-preprocess]
        [--opset N] [--tol 1e-4] [--force] [--cfg-options k=v ...]

The model is built with the base checkpoint (every key checked) and the patch
(``mmdelta.apis.init_patched_model``); without ``--patch`` a checkpoint holding Δ tensors (a
training checkpoint) gives its patch, a plain base checkpoint the base. The patch is folded
into the weights (``mmdelta.merge_patch``; a patch with branches that cannot be folded,
e.g. ``BlockDelta``, is refused) and the plain model exported with
``mmdelta.deploy.onnx.export_onnx``: segmenters end to end (logits at input size and label
map), detectors up to their dense head (see that module for inputs, outputs and dynamic
axes). Then onnxruntime (CPU) runs the file on a random image batch of the export shape and
the errors against PyTorch are printed; exit status 1 when an output's max abs error
exceeds ``--tol`` times that output's max |value|, or more than 0.1 % of a label map
differs (pixels whose top two logits nearly tie).
"""

import argparse
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

import torch
from mmengine.config import DictAction

from mmdelta import active_patch, merge_patch, patch_classes
from mmdelta.apis import init_base_model, init_patched_model
from mmdelta.apis.inference import PatchNotFoundError
from mmdelta.deploy.onnx import check_onnx, export_onnx

#: label-map pixels allowed to differ (near-ties of the top two logits on random images)
MAX_LABEL_MISMATCH = 1e-3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="mmdet / mmseg config file")
    parser.add_argument("checkpoint", help="the base model's checkpoint")
    parser.add_argument("--patch", help="a patch file (.safetensors) to merge before export")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--shape",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="input height and width to trace and check with (default: the data "
        "preprocessor's fixed size, else 512 512)",
    )
    parser.add_argument("--batch", type=int, default=1, help="batch size to trace and check")
    parser.add_argument("--static", action="store_true", help="fixed input shape (no dynamic axes)")
    parser.add_argument(
        "--no-fold-preprocess",
        action="store_true",
        help="input is the normalised tensor, not raw images (normalisation stays outside)",
    )
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument(
        "--tol", type=float, default=1e-4, help="max error relative to each output's max |value|"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing OUT file")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="config overrides")
    return parser.parse_args(argv)


def build(args):
    """The merged (plain) model and a description of what it is."""
    try:
        model = init_patched_model(
            args.config, args.checkpoint, args.patch, "cpu", args.cfg_options
        )
    except PatchNotFoundError:
        model = init_base_model(args.config, args.checkpoint, "cpu", args.cfg_options)
        return model, dict(
            patch=None, classes=(model.__dict__.get("dataset_meta") or {}).get("classes")
        )
    name = active_patch(model)
    classes = patch_classes(model, name) or (model.__dict__.get("dataset_meta") or {}).get(
        "classes"
    )
    try:
        merged = merge_patch(model, name)
    except ValueError as err:
        raise SystemExit(f"cannot export {args.patch or args.checkpoint}: {err}") from None
    return merged.eval(), dict(patch=name, classes=list(classes) if classes else None)


def main(argv=None) -> int:
    args = parse_args(argv)
    if Path(args.out).exists() and not args.force:
        raise SystemExit(f"{args.out} exists; pass --force to replace it")
    model, about = build(args)
    if args.shape:
        height, width = args.shape
    else:
        size = getattr(model.data_preprocessor, "size", None)
        height, width = tuple(size) if size else (512, 512)
    shape = (args.batch, 3, height, width)
    print(
        f"exporting {type(model).__name__} ("
        + (f"patch {about['patch']!r} merged" if about["patch"] else "base, no patch")
        + f") traced at {shape}"
    )
    path = export_onnx(
        model,
        args.out,
        shape,
        opset=args.opset,
        dynamic=not args.static,
        fold_preprocess=not args.no_fold_preprocess,
        overwrite=args.force,
        metadata=dict(
            config=str(args.config),
            checkpoint=str(args.checkpoint),
            patch_file=args.patch,
            patch=about["patch"],
            classes=about["classes"],
        ),
    )
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")

    gen = torch.Generator().manual_seed(0)
    inputs = torch.rand(shape, generator=gen)
    if not args.no_fold_preprocess:
        inputs = inputs * 255  # raw image values
    errors = check_onnx(model, path, inputs)
    print(f"onnxruntime (CPUExecutionProvider) vs PyTorch on a random {tuple(shape)} batch:")
    worst, mismatched = 0.0, 0.0
    for name, err in errors.items():
        if "mismatched" in err:  # a label map: differences only where logits nearly tie
            print(f"  {name:<20} mismatched {err['mismatched']:.4%}")
            mismatched = max(mismatched, err["mismatched"])
        else:
            print(f"  {name:<20} max abs {err['max_abs']:.3g}  rel {err['rel']:.3g}")
            worst = max(worst, err["rel"])
    failed = []
    if worst > args.tol:
        failed.append(f"max relative error {worst:.3g} > --tol {args.tol:g}")
    if mismatched > MAX_LABEL_MISMATCH:
        failed.append(f"{mismatched:.4%} of the label map differs (> {MAX_LABEL_MISMATCH:.2%})")
    if failed:
        print(f"FAILED: {'; '.join(failed)}", file=sys.stderr)
        return 1
    print(f"OK: max relative error {worst:.3g} <= {args.tol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
