"""Inference helpers: patched models for mmdet / mmseg, built so a patch is never dropped."""
