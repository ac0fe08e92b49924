"""DeltaRunner and its pieces, in process: checkpoint policy, checked base loads, build order.

The subprocess runs of tools/train.py / tools/test.py are in test_tools_e2e.py.
"""

import io
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.optim import OptimWrapper
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import Runner

from mmdelta import DeltaPatchConfigError, delta_disabled, patch_names
from mmdelta.datasets import DatasetPathError, write_voc_dataset
from mmdelta.runner import CheckpointError, DeltaRunner, read_checkpoint
from mmdelta.runner.checkpoint import load_base_state
from mmdelta.runner.model_setup import null_pretrained, patch_root

REPO = Path(__file__).resolve().parents[1]
DET_CONFIG = REPO / "tests" / "configs" / "e2e_det_voc_tiny.py"
CLASSES = ("square", "disc", "bar")


def det_cfg(tmp: Path, data: Path | None = None, **overrides) -> Config:
    cfg = Config.fromfile(str(DET_CONFIG))
    cfg.work_dir = str(tmp / "work")
    cfg.launcher = "none"
    if data is not None:
        for split in ("train", "val", "test"):
            cfg[f"{split}_dataloader"].dataset.data_root = str(data)
    cfg.merge_from_dict(overrides)
    return cfg


def build_det(cfg: Config, seed: int = 0) -> torch.nn.Module:
    init_default_scope("mmdet")
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("base")
    model = build_det(Config.fromfile(str(DET_CONFIG)), seed=3)
    path = tmp / "base.pth"
    torch.save(
        {"meta": {"dataset_meta": {"classes": CLASSES}}, "state_dict": model.state_dict()}, path
    )
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "voc"
    return Path(write_voc_dataset(root, CLASSES, 4, 2, image_size=(64, 64), seed=0))


# ------------------------------------------------------------------ checkpoint policy
def _mmengine_checkpoint() -> dict:
    hub = MessageHub.get_instance("mmdelta-test")
    hub.update_scalar("train/loss", 1.5)
    hub.update_scalar("train/lr", np.float64(0.1))
    hub.update_info("iter", 3)
    return {
        "meta": {"epoch": 0, "iter": 3, "seed": 1, "dataset_meta": {"classes": CLASSES}},
        "state_dict": OrderedDict(w=torch.ones(2)),
        "message_hub": hub.state_dict(),
    }


def test_mmengine_training_checkpoints_load_weights_only(tmp_path):
    path = tmp_path / "iter_3.pth"
    torch.save(_mmengine_checkpoint(), path)
    with pytest.raises(pickle.UnpicklingError):  # what mmengine 0.10.7 hits under torch 2.14
        torch.load(path)
    loaded = read_checkpoint(str(path))
    assert isinstance(loaded["message_hub"]["log_scalars"]["train/loss"], HistoryBuffer)
    assert loaded["message_hub"]["log_scalars"]["train/loss"].mean() == 1.5


class NotAllowed:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"state_dict": {}, "evil": NotAllowed()}, "needs print"),
        ({"state_dict": {}, "x": __import__("fractions").Fraction(1, 3)}, "Fraction"),
    ],
)
def test_checkpoints_needing_other_globals_are_refused(tmp_path, capsys, content, expected):
    path = tmp_path / "x.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint(str(path))
    assert "must never run" not in capsys.readouterr().out


def test_missing_and_truncated_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(str(tmp_path / "nope.pth"))
    buffer = io.BytesIO()
    torch.save(_mmengine_checkpoint(), buffer)
    (tmp_path / "cut.pth").write_bytes(buffer.getvalue()[:200])
    with pytest.raises(CheckpointError, match=r"cut\.pth"):
        read_checkpoint(str(tmp_path / "cut.pth"))


