"""Real OpenMMLab models for the tests, built offline from the installed configs.

Each entry of ``MODELS`` is a config in ``tests/configs`` whose ``_base_`` is an upstream
``mmdet::`` / ``mmseg::`` / ``mmpretrain::`` config, shrunk where noted and with
``init_cfg=None`` (nothing is downloaded). ``make_batch`` returns a raw (not yet
preprocessed) batch in the format each library's data pipeline produces.
"""

import copy
import functools
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from mmdelta import exactness

CONFIGS = Path(__file__).parent / "configs"
#: test model -> the OpenMMLab package whose registry builds it
MODELS = {
    "faster_rcnn_r50_fpn": "mmdet",
    "retinanet_r18_fpn": "mmdet",
    "mask_rcnn_r18_fpn": "mmdet",
    "deeplabv3_r18_v1c": "mmseg",
    "upernet_r18": "mmseg",
    "upernet_convnext": "mmseg",
    "convnext_classifier": "mmpretrain",
}


def _registry(scope: str):
    if scope == "mmdet":
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    elif scope == "mmseg":
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    else:
        from mmpretrain.registry import MODELS
        from mmpretrain.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    return MODELS


def register_scopes() -> None:
    """Registers mmdet, mmseg and mmpretrain modules (for ``scope.Type`` names)."""
    for scope in ("mmdet", "mmseg", "mmpretrain"):
        _registry(scope)


def load_cfg(name: str) -> Config:
    return Config.fromfile(str(CONFIGS / f"{name}.py"))


@functools.cache
def _built(name: str, seed: int) -> torch.nn.Module:
    """The model as built and initialised, once per test process (never handed out). The
    build draws from its own generator state: the caller's global random state is the same
    whether the model was built now or earlier."""
    scope = MODELS[name]
    registry = _registry(scope)
    with torch.random.fork_rng(devices=[]), DefaultScope.overwrite_default_scope(scope):
        torch.manual_seed(seed)
        model = registry.build(load_cfg(name).model)
    return model.eval()


def build_model(name: str, seed: int = 0) -> torch.nn.Module:
    """The model of test config ``name``, randomly initialised with ``seed``, in eval mode: a
    fresh copy of the one built for this ``(name, seed)`` (building a ResNet-50 detector
    costs more than copying it), so a test may patch or train it freely."""
    return copy.deepcopy(_built(name, seed))


def build_pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two independent copies of a model holding the same (random) weights."""
    return build_model(name), build_model(name)


def make_batch(name: str, seed: int = 0, size: int = 64) -> dict:
    gen = torch.Generator().manual_seed(seed)
    scope = MODELS[name]
    if scope == "mmdet":
        from mmdet.testing import demo_mm_inputs

        torch.manual_seed(seed)
        return demo_mm_inputs(
            batch_size=2,
            image_shapes=[(3, size + 32, size + 32)] * 2,
            num_items=[3, 2],
            num_classes=80,
            with_mask="mask" in name,
        )
    images = [
        torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8) for _ in range(2)
    ]
    if scope == "mmseg":
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample

        num_classes = load_cfg(name).model.decode_head.num_classes
        samples = []
        for _ in images:
            sample = SegDataSample(
                metainfo=dict(
                    img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size)
                )
            )
            label = torch.randint(0, num_classes, (1, size, size), generator=gen)
            sample.gt_sem_seg = PixelData(data=label)
            samples.append(sample)
        return dict(inputs=images, data_samples=samples)
    from mmpretrain.structures import DataSample

    samples = [
        DataSample().set_gt_label(int(torch.randint(0, 10, (1,), generator=gen))) for _ in images
    ]
    return dict(inputs=images, data_samples=samples)


def tensor_outputs(model: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
    """All tensors of ``model(..., mode='tensor')`` on ``batch`` (eval mode), flattened."""
    outputs = exactness.tensor_outputs(model, batch)
    assert outputs and all(t.numel() > 0 for t in outputs), "mode='tensor' returned nothing"
    return outputs
