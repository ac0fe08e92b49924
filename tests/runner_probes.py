"""Hooks the end-to-end tests add to runs of tools/train.py (imported via custom_imports).

* ``KillAfterIter``: SIGKILLs the process after iteration ``at`` (after its checkpoint hook),
  the way a crash or a pre-empted job ends a run.
* ``DeltaProbe``: per rank, writes which parameters require grad and which changed during
  training, and a fingerprint of the base state dict, to ``<out_dir>/rank<r>.json``.
* ``ResumeProbe``: writes the patch, optimiser and scheduler states a run starts training
  with (what ``--resume`` restored).
"""

import hashlib
import json
import os
import signal
from pathlib import Path

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from mmdelta import base_state_dict
from mmdelta.runner.model_setup import patch_root


def fingerprint(state: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(
            state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


@HOOKS.register_module()
class KillAfterIter(Hook):
    priority = "LOWEST"  # after CheckpointHook (VERY_LOW)

    def __init__(self, at: int):
        self.at = at

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


@HOOKS.register_module()
class DeltaProbe(Hook):
    priority = "LOWEST"

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.start: dict = {}

    def before_train(self, runner):
        model = patch_root(runner.model)
        self.start = {k: p.detach().clone() for k, p in model.named_parameters()}

    def after_run(self, runner):
        model = patch_root(runner.model)
        params = dict(model.named_parameters())
        changed = sorted(k for k, p in params.items() if not p.detach().equal(self.start[k]))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{runner.rank}.json").write_text(
            json.dumps(
                dict(
                    world_size=runner.world_size,
                    wrapped=type(runner.model).__name__,
                    requires_grad=sorted(k for k, p in params.items() if p.requires_grad),
                    changed=changed,
                    base_fingerprint=fingerprint(base_state_dict(model)),
                    delta_fingerprint=fingerprint(
                        {k: v for k, v in model.state_dict().items() if ".delta." in k}
                    ),
                )
            )
        )


@HOOKS.register_module()
class ResumeProbe(Hook):
    """Writes what the run holds when training starts (after ``load_or_resume``): the
    patch's tensors (Δ and patch-owned, every state-dict key with ``.delta.``), the optimiser
    and the parameter schedulers' states, and the iteration, to ``out`` (torch.save)."""

    priority = "LOWEST"

    def __init__(self, out: str):
        self.out = out

    def before_train(self, runner):
        model = patch_root(runner.model)
        torch.save(
            dict(
                iter=runner.iter,
                patch={k: v.clone() for k, v in model.state_dict().items() if ".delta." in k},
                optimizer=runner.optim_wrapper.state_dict(),
                param_schedulers=[s.state_dict() for s in runner.param_schedulers],
            ),
            self.out,
        )
