"""The contract every Δ branch type fulfils."""

import torch
from torch import nn


class LayerTooSmall(Exception):
    """Raised by a branch constructor when the layer is too small for the smallest branch.

    The patcher skips such a layer and lists it in the summary; it is not a user error.
    """


class DeltaBranch(nn.Module):
    """A trainable branch Δ computed beside one frozen layer ``f``.

    While its patch is active the patched layer returns ``f(x) + Δ(x)``; while it is
    inactive the layer returns ``f(x)`` and Δ is not evaluated at all.

    Invariants of every branch type:

    * ``forward(x)`` has exactly the shape of ``f(x)`` and is exactly zero at construction,
      so a freshly patched model computes the base function bit for bit;
    * the branch never reads or writes the frozen layer's parameters or buffers;
    * parameters are plain ``nn.Parameter`` attributes (no ``nn.Conv2d``/``nn.Linear``
      children), so OpenMMLab ``init_cfg`` initialisers that select layers by class name
      (e.g. FPN's ``Xavier(layer='Conv2d')``) never re-initialise them.
    """

    #: whether :meth:`delta_weight` folds the branch into the layer's weight.
    mergeable = False

    def __init__(self, layer: nn.Module):
        super().__init__()
        # a type-name string (not the module itself) so the layer is not registered twice
        self.layer_type = type(layer).__name__

    def delta_weight(self) -> torch.Tensor:
        """ΔW with the shape of the layer's weight, for ``f(x; W + ΔW) == f(x) + Δ(x)``."""
        raise NotImplementedError(f"{type(self).__name__} cannot be folded into its layer")
