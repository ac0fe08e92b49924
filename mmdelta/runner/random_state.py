"""Bitwise resume: the random streams a run was using travel with its checkpoints.

mmengine saves no random state, and ``--resume`` re-seeds the process and then skips the
batches already trained (loading them, so their random augmentations draw numbers): the
resumed run draws other flips, crops and RPN/RoI samples than the run it continues.
:class:`RandomStateHook`, which ``DeltaRunner`` adds to every patch run, closes the gap:

* every checkpoint gets ``checkpoint["mmdelta_random_state"]``: Python's, NumPy's and
  torch's (CPU and CUDA) generator states at the moment it is written;
* after a resume they are restored right before the first batch the resumed run trains on
  (after the skipped batches: iteration-based loops; at the epoch start: epoch-based);
* validation runs inside a saved-and-restored random state, so it never moves training's
  streams (the checkpoint is written before the validation of the same iteration).

Invariant (one process, data loading in the main process or in workers seeded by the
config's ``randomness.seed``; deterministic kernels): a run killed after a checkpoint and
resumed trains on the same batches, with the same random draws, as the uninterrupted run —
the same final weights, bit for bit. With several processes (DDP) each rank has its own
streams and only rank 0's are saved: they are not restored (logged).
"""

import random

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

KEY = "mmdelta_random_state"


def capture() -> dict:
    """The process's random states: ``python`` (tuple), ``numpy`` (tuple with a uint32
    array), ``torch`` (uint8 tensor) and ``cuda`` (list of uint8 tensors, empty without)."""
    return dict(
        python=random.getstate(),
        numpy=np.random.get_state(),
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    )


def restore(state: dict) -> None:
    """Sets the states ``capture`` returned (CUDA ones only where the devices match)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


def _as_python(state) -> tuple:
    """``random.setstate`` needs tuples; a checkpoint round trip may give lists."""
    return tuple(_as_python(x) for x in state) if isinstance(state, list | tuple) else state


class _RestoreBeforeBatch:
    """Wraps a train loop's data iterator: before call ``at`` (0-based) it restores
    ``state`` and puts the original iterator back; calls before it pass through."""

    def __init__(self, loop, state: dict, at: int):
        self.loop, self.inner, self.state, self.at, self.calls = (
            loop,
            loop.dataloader_iterator,
            state,
            at,
            0,
        )

    def __iter__(self):
        return self

    def __next__(self):
        if self.calls == self.at:
            restore(self.state)
            self.loop.dataloader_iterator = self.inner
        self.calls += 1
        return next(self.inner)

    def __getattr__(self, name):  # the rest of _InfiniteDataloaderIterator's interface
        return getattr(self.inner, name)


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Saves random states with checkpoints, restores them on resume, and keeps validation
    from consuming training's random numbers. Added by ``DeltaRunner``; see the module."""

    priority = "VERY_HIGH"

    def __init__(self):
        self._resumed: dict | None = None
        self._outside_val: dict | None = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint[KEY] = capture()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get(KEY)
        if state is None or not runner._resume:
            return  # a base or an older checkpoint: nothing to restore
        if runner.world_size > 1:
            runner.logger.info(
                "mmdelta: random states are restored on resume only in single-process runs"
            )
            return
        self._resumed = dict(state, python=_as_python(state["python"]))

    def before_train_epoch(self, runner) -> None:
        if self._resumed is None:
            return
        state, self._resumed = self._resumed, None
        loop = runner.train_loop
        if hasattr(loop, "dataloader_iterator"):  # iteration-based: after the skipped batches
            loop.dataloader_iterator = _RestoreBeforeBatch(loop, state, at=loop.iter)
        else:  # epoch-based: resumes at an epoch start
            restore(state)
        runner.logger.info("mmdelta: random states restored from the checkpoint")

    def before_val(self, runner) -> None:
        self._outside_val = capture()

    def after_val(self, runner) -> None:
        if self._outside_val is not None:
            restore(self._outside_val)
            self._outside_val = None
