"""Serve one base model and many Δ-patches over HTTP to concurrent clients.

    .venv/bin/python tools/serve.py CONFIG BASE.pth --patch P1.safetensors
        [--patch NAME=P2.safetensors ...] [--host 127.0.0.1] [--port 8000] [--device cpu]
        [--max-batch 8] [--max-wait-ms 10] [--strategy auto|group|route] [--score-thr 0.3]

The base is loaded once and every patch onto it (under the name it was saved with, or NAME);
one worker thread owns the model and batches the requests (``mmdelta.apis.engine.
PatchEngine``); the HTTP part is ``mmdelta.apis.server.create_app`` (FastAPI, run by
uvicorn). Endpoints: ``POST /predict?patch=NAME`` (body: the image), ``GET /patches``,
``POST /patches/NAME`` (body: a patch file), ``DELETE /patches/NAME``, ``GET /health``;
interactive docs at ``/docs``. See docs/serving.md.
"""

import argparse
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # mmengine 0.10.7
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmdelta import DeltaPatchConfigError, PatchFileError
from mmdelta.apis.engine import STRATEGIES, PatchEngine
from mmdelta.apis.server import create_app, named_patches
from mmdelta.apis.serving import ServingError
from mmdelta.runner.checkpoint import CheckpointError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the base model's mmdet/mmseg config")
    parser.add_argument("checkpoint", help="the base model's checkpoint")
    parser.add_argument(
        "--patch",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="a patch file; repeat for more. NAME= serves it under another name",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch", type=int, default=8, help="most requests per batch")
    parser.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more"
    )
    parser.add_argument(
        "--strategy",
        default="auto",
        choices=STRATEGIES,
        help="group: bit-for-bit single-image answers; route: one forward per batch, each "
        "sample with its own patch; auto: route batches of several models (default)",
    )
    parser.add_argument(
        "--score-thr", type=float, default=0.3, help="detections listed above it (det)"
    )
    parser.add_argument("--log-level", default="info", help="uvicorn's log level")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        engine = PatchEngine(
            args.config,
            args.checkpoint,
            named_patches(args.patch),
            device=args.device,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            strategy=args.strategy,
            score_thr=args.score_thr,
        )
    except (
        FileNotFoundError,
        ServingError,
        PatchFileError,
        CheckpointError,
        DeltaPatchConfigError,
        ValueError,
    ) as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        return 2
    import uvicorn

    print(
        f"serving base {args.checkpoint} ({engine.task}) with {len(engine.patches())} "
        f"patch(es): {', '.join(engine.patches()) or 'none'} on http://{args.host}:{args.port}",
        flush=True,
    )
    try:
        uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
