"""One base model serving many patches to concurrent callers: :class:`PatchEngine`.

Every request names its patch (``None``: the base). One worker thread owns the model: it
alone switches the selection, loads and unloads patches and runs forwards, so no request
ever runs under another request's patch, however many threads submit. Requests that
arrive while the worker is busy are batched (up to ``max_batch``, waiting at most
``max_wait_ms`` for more) and each batch runs by the strategies of
:mod:`mmdelta.apis.batching`: ``group`` (bit for bit the single-image answers) or
``route`` (one forward, each sample with its own Δ; float32 batching tolerance), chosen per
batch by ``strategy="auto"``'s rule.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from ..patching.files import base_fingerprint
from .batching import STRATEGIES, MixedBatchRunner
from .serving import BASE, MultiPatchInferencer, ServingError


class UnknownPatchError(KeyError):
    """A request or an unload names a patch that is not loaded."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


@dataclass
class Prediction:
    """The answer to one request: ``sample`` as ``model.test_step`` returns it
    (``DetDataSample`` with ``pred_instances`` in original-image pixels /
    ``SegDataSample`` with ``pred_sem_seg``), for ``patch`` (``None``: the base), with that
    model's class names; ``strategy``: how its batch ran; ``batch``: its batch's size."""

    patch: str | None
    classes: tuple[str, ...] | None
    sample: object
    summary: dict
    strategy: str
    batch: int


@dataclass
class _Request:
    inputs: dict  # the pipeline's output for one image
    patch: str | None
    future: Future = field(default_factory=Future)


@dataclass
class _Control:
    run: Callable[[], object]
    future: Future = field(default_factory=Future)


_STOP = object()


