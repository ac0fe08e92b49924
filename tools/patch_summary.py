"""Print what a `delta_patch` adds to the model of an mmdet / mmseg / mmpretrain config.

    .venv/bin/python tools/patch_summary.py CONFIG [--patch-cfg-options branch.rank=4] [--json]

The model is built from the config with random weights (nothing is downloaded); the
config's ``delta_patch`` key is applied, or the default patch if it has none.
"""

import argparse
import json
import sys

from mmengine.config import Config, DictAction
from mmengine.registry import MODELS, init_default_scope

from mmdelta import apply_delta_patch


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
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)

    cfg = Config.fromfile(args.config)
    init_default_scope(cfg.get("default_scope", "mmdet"))
    model = MODELS.build(cfg.model)
    patch_cfg = Config(dict(delta_patch=cfg.get("delta_patch", {})))
    patch_cfg.merge_from_dict({f"delta_patch.{k}": v for k, v in args.patch_cfg_options.items()})
    summary = apply_delta_patch(model, patch_cfg.delta_patch.to_dict())
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
