"""Datasets: checks that a config's data is where it says, generated data for tests and a
deterministic train / validation split of a training set (:class:`TrainValSplit`), and tiny
datasets in the real VOC0712 / COCO / Cityscapes / ADE20K formats (:mod:`.real_formats`)."""

from .images import IMAGE_SUFFIXES, NoImagesError, list_images
from .paths import DatasetPathError, check_dataset_paths
from .real_formats import (
    rehearsal_data,
    write_ade20k,
    write_cityscapes,
    write_coco,
    write_voc0712,
)
from .split import TrainValSplit, image_key, in_validation
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
    "TrainValSplit",
    "check_dataset_paths",
    "class_shapes",
    "image_key",
    "in_validation",
    "list_images",
    "rehearsal_data",
    "seg_metainfo",
    "write_ade20k",
    "write_cityscapes",
    "write_coco",
    "write_seg_dataset",
    "write_voc0712",
    "write_voc_dataset",
]
