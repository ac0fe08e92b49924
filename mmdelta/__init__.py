"""mmdelta: Δ-Patching for OpenMMLab detectors and segmenters.

A frozen base model gets small, zero-initialised trainable Δ branches; with the patch
inactive the model is the base model bit for bit.
"""

from .branches import DeltaBranch, LowRankDelta
from .patching import (
    DeltaPatchConfigError,
    PatchSummary,
    active_patch,
    apply_delta_patch,
    base_state_dict,
    delta_disabled,
    get_delta_patch_cfg,
)
from .registry import DELTA_BRANCHES

__version__ = "0.1.0"

__all__ = [
    "DELTA_BRANCHES",
    "DeltaBranch",
    "DeltaPatchConfigError",
    "LowRankDelta",
    "PatchSummary",
    "__version__",
    "active_patch",
    "apply_delta_patch",
    "base_state_dict",
    "delta_disabled",
    "get_delta_patch_cfg",
]
