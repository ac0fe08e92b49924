"""Label-free domain patches (``mmdelta.label_free``): BatchNorm statistics re-estimated on
unlabelled images as a task-norm patch (AdaBN), and ``tools/adapt_norm.py``.

On the tiny end-to-end configs (mmdet Faster R-CNN R-18 FPN, mmseg FCN R-18) with random
weights and generated images: the patch's running statistics equal an independent
computation (plain PyTorch, no mmdelta) of every targeted BatchNorm's input moments; the
base's tensors never change; with the patch off the model is the base bit for bit; the
saved patch reloads onto a fresh base; errors leave the model as it was.
"""

import copy
import re
import subprocess
import sys
from pathlib import Path

import mmcv
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from torch.nn.modules.batchnorm import _BatchNorm

from mmdelta import (
    DeltaPatchConfigError,
    active_patch,
    apply_delta_patch,
    base_state_dict,
    delta_disabled,
    load_patch,
    patch_names,
    save_patch,
)
from mmdelta.apis import init_base_model
from mmdelta.exactness import identical, tensor_outputs
from mmdelta.label_free import (
    LabelFreeError,
    NoImagesError,
    adapt_norm_stats,
    image_only_pipeline,
    list_images,
    stats_layers,
    unlabelled_loader,
    write_norm_patch,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"
DET_CONFIG = CONFIGS / "e2e_det_voc_tiny.py"
SEG_CONFIG = CONFIGS / "e2e_seg_tiny.py"
CLASSES = ("square", "disc", "bar")


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` coloured images with a few bright rectangles (a 'new environment')."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, size - 8, 2)
            img[y : y + 8, x : x + 12] = rng.integers(150, 256, 3)
        mmcv.imwrite(img, str(folder / f"img_{i:03d}.{'png' if i % 2 else 'jpg'}"))
    return folder


def write_base(config: Path, path: Path, seed: int = 0) -> Path:
    """A checkpoint of the config's model with random weights and random (non-default)
    BatchNorm statistics, so "unchanged" and "re-estimated" mean something."""
    cfg = Config.fromfile(str(config))
    init_default_scope(cfg.default_scope)
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(100)
    state = model.state_dict()
    torch.save({"meta": {"dataset_meta": {"classes": CLASSES}}, "state_dict": state}, path)
    return path


@torch.no_grad()
def reference_moments(base, loader, paths):
    """Every BatchNorm in ``paths`` in train mode (batch statistics), the rest in eval, on a
    plain copy of the base (no mmdelta): per-channel mean and unbiased variance of each
    layer's inputs over all images, from the concatenated inputs."""
    model = copy.deepcopy(base).eval()
    inputs = {p: [] for p in paths}
    hooks = []
    for p in paths:
        layer = model.get_submodule(p)
        layer.train(True)
        hooks.append(layer.register_forward_pre_hook(lambda _m, a, p=p: inputs[p].append(a[0])))
    for batch in loader:
        data = model.data_preprocessor(batch, False)
        model(**data, mode="tensor")
    for hook in hooks:
        hook.remove()
    out = {}
    for p, xs in inputs.items():
        x = torch.cat([t.double().transpose(0, 1).reshape(t.shape[1], -1) for t in xs], dim=1)
        out[p] = (x.mean(dim=1), x.var(dim=1, unbiased=True))
    return out


def own_stats(model, path, name="adabn"):
    return model.get_submodule(path)._modules["delta"][name].tensors()


def first_batch(cfg, folder):
    return next(iter(unlabelled_loader(cfg, folder, batch_size=3)))


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    """Generated images, a random base, and that base adapted on the images in batches of 2
    (the last batch holds one image) beside a plain copy of the base."""
    tmp = tmp_path_factory.mktemp("label_free_det")
    images = write_images(tmp / "images", 5, 96)
    ckpt = write_base(DET_CONFIG, tmp / "base.pth")
    cfg = Config.fromfile(str(DET_CONFIG))
    model = init_base_model(cfg, str(ckpt))
    base = init_base_model(cfg, str(ckpt))
    batch = first_batch(cfg, images)
    base_out = tensor_outputs(base, batch)
    name = adapt_norm_stats(model, unlabelled_loader(cfg, images, batch_size=2))
    return dict(
        tmp=tmp,
        images=images,
        ckpt=ckpt,
        cfg=cfg,
        model=model,
        base=base,
        name=name,
        batch=batch,
        base_out=base_out,
    )


def test_det_stats_match_input_moments(det):
    cfg, images, model, base = det["cfg"], det["images"], det["model"], det["base"]
    assert det["name"] == "adabn" and active_patch(model) == "adabn" and not model.training
    paths = [p for p, _ in stats_layers(model)]
    assert paths[0] == "backbone.bn1" and len(paths) == 20  # ResNet-18: stem + 8 blocks × 2 + 3

    # the first BN's inputs are conv1(images), whatever the rest of the model does
    with torch.no_grad():
        x = torch.cat(
            [
                base.backbone.conv1(base.data_preprocessor(b, False)["inputs"])
                for b in unlabelled_loader(cfg, images, batch_size=5)
            ]
        )
    own = own_stats(model, "backbone.bn1")
    torch.testing.assert_close(own["running_mean"], x.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        own["running_var"], x.var(dim=(0, 2, 3), unbiased=True), atol=1e-5, rtol=1e-5
    )
    assert int(own["num_batches_tracked"]) == 3
    # every BN: the moments of its inputs in the model with batch-statistics BNs
    reference = reference_moments(base, unlabelled_loader(cfg, images, batch_size=2), paths)
    for p in paths:
        mean, var = reference[p]
        own = own_stats(model, p)
        assert own["running_mean"].shape == own["running_var"].shape == mean.shape
        torch.testing.assert_close(own["running_mean"].double(), mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(own["running_var"].double(), var, atol=1e-5, rtol=1e-4)
        # affine parameters stay the base's; the statistics are new
        layer = model.get_submodule(p)
        assert torch.equal(own["weight"], layer.weight) and torch.equal(own["bias"], layer.bias)
        assert not torch.equal(own["running_mean"], layer.running_mean)


def test_det_base_untouched_patch_off_exact_and_reload(det):
    model, base, batch, base_out = det["model"], det["base"], det["batch"], det["base_out"]
    # the base's tensors: bitwise the checkpoint's (the statistics pass wrote only copies)
    after, before = base_state_dict(model), base.state_dict()
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    # patch off: the base, bitwise; patch on: another model
    with delta_disabled(model):
        assert identical(tensor_outputs(model, batch), base_out)
    patched_out = tensor_outputs(model, batch)
    assert not identical(patched_out, base_out)
    # train() keeps base BNs in eval (mmdet ResNet: norm_eval=True, _freeze_stages)
    model.train()
    assert not model.backbone.bn1.training and model.backbone.bn1.delta["adabn"].training
    model.eval()
    assert identical(tensor_outputs(model, batch), patched_out)

    # the saved patch reloads onto a fresh base and reproduces the patched outputs
    path = save_patch(model, det["tmp"] / "adabn.safetensors")
    fresh = init_base_model(det["cfg"], str(det["ckpt"]))
    assert load_patch(fresh, path) == "adabn"
    assert identical(tensor_outputs(fresh, batch), patched_out)
    with delta_disabled(fresh):
        assert identical(tensor_outputs(fresh, batch), base_out)


def test_max_images_and_files_through_the_model_cfg(det):
    cfg, images = det["cfg"], det["images"]
    model = init_base_model(cfg, str(det["ckpt"]))
    # a folder with the model's own cfg (init_base_model sets model.cfg), first 3 images
    # only, in batches of 2: the second batch is cut to one image
    adapt_norm_stats(model, images, name="first3", max_images=3, batch_size=2, activate=False)
    assert active_patch(model) is None and patch_names(model) == ["first3"]
    files = list_images(images)[:3]
    assert [f.name for f in files] == ["img_000.jpg", "img_001.png", "img_002.jpg"]
    with torch.no_grad():
        x = torch.cat(
            [
                model.backbone.conv1(model.data_preprocessor(b, False)["inputs"])
                for b in unlabelled_loader(cfg, files, batch_size=3)
            ]
        )
    own = own_stats(model, "backbone.bn1", "first3")
    torch.testing.assert_close(own["running_mean"], x.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(own["running_var"], x.var(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert int(own["num_batches_tracked"]) == 2
    # a second patch beside it, restricted to layer4; the first is restored as active after
    adapt_norm_stats(model, images, name="l4", targets=["backbone.layer4"], activate=False)
    assert patch_names(model) == ["first3", "l4"] and active_patch(model) is None
    assert list(model.backbone.bn1._modules["delta"]) == ["first3"]
    assert "l4" in model.backbone.layer4[0].bn1._modules["delta"]


def test_image_only_pipeline_drops_annotation_loading(det):
    pipeline = image_only_pipeline(det["cfg"])
    assert [t["type"] for t in pipeline] == ["LoadImageFromFile", "Resize", "PackDetInputs"]
    batch = first_batch(det["cfg"], det["images"])
    assert len(batch["inputs"]) == 3
    sample = batch["data_samples"][0]
    assert "gt_instances" not in sample or len(sample.gt_instances) == 0  # no labels read
    assert batch["data_samples"][0].img_path.endswith("img_000.jpg")


def test_errors_name_the_problem_and_leave_the_model_as_it_was(det, tmp_path):
    cfg = det["cfg"]
    model = init_base_model(cfg, str(det["ckpt"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(NoImagesError, match=r"holds no .*files"):
        adapt_norm_stats(model, empty, cfg=cfg)
    with pytest.raises(FileNotFoundError, match=r"no image file or folder at .*missing"):
        adapt_norm_stats(model, tmp_path / "missing", cfg=cfg)
    # Faster R-CNN's FPN has no normalisation layer
    with pytest.raises(LabelFreeError, match=r"targets \['neck'\].*no normalisation layer"):
        adapt_norm_stats(model, det["images"], targets=["neck"])
    with pytest.raises(DeltaPatchConfigError, match="matches no module"):
        adapt_norm_stats(model, det["images"], targets=["backbone.layer9"])
    with pytest.raises(LabelFreeError, match="data given to adapt_norm_stats is empty"):
        adapt_norm_stats(model, iter([]))
    with pytest.raises(LabelFreeError, match="data batches as mmengine data loaders yield"):
        adapt_norm_stats(model, [torch.zeros(1, 3, 32, 32)])
    with pytest.raises(ValueError, match="max_images must be"):
        adapt_norm_stats(model, det["images"], max_images=0)
    # nothing stayed behind: no patch, no guard, the same tensors
    assert patch_names(model) == [] and "train" not in model.__dict__
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    # a name the model already carries; the existing patch stays active
    apply_delta_patch(model, dict(name="adabn", branch=None, task_norm=True))
    with pytest.raises(DeltaPatchConfigError, match="already carries a patch named 'adabn'"):
        adapt_norm_stats(model, det["images"])
    assert patch_names(model) == ["adabn"] and active_patch(model) == "adabn"
    # a failure after the patch is attached (an unreadable image) removes it again
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(Exception):  # noqa: B017 (mmcv's decoder error type varies)
        adapt_norm_stats(model, bad, name="other", cfg=cfg)
    assert patch_names(model) == ["adabn"] and active_patch(model) == "adabn"


def test_tool_end_to_end_and_its_errors(det, tmp_path, capsys):
    out = tmp_path / "patches" / "env.safetensors"
    common = ["--config", str(DET_CONFIG), "--checkpoint", str(det["ckpt"])]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/adapt_norm.py"),
            *common,
            "--images",
            str(det["images"]),
            "--out",
            str(out),
            "--name",
            "env",
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "20 normalisation layer(s) re-estimated on 5 unlabelled image(s)" in proc.stdout
    # the file holds what the library computed in-process on the same images and batches
    cfg = det["cfg"]
    loaded = init_base_model(cfg, str(det["ckpt"]))
    assert load_patch(loaded, out) == "env"
    for p, _ in stats_layers(loaded):
        a, b = own_stats(loaded, p, "env"), own_stats(det["model"], p, "adabn")
        for key in ("running_mean", "running_var", "weight", "bias"):
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)

    # what the tool calls, in this process: no overwrite without force; with force (and
    # files instead of a folder) it replaces
    given = dict(config=DET_CONFIG, checkpoint=det["ckpt"])
    files = [str(f) for f in list_images(det["images"])[:2]]
    with pytest.raises(FileExistsError, match="exists; pass --force"):
        write_norm_patch(**given, images=files, out=out)
    first = out.read_bytes()
    assert write_norm_patch(**given, images=files, out=out, force=True) == out
    assert "on 2 unlabelled image(s)" in capsys.readouterr().out
    # replaced by the second run's patch (statistics of 2 other images; the file size may
    # differ: safetensors pads its JSON header to 8 bytes)
    assert out.read_bytes() != first
    assert load_patch(init_base_model(cfg, str(det["ckpt"])), out) == "adabn"
    # an empty or missing image folder, a model with no norm layer in the targets
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other.safetensors"
    with pytest.raises(NoImagesError, match=re.escape(f"image folder {empty} holds no")):
        write_norm_patch(**given, images=[empty], out=other)
    with pytest.raises(FileNotFoundError, match="no image file or folder at"):
        write_norm_patch(**given, images=[tmp_path / "nope"], out=other)
    with pytest.raises(LabelFreeError, match="no normalisation layer with running statistics"):
        write_norm_patch(**given, images=[det["images"]], out=other, targets=["neck"])
    assert not other.exists()


def test_seg_decode_head_bns_adapted_and_patch_off_exact(tmp_path):
    images = write_images(tmp_path / "images", 4, 64, seed=1)
    ckpt = write_base(SEG_CONFIG, tmp_path / "base.pth")
    cfg = Config.fromfile(str(SEG_CONFIG))
    model = init_base_model(cfg, str(ckpt))
    base = init_base_model(cfg, str(ckpt))
    paths = [p for p, _ in stats_layers(model)]
    assert any(p.startswith("decode_head.") for p in paths)
    assert not any(p.startswith("auxiliary_head.") for p in paths)  # not a default target
    batch = first_batch(cfg, images)
    base_out = tensor_outputs(base, batch)
    adapt_norm_stats(model, unlabelled_loader(cfg, images, batch_size=2))
    reference = reference_moments(base, unlabelled_loader(cfg, images, batch_size=2), paths)
    for p in paths:
        mean, var = reference[p]
        torch.testing.assert_close(
            own_stats(model, p)["running_mean"].double(), mean, atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            own_stats(model, p)["running_var"].double(), var, atol=1e-5, rtol=1e-4
        )
    with delta_disabled(model):
        assert identical(tensor_outputs(model, batch), base_out)
    assert all(torch.equal(v, base_state_dict(model)[k]) for k, v in base_state_dict(base).items())
