"""Quick end-to-end Δ-patch: build a small mmdet detector, patch it, train a few steps on
generated images, check that the patch-off model is still the base bit for bit, save the
patch file, load it onto an independently built base, and merge it into plain weights.

    .venv/bin/python tools/quickcheck.py [--steps 20] [--config configs/demo/...py] [--out DIR]

Everything runs offline on the CPU in well under a minute (``mmdelta.apps.quickcheck``).
"""

import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7

from mmdelta.apps.quickcheck import DEFAULT_CONFIG, QuickcheckError, run_quickcheck


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument(
        "--out", help="folder for the patch file (default: a temporary folder, removed after)"
    )
    args = parser.parse_args(argv)
    try:
        checks = run_quickcheck(args.config, args.steps, args.lr, args.out)
    except QuickcheckError as err:
        parser.error(str(err))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
