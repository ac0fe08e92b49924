"""mmdelta: Δ-Patching for OpenMMLab detectors and segmenters.

A frozen base model gets small, zero-initialised trainable Δ branches; with the patch
inactive the model is the base model bit for bit.
"""

from .branches import (
    AdditiveDelta,
    BlockDelta,
    DeltaBranch,
    FoldingDelta,
    LowRankDelta,
    PatchOwned,
    PatchPart,
    ScaleShiftDelta,
    SideDelta,
)
from .patching import (
    DeltaPatchConfigError,
    PatchFileError,
    PatchSummary,
    active_patch,
    apply_delta_patch,
    base_state_dict,
    delta_disabled,
    get_delta_patch_cfg,
    load_patch,
    merge_patch,
    patch_classes,
    patch_names,
    remove_patch,
    save_patch,
    set_active_patch,
)
from .registry import DELTA_BRANCHES
from .runner import DeltaPatchHook, DeltaRunner
from .version import __version__

__all__ = [
    "DELTA_BRANCHES",
    "AdditiveDelta",
    "BlockDelta",
    "DeltaBranch",
    "DeltaPatchConfigError",
    "DeltaPatchHook",
    "DeltaRunner",
    "FoldingDelta",
    "LowRankDelta",
    "PatchFileError",
    "PatchOwned",
    "PatchPart",
    "PatchSummary",
    "ScaleShiftDelta",
    "SideDelta",
    "__version__",
    "active_patch",
    "apply_delta_patch",
    "base_state_dict",
    "delta_disabled",
    "get_delta_patch_cfg",
    "load_patch",
    "merge_patch",
    "patch_classes",
    "patch_names",
    "remove_patch",
    "save_patch",
    "set_active_patch",
]
