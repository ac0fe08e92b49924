"""Print what a `delta_patch` adds to the model of an mmdet / mmseg / mmpretrain config.

    .venv/bin/python tools/patch_summary.py CONFIG [--patch-cfg-options branch.rank=4]
        [--file-size] [--json]

The model is built from the config with random weights (nothing is downloaded); the
config's ``delta_patch`` key is applied, or the default patch if it has none. With
``--file-size`` the patch is also written to a temporary patch file, and its size is shown
next to that of a full checkpoint of the model (``torch.save`` of its state dict).
"""

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import torch
from mmengine.config import Config, DictAction
from mmengine.registry import MODELS, init_default_scope

from mmdelta import apply_delta_patch, base_state_dict, save_patch


def file_sizes(model) -> dict:
    """Bytes of the active patch's file and of a full checkpoint of the base model."""
    with tempfile.TemporaryDirectory() as tmp:
        patch = save_patch(model, Path(tmp) / "patch.safetensors").stat().st_size
    full = io.BytesIO()
    torch.save({"state_dict": base_state_dict(model)}, full)
    full_bytes = full.getbuffer().nbytes
    return dict(patch_bytes=patch, checkpoint_bytes=full_bytes, file_fraction=patch / full_bytes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument(
        "--patch-cfg-options",
        nargs="+",
        action=DictAction,
        default={},
        help="override keys of the delta_patch dict, e.g. branch.rank=4",
    )
    parser.add_argument(
        "--file-size", action="store_true", help="also report the patch file's size"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)

    cfg = Config.fromfile(args.config)
    init_default_scope(cfg.get("default_scope", "mmdet"))
    model = MODELS.build(cfg.model)
    patch_cfg = Config(dict(delta_patch=cfg.get("delta_patch", {})))
    patch_cfg.merge_from_dict({f"delta_patch.{k}": v for k, v in args.patch_cfg_options.items()})
    summary = apply_delta_patch(model, patch_cfg.delta_patch.to_dict())
    sizes = file_sizes(model) if args.file_size else {}
    if args.json:
        print(json.dumps({**summary.to_dict(), **sizes}, indent=2))
        return 0
    print(summary)
    if sizes:
        print(
            f"patch file {sizes['patch_bytes']:,} bytes = {100 * sizes['file_fraction']:.2f}% "
            f"of a full checkpoint ({sizes['checkpoint_bytes']:,} bytes)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
