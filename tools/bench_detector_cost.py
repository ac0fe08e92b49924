"""What the presets cost on a whole Faster R-CNN R-50 FPN: training step, peak memory, inference.

    python tools/bench_detector_cost.py [--device cuda] [--size 800 1333] [--batch 2]
        [--iters 15] [--rounds 3] [--precision fp32 bf16] [--json OUT.json]

torchvision's Faster R-CNN R-50 FPN (random weights, no download; only torch, torchvision
and mmengine needed): full fine-tuning, head only, Δ accurate and Δ fast, side by side in
interleaved rounds; medians and ratios to full fine-tuning. What each row is, and how it is
measured: ``mmdelta.apps.detector_cost`` (the logic).
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from mmdelta.apps.detector_cost import measure, render


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--ablations", action="store_true", help="also the ABLATIONS rows")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    options = vars(args)  # the flags are its parameters, but two
    json_file, options["precisions"] = options.pop("json"), options.pop("precision")
    result = measure(**options)
    print(render(result))
    if json_file:
        Path(json_file).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
