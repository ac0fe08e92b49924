"""Datasets: checks that a config's data is where it says, and generated data for tests."""

from .images import IMAGE_SUFFIXES, NoImagesError, list_images
from .paths import DatasetPathError, check_dataset_paths
from .synthetic import (
    DatasetExistsError,
    class_shapes,
    seg_metainfo,
    write_seg_dataset,
    write_voc_dataset,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "DatasetExistsError",
    "DatasetPathError",
    "NoImagesError",
    "check_dataset_paths",
    "class_shapes",
    "list_images",
    "seg_metainfo",
    "write_seg_dataset",
    "write_voc_dataset",
]
