"""Shared fixtures for the serving tests: a tiny Faster R-CNN (ResNet-18, tests/configs/
e2e_det_voc_tiny.py) or tiny segmenter (tests/configs/e2e_seg_tiny.py) with random weights,
patch files whose every Δ tensor is random, generated images — nothing downloaded — and the
single-image reference answer (``set_active_patch`` + ``model.test_step`` on a batch of
one, as ``MultiPatchInferencer`` runs it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

from mmdelta import apply_delta_patch, save_patch, set_active_patch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "e2e_det_voc_tiny.py"
TINY_SEG = REPO / "tests" / "configs" / "e2e_seg_tiny.py"
CLASSES = ("square", "disc", "bar")
NEW = ("triangle", "ring", "cross", "star")
SEG_OWN = ("background", "triangle", "ring")
SIZE = 96  # generated detection images are SIZE x SIZE


def build_model(cfg, state=None):
    """The config's model, random (``init_weights``) or with ``state``."""
    model = MODELS.build(cfg.model)
    if state is None:
        model.init_weights()
    else:
        model.load_state_dict(state)
    return model


def save_random_patch(cfg, state, patch_cfg, path, scale, seed):
    """A patch of the base ``state`` whose every tensor is moved off its initial value."""
    model = build_model(cfg, state)
    apply_delta_patch(model, patch_cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".delta." in name:
                p.add_(torch.randn(p.shape, generator=generator) * scale)
    return save_patch(model, path)


def det_fixture(tmp: Path, n_images: int = 2) -> dict:
    """Config (the 10 best boxes kept, whatever their score), base checkpoint, patches
    ``shift`` (low-rank, the base's classes) and ``newcls`` (its own 4 classes), a patch of
    another base (``foreign``) and a folder of ``n_images`` generated images."""
    from mmdelta.datasets.synthetic import write_voc_dataset

    config = tmp / "det.py"
    config.write_text(
        f"_base_ = {str(TINY)!r}\n"
        "model = dict(test_cfg=dict(rcnn=dict(score_thr=0.0, max_per_img=10)))\n"
    )
    cfg = Config.fromfile(str(config))
    init_default_scope("mmdet")
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    base = tmp / "base.pth"
    torch.save({"meta": {"dataset_meta": {"classes": CLASSES}}, "state_dict": state}, base)
    shift = save_random_patch(
        cfg, state, dict(name="shift", branch=dict(type="LowRankDelta", rank=4)),
        tmp / "shift.safetensors", scale=0.05, seed=1,
    )  # fmt: skip
    new = save_random_patch(
        cfg, state, dict(name="newcls", classes=list(NEW), base_classes=list(CLASSES)),
        tmp / "newcls.safetensors", scale=0.01, seed=2,
    )  # fmt: skip
    torch.manual_seed(1)  # a patch of another base: same architecture, other weights
    other_state = build_model(cfg).state_dict()
    foreign = save_random_patch(
        cfg, other_state, dict(name="foreign"), tmp / "foreign.safetensors", scale=0.0, seed=3
    )
    data = Path(
        write_voc_dataset(tmp / "data", CLASSES, 1, n_images, image_size=(SIZE, SIZE), seed=0)
    )
    images = tmp / "images"
    images.mkdir()
    for src in sorted((data / "VOC2007" / "JPEGImages").glob("*.jpg"))[1:]:  # the test images
        shutil.copy(src, images / src.name)
    return dict(
        tmp=tmp, config=config, base=base, shift=shift, new=new, foreign=foreign, images=images,
        cfg=cfg, state=state,
    )  # fmt: skip


def seg_fixture(tmp: Path) -> dict:
    """Tiny segmenter: base checkpoint (4 classes), a patch ``newcls`` with its own 3
    classes, one generated 64x64 image."""
    from mmdelta.datasets.synthetic import write_seg_dataset

    cfg = Config.fromfile(str(TINY_SEG))
    init_default_scope("mmseg")
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    base = tmp / "base.pth"
    meta = {"classes": ("background", *CLASSES)}
    torch.save({"meta": {"dataset_meta": meta}, "state_dict": state}, base)
    new = save_random_patch(
        cfg, state, dict(name="newcls", classes=list(SEG_OWN)), tmp / "n.safetensors", 0.05, 4
    )
    data = Path(write_seg_dataset(tmp / "data", CLASSES, 1, 1, image_size=(64, 64), seed=0))
    (image,) = sorted((data / "img_dir" / "val").iterdir())
    return dict(config=TINY_SEG, base=base, new=new, image=image, classes=meta["classes"])


@torch.no_grad()
def single_image_answer(served, image, patch: str | None):
    """``patch``'s (None: the base's) answer to one image on a ``MultiPatchInferencer``:
    the pipeline, that patch active, ``model.test_step`` on a batch of one."""
    set_active_patch(served.model, patch)
    try:
        (sample,) = served.model.test_step(served.collate([served.inputs(image)]))
    finally:
        set_active_patch(served.model, None)
    return sample
