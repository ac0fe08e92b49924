"""Inference helpers: patched models for mmdet / mmseg, built so a patch is never dropped, and
one base serving many patches side by side, and to concurrent callers each choosing its
patch."""

from .engine import PatchEngine, Prediction, UnknownPatchError
from .inference import PatchNotFoundError, init_base_model, init_patched_model, patched_inferencer
from .serving import MultiPatchInferencer, ServingError

__all__ = [
    "MultiPatchInferencer",
    "PatchEngine",
    "PatchNotFoundError",
    "Prediction",
    "ServingError",
    "UnknownPatchError",
    "init_base_model",
    "init_patched_model",
    "patched_inferencer",
]
