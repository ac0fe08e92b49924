"""MMEngine integration: the runner that applies ``delta_patch`` while building the model.

Importing :mod:`mmdelta` registers :class:`DeltaRunner` (``runner_type='DeltaRunner'``) and
:class:`DeltaPatchHook` in MMEngine's root registries, which mmdet's and mmseg's inherit.
"""

from .checkpoint import CheckpointError, mmengine_checkpoints, read_checkpoint
from .delta_runner import PATCH_FILE_KEY, DeltaRunner
from .hooks import DeltaPatchHook
from .random_state import RandomStateHook

__all__ = [
    "PATCH_FILE_KEY",
    "CheckpointError",
    "DeltaPatchHook",
    "DeltaRunner",
    "RandomStateHook",
    "mmengine_checkpoints",
    "read_checkpoint",
]
