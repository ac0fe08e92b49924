"""Registries of mmdelta, scoped the OpenMMLab way.

``DELTA_BRANCHES`` holds the Δ branch types a ``delta_patch`` config selects by
``branch=dict(type=...)``. It is a child of mmengine's root ``MODELS`` registry (scope
``mmdelta``, like ``mmdet.registry.MODELS``), filled by importing ``mmdelta.branches``
(``locations``). Every entry is a :class:`mmdelta.branches.DeltaBranch` subclass whose
constructor takes the frozen layer it patches as ``layer`` plus its own keyword options.

The runner, hooks and dataset wrappers register in mmengine's root ``RUNNERS`` / ``HOOKS``
/ ``DATASETS``, so configs of any scope (``mmdet``, ``mmseg``) find them by plain name.
"""

from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

DELTA_BRANCHES = Registry(
    "delta branch", parent=MMENGINE_MODELS, scope="mmdelta", locations=["mmdelta.branches"]
)
