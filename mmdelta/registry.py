"""Registries of mmdelta.

``DELTA_BRANCHES`` holds the Δ branch types a ``delta_patch`` config selects by
``branch=dict(type=...)``. Every entry is an ``nn.Module`` class whose constructor takes the
frozen layer it patches as ``layer`` plus its own keyword options (see
:class:`mmdelta.branches.DeltaBranch`).
"""

from mmengine.registry import Registry

DELTA_BRANCHES = Registry("delta branch", locations=["mmdelta.branches"])
