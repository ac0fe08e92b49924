"""Δ branch types: small trainable modules computed beside a frozen layer."""

from .base import DeltaBranch, LayerTooSmall
from .low_rank import LowRankDelta

__all__ = ["DeltaBranch", "LayerTooSmall", "LowRankDelta"]
