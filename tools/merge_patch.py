"""Merge a Δ-patch into its base: a standalone checkpoint + config for plain mmdet / mmseg.

    .venv/bin/python tools/merge_patch.py CONFIG BASE_CHECKPOINT PATCH.safetensors
        --out OUT.pth [--out-config OUT.py] [--force] [--cfg-options k=v ...]

Mergeable Δ branches (LowRankDelta, ScaleShiftDelta) are folded into the base weights and
patch-owned modules (task norms, a new-class head) take the base's place. OUT.pth and its
config (default: OUT.py beside it) load with `mmdet.apis.init_detector(OUT.py, OUT.pth)` /
`mmseg.apis.init_model(...)` — or mmdet's / mmseg's own tools — with no mmdelta installed,
and compute what the patched model computes. A patch with branches no plain layer can
compute (BlockDelta) is refused: serve it with mmdelta instead (`tools/test.py --patch`,
`mmdelta.apis.init_patched_model`). Existing outputs are kept unless `--force`.
"""

import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

from mmengine.config import DictAction

from mmdelta.deploy.standalone import StandaloneError, write_standalone
from mmdelta.patching import DeltaPatchConfigError, PatchFileError
from mmdelta.runner import CheckpointError

#: the refusals the tool reports as one line (exit code 1); anything else is a bug
EXPECTED_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PatchFileError,
    CheckpointError,
    DeltaPatchConfigError,
    StandaloneError,
    ValueError,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the base model's config file")
    parser.add_argument("checkpoint", help="the base checkpoint the patch was trained on")
    parser.add_argument("patch", help="the patch file (.safetensors)")
    parser.add_argument("--out", required=True, help="the standalone checkpoint to write (.pth)")
    parser.add_argument(
        "--out-config", help="its config (.py, .json or .yaml); default: --out with suffix .py"
    )
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="config overrides")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        checkpoint, config = write_standalone(
            args.config,
            args.checkpoint,
            args.patch,
            args.out,
            args.out_config,
            overwrite=args.force,
            cfg_options=args.cfg_options,
        )
    except EXPECTED_ERRORS as err:
        print(f"merge_patch: error: {err}", file=sys.stderr)
        return 1
    print(f"standalone checkpoint: {checkpoint}\nconfig: {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
