"""What a patch costs at inference and in a training step, side by side in one run.

    python tools/bench_patch_cost.py [--device cuda] [--size 800 1344] [--batch 2]
        [--iters 20] [--bf16]

A torchvision ResNet-50 trunk (randomly initialised; no OpenMMLab package, no download)
stands in for a detector backbone, so the script also runs where only torch is installed
(plus mmengine, which mmdelta imports). Each row is timed in the same process, interleaved
over rounds; the printed figures are medians and ratios to the base (inference) or to full
fine-tuning (training step), with peak memory.

Inference rows: the base; patch inactive; the default LowRankDelta patch active in weight
form (``W + ΔW`` folded once, what ``compute='auto'`` does in eval + no_grad) and in branch
form; ScaleShiftDelta. Training rows: full fine-tuning (every weight, BatchNorm in eval like
mmdet's ``norm_eval``); LowRankDelta in branch form (``compute='auto'``) and in weight form
(``compute='weight'``), ScaleShiftDelta, BlockDelta, and ``task_norm`` with no Δ branches.
The logic is ``mmdelta.apps.patch_cost``.
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