# ------------------------------------------------------------------ checked base loads
def test_base_load_refuses_wrong_checkpoints_and_changes_nothing(tmp_path):
    cfg = Config.fromfile(str(DET_CONFIG))
    model = build_det(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = build_det(cfg, seed=1).state_dict()
    cases = {
        "missing keys: backbone.conv1.weight": {
            k: v for k, v in good.items() if k != "backbone.conv1.weight"
        },
        "unexpected keys: extra.weight": {**good, "extra.weight": torch.zeros(1)},
        "shape keys: neck.lateral_convs.0.conv.weight": {
            **good,
            "neck.lateral_convs.0.conv.weight": torch.zeros(3, 3, 1, 1),
        },
    }
    for message, state in cases.items():
        with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
            load_base_state(model, state, "ckpt")
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    load_base_state(model, good, "ckpt")
    assert all(torch.equal(good[k], v) for k, v in model.state_dict().items())


def test_base_load_tolerates_only_what_the_patch_owns():
    """A model built with 5 classes from a 3-class checkpoint: only the owned head may differ."""
    cfg = Config.fromfile(str(DET_CONFIG))
    state = build_det(cfg, seed=1).state_dict()
    cfg.model.roi_head.bbox_head.num_classes = 5
    model = build_det(cfg)
    with pytest.raises(CheckpointError, match="fc_cls"):
        load_base_state(model, state, "ckpt")
    logged = []

    class Log:
        info = logged.append

    owned = ["roi_head.bbox_head.fc_cls", "roi_head.bbox_head.fc_reg"]
    load_base_state(model, state, "ckpt", owned=owned, logger=Log)
    assert len(logged) == 1 and "fc_cls" in logged[0] and "fc_reg" in logged[0]
    assert torch.equal(model.state_dict()["backbone.conv1.weight"], state["backbone.conv1.weight"])


def test_null_pretrained_reaches_every_initialiser(tmp_path):
    for i, path in enumerate(
        (
            "mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-80k_ade20k-512x512.py",
            "mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py",
            "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
        )
    ):
        (tmp_path / f"c{i}.py").write_text(f"_base_ = {path!r}\n")
        cfg = Config.fromfile(str(tmp_path / f"c{i}.py"))
        removed = null_pretrained(cfg.model)
        assert removed, path
        assert "'Pretrained'" not in str(cfg.model.to_dict())
        assert cfg.model.get("pretrained") is None


# ------------------------------------------------------------------ the runner
def test_runner_builds_base_then_patch(tmp_path, base_ckpt, data):
    runner = DeltaRunner.from_cfg(det_cfg(tmp_path, data, load_from=str(base_ckpt)))
    model = runner.model
    assert patch_names(model) == ["tiny"]
    base = read_checkpoint(str(base_ckpt))["state_dict"]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())  # base loaded, nothing else
    delta = {k: v for k, v in state.items() if ".delta." in k}
    assert delta and all(not v.any() for k, v in delta.items() if k.endswith(".up"))
    assert model.dataset_meta["classes"] == CLASSES  # from the checkpoint's meta
    # train() must not re-initialise the loaded base
    runner._init_model_weights()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
    # only Δ requires grad
    assert all(".delta." in n for n, p in model.named_parameters() if p.requires_grad)


def test_runner_without_delta_patch_is_upstream(tmp_path, base_ckpt, data):
    cfg = det_cfg(tmp_path, data, load_from=str(base_ckpt), delta_patch=None)
    runner = DeltaRunner.from_cfg(cfg)
    assert patch_names(runner.model) == []
    assert not any(".delta." in k for k in runner.model.state_dict())


def test_amp_falls_back_to_fp32_on_cpu(tmp_path, base_ckpt, data):
    runner = DeltaRunner.from_cfg(det_cfg(tmp_path, data, load_from=str(base_ckpt)))
    wrapper = runner.build_optim_wrapper(
        dict(
            type="AmpOptimWrapper",
            loss_scale="dynamic",
            optimizer=dict(type="SGD", lr=0.01, momentum=0.9),
        )
    )
    assert type(wrapper) is OptimWrapper


def test_bad_delta_patch_key_is_named(tmp_path, base_ckpt, data):
    cfg = det_cfg(tmp_path, data, load_from=str(base_ckpt))
    cfg.delta_patch = dict(name="tiny", rnak=4)
    with pytest.raises(DeltaPatchConfigError, match="rnak"):
        DeltaRunner.from_cfg(cfg)


def test_wrong_base_checkpoint_stops_the_run(tmp_path, data):
    cfg = Config.fromfile(str(DET_CONFIG))
    cfg.model.neck.out_channels = 32
    other = tmp_path / "other.pth"
    torch.save({"state_dict": build_det(cfg).state_dict()}, other)
    with pytest.raises(CheckpointError, match="not a base checkpoint for this model"):
        DeltaRunner.from_cfg(det_cfg(tmp_path, data, load_from=str(other)))


def test_missing_dataset_stops_before_training(tmp_path, base_ckpt):
    runner = DeltaRunner.from_cfg(
        det_cfg(tmp_path, tmp_path / "no-such-data", load_from=str(base_ckpt))
    )
    with pytest.raises(DatasetPathError, match="no-such-data"):
        runner.train()


def test_plain_runner_refuses_a_patched_config(tmp_path, base_ckpt, data):
    """What mmseg's tools/test.py does (Runner.from_cfg, runner_type ignored) fails loudly."""
    cfg = det_cfg(tmp_path, data, load_from=str(base_ckpt))
    cfg.custom_hooks = [dict(type="DeltaPatchHook")]
    runner = Runner.from_cfg(cfg)
    with pytest.raises(RuntimeError, match="ignores it"):
        runner.test()


def test_tta_wrapper_keeps_the_patch(tmp_path, base_ckpt, data):
    cfg = det_cfg(tmp_path, data, load_from=str(base_ckpt))
    cfg.model = dict(
        type="DetTTAModel",
        tta_cfg=dict(nms=dict(type="nms", iou_threshold=0.5), max_per_img=100),
        module=cfg.model,
    )
    runner = DeltaRunner.from_cfg(cfg)
    inner = patch_root(runner.model)
    assert inner is runner.model.module and patch_names(inner) == ["tiny"]
    # the wrapper runs the inner model's forward: a nonzero Δ changes its outputs
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for name, p in inner.named_parameters():
            if ".delta." in name:
                p.add_(0.05)
        patched = inner.extract_feat(x)
        with delta_disabled(inner):
            base = inner.extract_feat(x)
    assert not torch.equal(patched[0], base[0])