class PatchEngine:
    """A base model and its patches behind a thread-safe request queue.

    Args:
        config, checkpoint, patches, device: as :class:`MultiPatchInferencer` (patches may
            be empty; more can be loaded at run time).
        max_batch: most requests run as one batch.
        max_wait_ms: how long the worker waits for more requests once one is there.
        strategy: ``"auto"``, ``"group"`` or ``"route"`` (:mod:`mmdelta.apis.batching`).
        route_min_models: ``auto`` routes when at least this many distinct models are routable.
        score_thr: detections below it are left out of each prediction's ``summary``.
    """

    def __init__(
        self,
        config,
        checkpoint,
        patches=(),
        *,
        device: str = "cpu",
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        strategy: str = "auto",
        route_min_models: int = 2,
        score_thr: float = 0.3,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.served = MultiPatchInferencer(config, checkpoint, patches, device=device)
        self.task = self.served.task
        self.max_batch, self.max_wait = int(max_batch), float(max_wait_ms) / 1000
        self.runner = MixedBatchRunner(self.served, strategy, route_min_models)
        self.stats = self.runner.stats
        self.score_thr = float(score_thr)
        self.base_fingerprint = base_fingerprint(self.served.model)
        self._queue: queue.Queue = queue.Queue()
        self._names = frozenset(self.served.patches)  # read by callers, written by the worker
        self._worker = threading.Thread(target=self._loop, name="mmdelta-engine", daemon=True)
        self._worker.start()

    # --------------------------------------------------------------------- callers

    def submit(self, image, patch: str | None = None) -> Future:
        """Queues one image (a path or an ``HxWx3`` BGR ``uint8`` array) for ``patch``;
        the future resolves to a :class:`Prediction`. Thread-safe. Raises
        :class:`UnknownPatchError` at once for a patch that is not loaded (a patch unloaded
        while the request waits fails its future the same way)."""
        self._check_name(patch)
        request = _Request(self.served.inputs(image), patch)
        self._queue.put(request)
        return request.future

    def predict(self, images, patches) -> list[Prediction]:
        """``images[i]`` with ``patches[i]`` (``None``: the base), batched by the worker."""
        if len(images) != len(patches):
            raise ValueError(f"{len(images)} images but {len(patches)} patch names")
        futures = [self.submit(image, patch) for image, patch in zip(images, patches, strict=True)]
        return [f.result() for f in futures]

    def load_patch(self, name: str, path) -> dict:
        """Loads patch file ``path`` under ``name`` between two batches; returns its
        :meth:`patches` entry. A bad file (``PatchFileError``) or a name in use
        (``ServingError``) changes nothing."""

        def run():
            self.served.add_patch(name, path)
            self._names = frozenset(self.served.patches)
            return self.patches()[name]

        return self._control(run)

    def unload_patch(self, name: str) -> None:
        """Unloads patch ``name`` between two batches (requests for it that are still
        queued fail with :class:`UnknownPatchError`)."""

        def run():
            if name not in self.served.patches:
                raise UnknownPatchError(
                    f"no patch {name!r} is loaded; loaded: {sorted(self.served.patches)}"
                )
            self.served.remove_patch(name)
            self._names = frozenset(self.served.patches)
            self.runner.forget(name)

        self._control(run)

    def patches(self) -> dict[str, dict]:
        """Patch name -> ``{"file", "classes", "own_classes"}`` for every loaded patch."""
        return self.served.patch_entries()

    def health(self) -> dict:
        return {
            "status": "ok" if self._worker.is_alive() else "stopped",
            "task": self.task,
            "patches": sorted(self._names),
            "queued": self._queue.qsize(),
            "base_fingerprint": self.base_fingerprint,
            **{k: int(v) for k, v in self.stats.items()},
        }

    def close(self) -> None:
        """Stops the worker after the queued work (idempotent)."""
        if self._worker.is_alive():
            self._queue.put(_STOP)
            self._worker.join()

    def __enter__(self) -> PatchEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------- worker

    def _check_name(self, patch: str | None) -> None:
        if patch is not None and patch not in self._names:
            raise UnknownPatchError(f"no patch {patch!r} is loaded; loaded: {sorted(self._names)}")

    def _control(self, run):
        if threading.current_thread() is self._worker:
            return run()
        job = _Control(run)
        self._queue.put(job)
        return job.future.result()

    def _loop(self) -> None:
        pending = None
        while True:
            item = pending if pending is not None else self._queue.get()
            pending = None
            if item is _STOP:
                return
            if isinstance(item, _Control):
                _resolve(item.future, item.run)
                continue
            batch, pending = self._gather(item)
            self._serve(batch)

    def _gather(self, first: _Request) -> tuple[list[_Request], object]:
        """``first`` and whatever requests follow within ``max_wait`` (up to ``max_batch``);
        a control job or the stop mark ends the batch and is returned to run next."""
        batch, deadline = [first], time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not isinstance(item, _Request):
                return batch, item
            batch.append(item)
        return batch, None

    def _serve(self, batch: list[_Request]) -> None:
        live = []
        for request in batch:
            if request.patch is not None and request.patch not in self.served.patches:
                request.future.set_exception(
                    UnknownPatchError(f"patch {request.patch!r} was unloaded")
                )
            else:
                live.append(request)
        if not live:
            return
        try:
            answers = self.runner.run([(r.inputs, r.patch) for r in live])
        except Exception as err:  # every waiting caller hears of it
            for request in live:
                request.future.set_exception(err)
            return
        for request, (sample, strategy) in zip(live, answers, strict=True):
            self._answer(request, sample, strategy, len(live))

    def _answer(self, request: _Request, sample, strategy: str, size: int) -> None:
        key = BASE if request.patch is None else request.patch
        meta = self.served.metas[key]
        summary = self.served.summary(sample, key, self.score_thr)
        request.future.set_result(
            Prediction(request.patch, meta.get("classes"), sample, summary, strategy, size)
        )


def _resolve(future: Future, run) -> None:
    try:
        future.set_result(run())
    except Exception as err:
        future.set_exception(err)


def decode_image(data: bytes) -> np.ndarray:
    """An encoded image (PNG, JPEG, …) as an ``HxWx3`` BGR ``uint8`` array; ``ServingError``
    for bytes that are no image."""
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise ServingError("the request body is not an image cv2 can decode (PNG, JPEG, …)")
    return image
