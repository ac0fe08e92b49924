"""An HTTP server for one base and many patches: :func:`create_app` around a
:class:`~mmdelta.apis.engine.PatchEngine` (``tools/serve.py`` is its command line).

Why FastAPI + uvicorn: both are widely used and well kept; request handling is asynchronous,
so many clients wait cheaply on one event loop while the engine's single worker thread owns
the model (each request awaits its engine future through ``asyncio.wrap_future``: nothing
blocks the loop; decoding and preprocessing run in the thread pool); the OpenAPI schema and
interactive docs (``/docs``) come for free; and ``fastapi.testclient.TestClient`` drives the
app in tests without a socket.

Endpoints (errors answer ``{"detail": message}``, and change nothing):

* ``POST /predict[?patch=NAME][&format=json|png]``: body the raw encoded image (PNG, JPEG,
  …; ``Content-Type: image/*`` or ``application/octet-stream``); no ``patch``: the base.
  JSON ``{patch, classes, strategy, batch, ...summary}`` (detection: ``bboxes``, ``scores``,
  ``labels``, ``label_names`` above the score threshold, ``below_thr``; segmentation:
  ``shape``, ``pixels`` per class). Segmentation with ``format=png``: the label map as a
  lossless PNG (8-bit, 16-bit beyond 255 classes), original image size. Unknown patch: 404
  (the message lists the loaded ones); another content type: 415; bytes that are no
  image: 400.
* ``GET /patches``: the base (classes, fingerprint) and every loaded patch (file, classes,
  own_classes). ``POST /patches/{name}`` (body: a patch file): loads it at run time (written
  to a private temporary file first, never over a user's file): 201 + its entry; a file
  that is no patch or a patch of another base: 422 with the reason; a name in use: 409.
  ``DELETE /patches/{name}``: 204; not loaded: 404.
* ``GET /health``: the engine's state and counters.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import cv2
import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ..patching.files import PatchFileError
from .engine import UnknownPatchError, decode_image
from .serving import BASE, ServingError

#: what ``POST /patches/{name}`` and ``--patch NAME=FILE`` accept as a patch name
PATCH_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
IMAGE_TYPES = ("image/", "application/octet-stream")


def label_map_png(sample, num_classes: int | None = None) -> bytes:
    """A ``SegDataSample``'s label map as PNG bytes: 8-bit, 16-bit when the model has more
    than 255 classes (or a label above 255 occurs)."""
    data = sample.pred_sem_seg.data
    seg = data.reshape(data.shape[-2:]).cpu().numpy()
    wide = (num_classes is not None and num_classes > 255) or int(seg.max(initial=0)) > 255
    ok, png = cv2.imencode(".png", seg.astype(np.uint16 if wide else np.uint8))
    if not ok:
        raise RuntimeError("could not encode the label map as PNG")
    return png.tobytes()


def create_app(engine, *, title: str = "mmdelta: one base, many patches") -> FastAPI:
    """The FastAPI app serving ``engine`` (a :class:`~mmdelta.apis.engine.PatchEngine`, or
    anything with its ``submit`` / ``load_patch`` / ``unload_patch`` / ``patches`` /
    ``health`` / ``task`` / ``base_fingerprint``). The app does not close the engine; patch
    files uploaded at run time live in a temporary folder removed at shutdown."""
    uploads = Path(tempfile.mkdtemp(prefix="mmdelta-serve-uploads-"))
    uploaded: dict[str, Path] = {}  # patch name -> its uploaded file

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            shutil.rmtree(uploads, ignore_errors=True)

    app = FastAPI(title=title, lifespan=lifespan)
    app.state.engine, app.state.uploads = engine, uploads

    @app.post("/predict")
    async def predict(
        request: Request,
        patch: str | None = Query(None, description="the patch to run; none: the base"),
        format: str = Query("json", pattern="^(json|png)$", description="png: seg label map"),
    ):
        content_type = request.headers.get("content-type", "application/octet-stream")
        if not content_type.lower().startswith(IMAGE_TYPES):
            raise HTTPException(
                415,
                f"send the encoded image as the raw body with Content-Type image/* or "
                f"application/octet-stream, not {content_type!r}",
            )
        if format == "png" and engine.task != "seg":
            raise HTTPException(400, "format=png is for segmentation models (label maps)")
        body = await request.body()
        try:
            image = await run_in_threadpool(decode_image, body)
            future = await run_in_threadpool(engine.submit, image, patch)
            prediction = await asyncio.wrap_future(future)
        except UnknownPatchError as err:
            raise HTTPException(404, str(err)) from None
        except ServingError as err:
            raise HTTPException(400, str(err)) from None
        if format == "png":
            classes = prediction.classes
            png = await run_in_threadpool(
                label_map_png, prediction.sample, None if classes is None else len(classes)
            )
            headers = {
                "X-Patch": prediction.patch or BASE,
                "X-Strategy": prediction.strategy,
                "X-Batch": str(prediction.batch),
            }
            return Response(png, media_type="image/png", headers=headers)
        return {
            "patch": prediction.patch,
            "classes": None if prediction.classes is None else list(prediction.classes),
            "strategy": prediction.strategy,
            "batch": prediction.batch,
            **prediction.summary,
        }

    @app.get("/patches")
    async def patches():
        return {
            "base": {"fingerprint": engine.base_fingerprint, **_base_classes(engine)},
            "patches": engine.patches(),
        }

    @app.post("/patches/{name}", status_code=201)
    async def load(name: str, request: Request):
        if not PATCH_NAME.match(name):
            raise HTTPException(
                422, f"patch name {name!r}: use letters, digits and _, starting with a letter"
            )
        body = await request.body()
        path = uploads / f"{uuid.uuid4().hex}.safetensors"  # a fresh private file
        try:
            await run_in_threadpool(path.write_bytes, body)
            entry = await run_in_threadpool(engine.load_patch, name, path)
        except PatchFileError as err:  # named after the upload, not the private file
            path.unlink(missing_ok=True)
            message = str(err).replace(str(path), f"uploaded patch {name!r}")
            raise HTTPException(422, message) from None
        except ServingError as err:
            path.unlink(missing_ok=True)
            raise HTTPException(409, str(err)) from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        uploaded[name] = path
        return {"name": name, **entry}

    @app.delete("/patches/{name}", status_code=204)
    async def unload(name: str):
        try:
            await run_in_threadpool(engine.unload_patch, name)
        except UnknownPatchError as err:
            raise HTTPException(404, str(err)) from None
        file = uploaded.pop(name, None)
        if file is not None:
            file.unlink(missing_ok=True)
        return Response(status_code=204)

    @app.get("/health")
    async def health():
        return JSONResponse(engine.health())

    return app


def _base_classes(engine) -> dict:
    served = getattr(engine, "served", None)
    classes = served.metas[BASE].get("classes") if served is not None else None
    return {"classes": None if classes is None else [str(c) for c in classes]}


def named_patches(values) -> list:
    """``--patch`` values → files (each named as saved) and ``(name, file)`` pairs for
    ``NAME=FILE`` (a value that is an existing file is always taken as a file)."""
    out = []
    for value in values:
        name, sep, file = value.partition("=")
        if sep and PATCH_NAME.match(name) and not Path(value).is_file():
            out.append((name, file))
        else:
            out.append(value)
    return out
