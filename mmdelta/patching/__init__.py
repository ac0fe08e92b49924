"""Placing, switching, saving and merging Δ patches on OpenMMLab models."""

from .apply import BuiltPatch, apply_delta_patch, attach_patch, build_patch
from .config import DeltaPatchConfigError
from .files import PatchFileError, load_patch, read_patch_file, save_patch
from .merge import merge_patch
from .slot import NotRoutable
from .state import (
    active_patch,
    base_state_dict,
    delta_disabled,
    get_delta_patch_cfg,
    patch_classes,
    patch_names,
    remove_patch,
    resolve_patch_name,
    routed_patches,
    set_active_patch,
)
from .summary import PatchSummary

__all__ = [
    "BuiltPatch",
    "DeltaPatchConfigError",
    "NotRoutable",
    "PatchFileError",
    "PatchSummary",
    "active_patch",
    "apply_delta_patch",
    "attach_patch",
    "base_state_dict",
    "build_patch",
    "delta_disabled",
    "get_delta_patch_cfg",
    "load_patch",
    "merge_patch",
    "patch_classes",
    "patch_names",
    "read_patch_file",
    "remove_patch",
    "resolve_patch_name",
    "routed_patches",
    "save_patch",
    "set_active_patch",
]
