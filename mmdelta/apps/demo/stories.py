"""What the main job runs: a *story* is a base task plus the patching tasks built on it.

Each task names its mmdet / mmseg config (``configs/demo/``) and the generated data it
trains and tests on (:mod:`mmdelta.datasets.synthetic` arguments). A *size* scales the
data and the schedules: ``full`` is the real demo, ``tiny`` a seconds-long smoke run of the
same code path (tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ...datasets.synthetic import write_seg_dataset, write_voc_dataset


@dataclass(frozen=True)
class Task:
    """One dataset and the config that trains on it.

    ``same_classes``: the task uses the base's classes, so the base itself can be scored on
    it (the appearance shift); a new-class task cannot be scored with the base's head.
    """

    name: str
    title: str
    config: str  # file name under the configs folder
    classes: tuple[str, ...]
    seed: int
    style: str = "base"
    same_classes: bool = True


@dataclass(frozen=True)
class Story:
    """A base task and its patching tasks, for one model family."""

    name: str
    title: str
    writer: Callable[..., str]
    base: Task
    tasks: tuple[Task, ...]
    metric_key: str  # key of the evaluator's result
    metric_label: str
    metric_scale: float  # result * scale = a fraction in [0, 1]
    data: dict = field(default_factory=dict)  # writer arguments beyond the task's own


SHAPES = ("square", "disc", "bar")
NEW_SHAPES = ("triangle", "ring", "cross")


def _tasks(prefix: str) -> tuple[Task, tuple[Task, ...]]:
    """The base task and the two patching tasks of every story; configs
    ``<prefix>_shapes_<task>.py``."""
    base = Task("base", "base task: dark shapes on light backgrounds", "", SHAPES, seed=0)
    shifted = Task(
        "shifted", "appearance shift: light shapes on coloured clutter", "", SHAPES, 1, "shifted"
    )
    new = Task(
        "newclasses", "new classes: triangle, ring, cross", "", NEW_SHAPES, 2, same_classes=False
    )
    base, shifted, new = (
        replace(task, config=f"{prefix}_shapes_{task.name}.py") for task in (base, shifted, new)
    )
    return base, (shifted, new)


_DET_BASE, _DET_TASKS = _tasks("det")
_SEG_BASE, _SEG_TASKS = _tasks("seg")

STORIES = {
    "det": Story(
        name="det",
        title="Faster R-CNN (ResNet-18 FPN) on generated VOC-layout data",
        writer=write_voc_dataset,
        base=_DET_BASE,
        tasks=_DET_TASKS,
        metric_key="pascal_voc/mAP",
        metric_label="mAP@0.5",
        metric_scale=1.0,
        data=dict(
            image_size=(192, 192),
            objects_per_image=(2, 5),
            object_size=(0.15, 0.45),
            folder="shapes",  # not VOC2007: VOCMetric would print VOC's class names
        ),
    ),
    "seg": Story(
        name="seg",
        title="Semantic FPN (ResNetV1c-18) on generated mmseg-layout data",
        writer=write_seg_dataset,
        base=_SEG_BASE,
        tasks=_SEG_TASKS,
        metric_key="mIoU",
        metric_label="mIoU",
        metric_scale=0.01,
        data=dict(image_size=(128, 128), objects_per_image=(2, 5), object_size=(0.2, 0.5)),
    ),
}


@dataclass(frozen=True)
class Size:
    """Images per split and training iterations (None: the config's own schedule)."""

    name: str
    num_train: int
    num_test: int
    base_iters: int | None = None
    patch_iters: int | None = None
    pictures: int = 3


SIZES = {
    "full": Size("full", num_train=600, num_test=120),
    "tiny": Size("tiny", num_train=8, num_test=4, base_iters=2, patch_iters=2, pictures=2),
}
