"""What a patch costs at inference and in a training step, side by side in one run.

    python tools/bench_patch_cost.py [--device cuda] [--size 800 1344] [--batch 2]
        [--iters 20] [--bf16]

A torchvision ResNet-50 trunk (random weights, no download) with the base, the patch off,
the branch types in weight and branch form, and full fine-tuning, timed side by side in
one process; medians and ratios. The rows and how they are timed:
``mmdelta.apps.patch_cost`` (the logic).
"""

import argparse
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from mmdelta.apps.patch_cost import run_patch_cost


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1344))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = parser.parse_args(argv)
    run_patch_cost(args.device, args.size, args.batch, args.iters, args.rounds, args.bf16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
