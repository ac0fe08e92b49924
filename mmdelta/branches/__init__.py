"""What a patch adds to a frozen layer: Δ branch types and patch-owned layer copies."""

from .base import DeltaBranch, LayerTooSmall
from .block import BlockDelta
from .low_rank import LowRankDelta
from .owned import PatchOwned
from .scale_shift import ScaleShiftDelta
from .side import SideDelta

__all__ = [
    "BlockDelta",
    "DeltaBranch",
    "LayerTooSmall",
    "LowRankDelta",
    "PatchOwned",
    "ScaleShiftDelta",
    "SideDelta",
]
