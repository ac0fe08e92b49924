"""Datasets: checks that a config's data is where it says, and generated data for tests."""

from .paths import DatasetPathError, check_dataset_paths
from .synthetic import (
    DatasetExistsError,
    class_shapes,
    seg_metainfo,
    write_seg_dataset,
    write_voc_dataset,
)

__all__ = [
    "DatasetExistsError",
    "DatasetPathError",
    "check_dataset_paths",
    "class_shapes",
    "seg_metainfo",
    "write_seg_dataset",
    "write_voc_dataset",
]
