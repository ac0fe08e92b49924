"""Evaluate an mmdet / mmseg config's base checkpoint, with or without a Δ-patch.

    .venv/bin/python tools/test.py CONFIG BASE_CHECKPOINT [--patch PATCH.safetensors]
        [--work-dir DIR] [--tta] [--out PRED.pkl] [--metrics-out FILE.json] [--cfg-options k=v ...]
        [--launcher none|pytorch|slurm|mpi]

`--patch` is applied after the checkpoint is loaded (the file is checked against the base:
architecture and weights) and overrides any Δ tensors the checkpoint holds. Without
`--patch`, a checkpoint holding Δ tensors (a training checkpoint) is evaluated with its
patch; a plain base checkpoint is evaluated exactly as the base, the patch switched off.
"""

import argparse
import json
import numbers
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

from mmengine.config import DictAction
from mmengine.evaluator import DumpResults

import mmdelta  # noqa: F401  (registers DeltaRunner and DeltaPatchHook)
from mmdelta.runner import PATCH_FILE_KEY
from mmdelta.runner.checkpoint import mmengine_checkpoints
from mmdelta.runner.cli import add_tta, build_runner, load_config, set_local_rank


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="test config file path")
    parser.add_argument("checkpoint", help="the base model's checkpoint")
    parser.add_argument("--patch", help="a patch file (.safetensors) to evaluate")
    parser.add_argument("--work-dir", help="the dir to save logs and metrics")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation")
    parser.add_argument("--metrics-out", help="also write the metrics to this JSON file")
    parser.add_argument("--out", help="dump the predictions to this .pkl file")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="config overrides")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_local_rank(args.local_rank)
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    cfg.load_from = args.checkpoint
    if args.patch:
        cfg[PATCH_FILE_KEY] = args.patch
    if args.tta:
        add_tta(cfg)
    runner = build_runner(cfg)
    if args.out:
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
    with mmengine_checkpoints():  # plain configs: upstream's loader, same policy
        metrics = runner.test()
    if args.metrics_out:
        scalars = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, numbers.Real) or getattr(v, "ndim", None) == 0
        }
        with open(args.metrics_out, "w") as f:
            json.dump(scalars, f, indent=2)
    return metrics


if __name__ == "__main__":
    main()
