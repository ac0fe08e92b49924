"""Registries of mmdelta, scoped the OpenMMLab way.

``DELTA_BRANCHES`` holds the Δ branch types a ``delta_patch`` config selects by
``branch=dict(type=...)``. It is a child of mmengine's root ``MODELS`` registry (scope
``mmdelta``, like ``mmdet.registry.MODELS``), filled by importing ``mmdelta.branches``
(``locations``), so ``MODELS.build(dict(type='mmdelta.LowRankDelta', layer=conv))`` works
from any scope. Building from ``DELTA_BRANCHES`` itself always looks in its own scope: a
default scope set by an mmdet / mmseg runner (which would send the lookup to that scope's
``MODELS``) does not hide the branch types. Every entry is a
:class:`mmdelta.branches.DeltaBranch` subclass whose constructor takes the frozen layer it
patches as ``layer`` plus its own keyword options.

The runner, hooks and dataset wrappers register in mmengine's root ``RUNNERS`` / ``HOOKS``
/ ``DATASETS``, so configs of any scope (``mmdet``, ``mmseg``) find them by plain name.
"""

from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import DefaultScope, Registry, build_from_cfg

SCOPE = "mmdelta"


def _build_in_own_scope(cfg, registry: Registry, default_args=None):
    """``build_from_cfg`` with ``mmdelta`` as the default scope for the call."""
    with DefaultScope.overwrite_default_scope(SCOPE):
        return build_from_cfg(cfg, registry, default_args)


DELTA_BRANCHES = Registry(
    "delta branch",
    parent=MMENGINE_MODELS,
    scope=SCOPE,
    locations=["mmdelta.branches"],
    build_func=_build_in_own_scope,
)
