"""Label-free domain patches: adapt a frozen base to a new environment from unlabelled images.

:func:`adapt_norm_stats` (AdaBN as a patch): the patch owns the base's BatchNorm layers and
holds their running statistics re-estimated on the new images; no labels, no gradients,
the base untouched. :func:`write_norm_patch` writes one as a file from a config, a
checkpoint and images (``tools/adapt_norm.py`` is its command line); ``tools/label_free_gap.py``
measures it on the main job's appearance-shift tasks. :func:`self_train` trains an ordinary
Δ patch on confident pseudo-labels of an AdaBN teacher (``tools/adapt_label_free.py``).
"""

from ..datasets.images import IMAGE_SUFFIXES, NoImagesError, list_images
from ..patching import DeltaPatchConfigError
from ..runner.checkpoint import CheckpointError
from .norm_stats import (
    LabelFreeError,
    adapt_norm_stats,
    image_only_pipeline,
    stats_layers,
    unlabelled_loader,
)
from .patch_file import write_norm_patch
from .self_training import RoundStats, choose_threshold, pseudo_label_quality, self_train

#: what the label-free commands (tools/adapt_norm.py, tools/adapt_label_free.py) report as a
#: user's mistake (exit status 2, the message naming what to fix) rather than a traceback
USER_ERRORS = (
    LabelFreeError,
    NoImagesError,
    DeltaPatchConfigError,
    CheckpointError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    ValueError,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "USER_ERRORS",
    "LabelFreeError",
    "NoImagesError",
    "RoundStats",
    "adapt_norm_stats",
    "choose_threshold",
    "image_only_pipeline",
    "list_images",
    "pseudo_label_quality",
    "self_train",
    "stats_layers",
    "unlabelled_loader",
    "write_norm_patch",
]
