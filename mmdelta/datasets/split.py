"""A validation split carved deterministically from a training set (:class:`TrainValSplit`).

Each image belongs to the validation part when a stable hash of its identity falls below
``val_fraction``::

    u = int(md5(f"{seed}:{key}")[:16], 16) / 2**64        uniform in [0, 1)
    key = the image's path relative to its dataset's data_root (the path as given when it
          lies elsewhere), '/'-separated

so the split depends on neither the order of the images nor on which of them a dataset keeps
(mmdet drops images without boxes in train mode, not in test mode), nor on dataset wrappers
(``RepeatDataset`` repeats, ``ConcatDataset`` members …): an image is in one part whatever
dataset it is reached through. The two parts are complementary: ``part='fit'`` keeps the
images outside the validation part, ``part='val'`` those inside.

In a config (registered in MMEngine's root registry, so mmdet / mmseg configs find it)::

    train_dataloader = dict(dataset=dict(type="TrainValSplit", part="fit", dataset=TRAIN))
    val_dataloader = dict(dataset=dict(type="TrainValSplit", part="val", dataset=TRAIN_AS_TEST))

where ``TRAIN_AS_TEST`` is the training set with the test pipeline and ``test_mode=True``.
"""

from __future__ import annotations

import copy
import hashlib
import os
import os.path as osp

from mmengine.registry import DATASETS
from torch.utils.data import Dataset

__all__ = ["PARTS", "TrainValSplit", "image_key", "in_validation", "split_position"]

PARTS = ("fit", "val")
#: data_info keys that identify an image, in order of preference
IDENTITY_KEYS = ("img_path", "file_name", "filename", "img_id")


def split_position(key: str, seed: int = 0) -> float:
    """The image's place in [0, 1): md5 of ``f"{seed}:{key}"`` (its first 64 bits)."""
    digest = hashlib.md5(f"{seed}:{key}".encode()).hexdigest()
    return int(digest[:16], 16) / 2**64


def in_validation(key: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether the image ``key`` belongs to the validation part."""
    return split_position(key, seed) < val_fraction


def image_key(path: str, data_root: str | None = None) -> str:
    """The identity the split hashes: ``path`` relative to ``data_root`` when it lies inside
    it (so the split does not depend on where the data is), else ``path``; '/'-separated."""
    path = osp.normpath(str(path))
    if data_root:
        root = osp.abspath(str(data_root))
        full = osp.abspath(path)
        if full == root or full.startswith(root.rstrip(os.sep) + os.sep):
            path = osp.relpath(full, root)
    return path.replace(os.sep, "/")


def _leaf(dataset, idx: int):
    """``(dataset, index)`` of the non-wrapper dataset sample ``idx`` of ``dataset`` comes
    from (through ConcatDataset, RepeatDataset, ClassBalancedDataset and alike)."""
    for _ in range(32):
        locate = getattr(dataset, "_get_ori_dataset_idx", None)
        if locate is None:
            return dataset, idx
        if getattr(dataset, "datasets", None) is not None:  # ConcatDataset
            member, idx = locate(idx)
            dataset = dataset.datasets[member]
        elif getattr(dataset, "dataset", None) is not None:  # Repeat / ClassBalanced
            idx = locate(idx)
            dataset = dataset.dataset
        else:
            return dataset, idx
    return dataset, idx


def sample_identity(info: dict) -> str:
    """What identifies a data sample's image: the first of ``IDENTITY_KEYS`` it has."""
    for key in IDENTITY_KEYS:
        if info.get(key) is not None:
            return str(info[key])
    raise ValueError(
        f"TrainValSplit: a data sample has none of {IDENTITY_KEYS} to split by (keys: "
        f"{sorted(info)})"
    )


@DATASETS.register_module()
class TrainValSplit(Dataset):
    """The ``part`` (``'fit'`` or ``'val'``) of ``dataset`` (a config dict or a dataset)
    whose images a stable hash puts outside / inside the validation fraction (see the module
    docstring). Forwards ``metainfo``, ``get_data_info`` and items of the kept samples;
    ``indices`` are the kept samples' indices in ``dataset``."""

    def __init__(
        self,
        dataset: dict | Dataset,
        part: str = "fit",
        val_fraction: float = 0.15,
        seed: int = 0,
        lazy_init: bool = False,
    ):
        if part not in PARTS:
            raise ValueError(f"TrainValSplit: part must be one of {PARTS}, not {part!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"TrainValSplit: val_fraction must be in (0, 1), not {val_fraction}")
        self.dataset = DATASETS.build(dataset) if isinstance(dataset, dict) else dataset
        self.part, self.val_fraction, self.seed = part, float(val_fraction), int(seed)
        self.indices: list[int] = []
        self._fully_initialized = False
        if not lazy_init:
            self.full_init()

    @property
    def metainfo(self) -> dict:
        return copy.deepcopy(self.dataset.metainfo)

    def full_init(self) -> None:
        if self._fully_initialized:
            return
        if hasattr(self.dataset, "full_init"):
            self.dataset.full_init()
        want_val = self.part == "val"
        self.indices = [
            i
            for i in range(len(self.dataset))
            if in_validation(self.key(i), self.val_fraction, self.seed) == want_val
        ]
        self._fully_initialized = True

    def key(self, idx: int) -> str:
        """The split identity of sample ``idx`` of the inner dataset."""
        leaf, _ = _leaf(self.dataset, idx)
        return image_key(
            sample_identity(self.dataset.get_data_info(idx)), getattr(leaf, "data_root", None)
        )

    def image_paths(self) -> list[str]:
        """The kept samples' image paths (as the dataset reads them), each once, in order."""
        self.full_init()
        seen: dict[str, None] = {}
        for i in self.indices:
            seen.setdefault(sample_identity(self.dataset.get_data_info(i)), None)
        return list(seen)

    def get_data_info(self, idx: int) -> dict:
        self.full_init()
        return self.dataset.get_data_info(self.indices[idx])

    def __getitem__(self, idx: int):
        self.full_init()
        return self.dataset[self.indices[idx]]

    def __len__(self) -> int:
        self.full_init()
        return len(self.indices)

    def __repr__(self) -> str:
        return (
            f"TrainValSplit(part={self.part!r}, val_fraction={self.val_fraction}, "
            f"seed={self.seed}, {len(self)} of {len(self.dataset)} samples of "
            f"{type(self.dataset).__name__})"
        )
