"""Placing, switching and freezing Δ patches on OpenMMLab models."""

from .apply import apply_delta_patch
from .config import DeltaPatchConfigError
from .state import active_patch, base_state_dict, delta_disabled, get_delta_patch_cfg
from .summary import PatchSummary

__all__ = [
    "DeltaPatchConfigError",
    "PatchSummary",
    "active_patch",
    "apply_delta_patch",
    "base_state_dict",
    "delta_disabled",
    "get_delta_patch_cfg",
]
