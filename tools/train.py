"""Train an mmdet / mmseg config; with a `delta_patch` key, train the Δ-patch.

    .venv/bin/python tools/train.py CONFIG [--work-dir DIR] [--resume [CHECKPOINT]]
        [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

Configs with `delta_patch` run on `mmdelta.DeltaRunner`: the base is loaded from
`load_from` (every key checked), the patch is built before DDP and the optimiser, and a
patch file is written beside every checkpoint and at the end
(`<work_dir>/<patch name>.patch.safetensors`). Other configs run as upstream's train.py
runs them. Multi-process: `torchrun --nproc_per_node N tools/train.py CONFIG --launcher
pytorch` (on CPUs too: gloo backend).
"""

import argparse
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

from mmengine.config import DictAction

import mmdelta  # noqa: F401  (registers DeltaRunner and DeltaPatchHook)
from mmdelta.runner.checkpoint import mmengine_checkpoints
from mmdelta.runner.cli import build_runner, load_config, resolve_resume, set_local_rank


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--work-dir", help="the dir to save logs, checkpoints and patches")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        help="resume from CHECKPOINT, or without a value from the work_dir's latest",
    )
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="config overrides")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    set_local_rank(args.local_rank)
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    resolve_resume(cfg, args.resume)
    with mmengine_checkpoints():  # plain configs: upstream's loader, same policy
        build_runner(cfg).train()


if __name__ == "__main__":
    main()
