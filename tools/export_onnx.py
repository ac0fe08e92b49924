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
differs (pixels whose top two logits nearly tie). The logic is
``mmdelta.deploy.checked_export``.
"""

import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

from mmengine.config import DictAction

from mmdelta.deploy.checked_export import ExportError, export_checked


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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        options = vars(args)  # the flags are its parameters, but one
        fold_preprocess = not options.pop("no_fold_preprocess")
        failed = export_checked(**options, fold_preprocess=fold_preprocess)
    except ExportError as err:
        raise SystemExit(str(err)) from None
    if failed:
        print(f"FAILED: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
