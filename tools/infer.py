"""Run images through one base model and several Δ-patches, pictures side by side.

    .venv/bin/python tools/infer.py IMAGE_OR_FOLDER [...] --config CONFIG --checkpoint BASE.pth
        --patch P1.safetensors [--patch NAME=P2.safetensors ...] [--out-dir outputs]
        [--device cpu] [--score-thr 0.3]

The base is loaded once (every checkpoint key checked) and every patch is loaded onto it
under its own name (the name it was saved with, or NAME from ``--patch NAME=FILE``);
patches may carry their own class sets. Each image runs through the base (no patch
active: the base bit for bit) and through each patch. Written under ``--out-dir`` only,
atomically: ``vis/<image>.png`` (the base's and each patch's predictions side by side,
each panel with its own class names), ``results.json`` (per image and model: boxes,
scores, labels and class names above ``--score-thr``; for segmentation per-class pixel
counts) and, for segmentation, ``label_maps/<image>/{base,patch_<name>}.png`` (class ids).
The library part is ``mmdelta.apis.serving.MultiPatchInferencer``.
"""

import argparse
import re
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmdelta import DeltaPatchConfigError, PatchFileError
from mmdelta.apis.serving import MultiPatchInferencer, ServingError
from mmdelta.datasets.images import NoImagesError
from mmdelta.runner.checkpoint import CheckpointError

NAMED = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)=(.+)$")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--config", required=True, help="the base model's mmdet/mmseg config")
    parser.add_argument("--checkpoint", required=True, help="the base model's checkpoint")
    parser.add_argument(
        "--patch",
        action="append",
        required=True,
        metavar="[NAME=]FILE",
        help="a patch file; repeat for more. NAME= loads it under another name",
    )
    parser.add_argument("--out-dir", default="outputs", help="where to write (default: outputs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--score-thr", type=float, default=0.3, help="boxes drawn and listed above it (det)"
    )
    return parser.parse_args(argv)


def patch_argument(values: list[str]) -> list:
    """``--patch`` values → files (named as saved) and ``(name, file)`` pairs for
    ``NAME=FILE`` (a value that is an existing file is always taken as a file)."""
    return [
        NAMED.match(v).groups() if NAMED.match(v) and not Path(v).is_file() else v for v in values
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        served = MultiPatchInferencer(
            args.config, args.checkpoint, patch_argument(args.patch), device=args.device
        )
        print(
            f"base {args.checkpoint} ({served.task}) with {len(served.patches)} patch(es): "
            + ", ".join(f"{n} ({f})" for n, f in served.patches.items())
        )
        out = served(args.images, out_dir=args.out_dir, score_thr=args.score_thr)
    except (
        FileNotFoundError,
        ServingError,
        NoImagesError,
        PatchFileError,
        CheckpointError,
        DeltaPatchConfigError,
    ) as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        return 2
    for record in out["results"]["images"]:
        models = [("base", record["base"]), *record["patches"].items()]
        if served.task == "det":
            found = ", ".join(f"{k} {len(v['scores'])}" for k, v in models)
            print(f"{record['image']}: boxes above {args.score_thr}: {found}")
        else:
            found = ", ".join(f"{k} {len(v['pixels'])}" for k, v in models)
            print(f"{record['image']}: classes present: {found}")
    print(f"wrote {len(out['files']['pictures'])} picture(s) and {out['files']['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
