"""What a patch adds to a frozen layer: Δ branch types and patch-owned layer copies.

Kinds (:mod:`.base`): :class:`PatchPart` is what a slot holds; a :class:`DeltaBranch` is a
registered Δ type, either :class:`AdditiveDelta` (``f(x) + Δ(x)``: :class:`BlockDelta`,
:class:`SideDelta`) or :class:`FoldingDelta` (``f`` with Δ folded into its tensors:
:class:`ScaleShiftDelta`), or both (:class:`LowRankDelta`, per call); :class:`PatchOwned`
is the patch's own copy of a layer.
"""

from .base import (
    PATCHABLE_LAYERS,
    AdditiveDelta,
    DeltaBranch,
    FoldingDelta,
    LayerTooSmall,
    PatchPart,
)
from .block import BlockDelta
from .low_rank import LowRankDelta
from .owned import PatchOwned
from .scale_shift import ScaleShiftDelta
from .side import SideDelta

__all__ = [
    "PATCHABLE_LAYERS",
    "AdditiveDelta",
    "BlockDelta",
    "DeltaBranch",
    "FoldingDelta",
    "LayerTooSmall",
    "LowRankDelta",
    "PatchOwned",
    "PatchPart",
    "ScaleShiftDelta",
    "SideDelta",
]
