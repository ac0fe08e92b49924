"""Inference helpers: patched models for mmdet / mmseg, built so a patch is never dropped."""

from .inference import PatchNotFoundError, init_base_model, init_patched_model, patched_inferencer

__all__ = ["PatchNotFoundError", "init_base_model", "init_patched_model", "patched_inferencer"]
