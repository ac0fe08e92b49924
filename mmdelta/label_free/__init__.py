"""Label-free domain patches: adapt a frozen base to a new environment from unlabelled images.

:func:`adapt_norm_stats` (AdaBN as a patch): the patch owns the base's BatchNorm layers and
holds their running statistics re-estimated on the new images; no labels, no gradients,
the base untouched. :func:`write_norm_patch` writes one as a file from a config, a
checkpoint and images (``tools/adapt_norm.py`` is its command line); ``tools/label_free_gap.py``
measures it on the main job's appearance-shift tasks.
"""

from ..datasets.images import IMAGE_SUFFIXES, NoImagesError, list_images
from .norm_stats import (
    LabelFreeError,
    adapt_norm_stats,
    image_only_pipeline,
    stats_layers,
    unlabelled_loader,
)
from .patch_file import write_norm_patch

__all__ = [
    "IMAGE_SUFFIXES",
    "LabelFreeError",
    "NoImagesError",
    "adapt_norm_stats",
    "image_only_pipeline",
    "list_images",
    "stats_layers",
    "unlabelled_loader",
    "write_norm_patch",
]
