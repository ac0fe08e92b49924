"""mmdelta: Δ-Patching for OpenMMLab detectors and segmenters.

A frozen base model gets small, zero-initialised trainable Δ branches; with the patch
inactive the model is the base model bit for bit.

The top-level API is the branch kinds and types (:mod:`mmdelta.branches`), the patch
lifecycle (:mod:`mmdelta.patching`: apply, switch, save, load, merge, remove) and the
runner pieces a config names (``DeltaRunner``, ``DeltaPatchHook``). The applications
(:mod:`mmdelta.apps`) are never imported from here.
"""

from . import branches, patching
from .branches import *  # noqa: F403 (its __all__)
from .patching import *  # noqa: F403 (its __all__)
from .registry import DELTA_BRANCHES
from .runner import DeltaPatchHook, DeltaRunner
from .version import __version__

__all__ = [
    "DELTA_BRANCHES",
    "DeltaPatchHook",
    "DeltaRunner",
    "__version__",
    *branches.__all__,
    *patching.__all__,
]
