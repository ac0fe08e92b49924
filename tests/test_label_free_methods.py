"""Label-free self-training patches (``mmdelta.label_free.self_training``,
``tools/adapt_label_free.py``) and the realistic shift (synthetic style ``'fog'``).

The 'fog' style shows the base's very scenes (same seed: same objects, same labels) through
haze; one tiny self-training run per task (random-weight tiny configs, a low threshold so a
random model keeps some pseudo-labels, 2 student iterations): the pseudo-labelled set is in
the config's format, the result is an ordinary patch that reloads onto a fresh base, with
the patch off the model is the base bit for bit, the base checkpoint's bytes never change.
"""

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
from mmengine.config import Config
from test_label_free import CLASSES, DET_CONFIG, SEG_CONFIG, write_base

from mmdelta import base_state_dict, delta_disabled, load_patch
from mmdelta.apis import init_base_model
from mmdelta.datasets.synthetic import write_seg_dataset, write_voc_dataset
from mmdelta.exactness import identical, tensor_outputs
from mmdelta.label_free import LabelFreeError, list_images, unlabelled_loader
from mmdelta.label_free.self_training import RoundStats, self_train, task_kind

ROOT = Path(__file__).resolve().parent.parent


def test_fog_shows_the_base_scenes_through_haze(tmp_path):
    kw = dict(image_size=(48, 48), seed=3, folder="VOC2007")
    base = Path(write_voc_dataset(tmp_path / "base", CLASSES, 3, 1, style="base", **kw))
    fog = Path(write_voc_dataset(tmp_path / "fog", CLASSES, 3, 1, style="fog", **kw))
    again = Path(write_voc_dataset(tmp_path / "again", CLASSES, 3, 1, style="fog", **kw))
    for xml in sorted((base / "VOC2007" / "Annotations").glob("*.xml")):
        assert (fog / "VOC2007/Annotations" / xml.name).read_text() == xml.read_text()
    for jpg in sorted((base / "VOC2007" / "JPEGImages").glob("*.jpg")):
        a = cv2.imread(str(jpg)).astype(np.float32)
        b = cv2.imread(str(fog / "VOC2007/JPEGImages" / jpg.name)).astype(np.float32)
        assert b.std() < 0.6 * a.std()  # haze: lower contrast
        assert (again / "VOC2007/JPEGImages" / jpg.name).read_bytes() == (
            fog / "VOC2007/JPEGImages" / jpg.name
        ).read_bytes()  # deterministic
    seg_base = Path(write_seg_dataset(tmp_path / "sb", CLASSES, 2, 0, (32, 32), 5, "base"))
    seg_fog = Path(write_seg_dataset(tmp_path / "sf", CLASSES, 2, 0, (32, 32), 5, "fog"))
    for png in sorted((seg_base / "ann_dir/train").glob("*.png")):
        assert (seg_fog / "ann_dir/train" / png.name).read_bytes() == png.read_bytes()
    marker = (seg_fog / ".mmdelta-dataset.json").read_text()
    assert (
        '"degradation"' in marker
        and '"degradation"' not in (seg_base / ".mmdelta-dataset.json").read_text()
    )


def _recipe(config: Path) -> Config:
    cfg = Config.fromfile(str(config))
    cfg.delta_patch = dict(name="x", branch=dict(type="LowRankDelta", rank=2), task_norm=True)
    return cfg


def _check_patch(config: Path, ckpt: Path, patch: Path, images: Path, name: str) -> None:
    cfg = Config.fromfile(str(config))
    base = init_base_model(cfg, str(ckpt))
    model = init_base_model(cfg, str(ckpt))
    assert load_patch(model, patch) == name
    batch = next(iter(unlabelled_loader(cfg, images, batch_size=2)))
    assert not identical(tensor_outputs(model, batch), tensor_outputs(base, batch))
    with delta_disabled(model):
        assert identical(tensor_outputs(model, batch), tensor_outputs(base, batch))
    assert all(torch_equal(v, base_state_dict(model)[k]) for k, v in base_state_dict(base).items())


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_tiny_self_training_det(tmp_path):
    data = Path(write_voc_dataset(tmp_path / "fog", CLASSES, 4, 0, (96, 96), 1, "fog"))
    images = data / "VOC2007" / "JPEGImages"
    ckpt = write_base(DET_CONFIG, tmp_path / "base.pth")
    before = ckpt.read_bytes()
    recipe = _recipe(DET_CONFIG)
    assert task_kind(recipe) == "det"
    logged = []
    patch, history = self_train(
        recipe, ckpt, images, tmp_path / "st", name="fog", score_thr=0.01, max_iters=2,
        log=logged.append,
    )  # fmt: skip
    assert patch == tmp_path / "st" / "round1" / "fog.patch.safetensors"
    (stats,) = history
    assert isinstance(stats, RoundStats) and stats.images == 4 and stats.kept_images >= 1
    assert stats.pseudo_labels == sum(stats.per_class.values()) >= 1
    assert 0.01 <= stats.mean_confidence <= 1 and 0 <= stats.mean_entropy <= 1
    assert "round 1: pseudo-labels" in logged[0]
    voc = tmp_path / "st" / "round1" / "pseudo"
    ids = (voc / "ImageSets/Main/trainval.txt").read_text().split()
    assert len(ids) == stats.kept_images
    assert all((voc / "Annotations" / f"{i}.xml").is_file() for i in ids)
    assert ckpt.read_bytes() == before
    _check_patch(DET_CONFIG, ckpt, patch, images, "fog")
    # nothing confident: an error naming the threshold, before any training
    with pytest.raises(LabelFreeError, match="lower score_thr"):
        self_train(recipe, ckpt, images, tmp_path / "none", score_thr=0.999999, max_iters=1)


def test_tiny_self_training_seg_and_the_tool(tmp_path):
    data = Path(write_seg_dataset(tmp_path / "fog", CLASSES, 3, 0, (64, 64), 1, "fog"))
    images = data / "img_dir" / "train"
    ckpt = write_base(SEG_CONFIG, tmp_path / "base.pth")
    before = ckpt.read_bytes()
    recipe_file = tmp_path / "recipe.py"
    _recipe(SEG_CONFIG).dump(str(recipe_file))
    spec = importlib.util.spec_from_file_location(
        "adapt_label_free", ROOT / "tools/adapt_label_free.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "fog.safetensors"
    common = ["--checkpoint", str(ckpt), "--images", str(images), "--out", str(out)]
    args = ["--config", str(recipe_file), *common, "--method", "self-training"]
    argv = [*args, "--score-thr", "0.2", "--max-iters", "2", "--work-dir", str(tmp_path / "w")]
    assert tool.main(argv) == 0
    labels = sorted((tmp_path / "w" / "round1" / "ann_dir" / "train").glob("*.png"))
    assert len(labels) == len(list_images(images)) == 3
    values = np.unique(np.concatenate([cv2.imread(str(p), 0).ravel() for p in labels]))
    assert set(values.tolist()) <= {0, 1, 2, 3, 255}
    assert ckpt.read_bytes() == before
    _check_patch(SEG_CONFIG, ckpt, out, images, "self_training")
    # errors that name what to fix (exit status 2, nothing written)
    assert tool.main(argv) == 2  # --out exists, no --force
    plain = Config.fromfile(str(SEG_CONFIG))
    plain.pop("delta_patch")  # a base config, not a patch recipe
    plain.dump(str(tmp_path / "plain.py"))
    base_cfg = [
        "--config",
        str(tmp_path / "plain.py"),
        *common[:-1],
        str(tmp_path / "o.safetensors"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tool.main([*base_cfg, "--method", "self-training", "--images", str(empty)]) == 2
    assert tool.main([*base_cfg, "--method", "self-training", "--images", str(images)]) == 2
    assert not (tmp_path / "o.safetensors").exists()
    # AdaBN through the same command
    adabn = tmp_path / "adabn.safetensors"
    assert (
        tool.main(["--config", str(SEG_CONFIG), *common[:-1], str(adabn), "--method", "adabn"]) == 0
    )
    assert (
        load_patch(init_base_model(Config.fromfile(str(SEG_CONFIG)), str(ckpt)), adabn) == "adabn"
    )


def test_pixel_entropy_loss_and_the_unlabelled_map():
    import math

    import torch

    from mmdelta.label_free.entropy import PixelEntropyLoss, UnlabelledSegMap

    loss = PixelEntropyLoss(loss_weight=0.5)
    assert loss.loss_name == "loss_entropy"
    uniform = torch.zeros(2, 4, 3, 3)
    label = torch.zeros(2, 3, 3, dtype=torch.long)
    assert torch.allclose(loss(uniform, label), torch.tensor(0.5))  # 1 = uniform, × weight
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    label[1] = 255  # padding: left out
    p = logits[0].softmax(0)
    expected = -(p * p.log()).sum(0).mean() / math.log(4)
    value = loss(logits, label)
    assert torch.allclose(value, 0.5 * expected)
    value.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    assert loss(logits, torch.full_like(label, 255)).item() == 0.0  # all padding: zero, no NaN
    # the class-marginal term: KL(prior || the batch's mean soft-max over valid pixels)
    share = p.reshape(4, -1).mean(1).detach()
    at_prior = PixelEntropyLoss(prior=share.tolist(), marginal_weight=2.0)
    assert torch.allclose(at_prior(logits, label), expected, atol=1e-6)  # KL = 0 there
    prior = torch.tensor([0.7, 0.1, 0.1, 0.1])
    off_prior = PixelEntropyLoss(prior=prior.tolist(), marginal_weight=2.0)
    kl = (prior * (prior / share).log()).sum()
    assert torch.allclose(off_prior(logits, label), expected + 2.0 * kl / math.log(4), atol=1e-6)
    with pytest.raises(ValueError, match="3 shares for 4 classes"):
        PixelEntropyLoss(prior=[0.5, 0.25, 0.25])(logits, label)
    results = UnlabelledSegMap()(dict(img=np.zeros((5, 7, 3), np.uint8), seg_fields=[]))
    assert results["gt_seg_map"].shape == (5, 7) and results["seg_fields"] == ["gt_seg_map"]


def test_tiny_entropy_minimisation_seg_and_the_tool(tmp_path):
    """A norm-only run through the tool: an ordinary patch (reloads onto a fresh base, patch
    off == base bit for bit) with no Δ branch, the base checkpoint's bytes unchanged, the
    heads' losses replaced; the 'patch' set keeps the recipe's patch; errors exit 2."""
    from safetensors import safe_open

    from mmdelta.label_free.entropy import entropy_config

    data = Path(write_seg_dataset(tmp_path / "fog", CLASSES, 3, 0, (64, 64), 1, "fog"))
    images = data / "img_dir" / "train"
    ckpt = write_base(SEG_CONFIG, tmp_path / "base.pth")
    before = ckpt.read_bytes()
    recipe = _recipe(SEG_CONFIG)
    recipe_file = tmp_path / "recipe.py"
    recipe.dump(str(recipe_file))
    spec = importlib.util.spec_from_file_location(
        "adapt_label_free", ROOT / "tools/adapt_label_free.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "norm.safetensors"
    argv = [
        *("--config", str(recipe_file), "--checkpoint", str(ckpt), "--images", str(images)),
        *("--out", str(out), "--method", "entropy", "--trainable", "norm"),
        *("--max-iters", "2", "--work-dir", str(tmp_path / "run")),
    ]
    assert tool.main(argv) == 0
    assert ckpt.read_bytes() == before
    _check_patch(SEG_CONFIG, ckpt, out, images, "entropy")
    log = next((tmp_path / "run").rglob("*.log")).read_text()
    assert "loss_entropy" in log and "loss_ce" not in log  # the objective took over
    with safe_open(out, "pt") as f:  # norm-only: the norm layers' own copies, no Δ branch
        keys = list(f.keys())
    assert keys and all(k.split(":")[-1].startswith("own_") for k in keys)
    # 'patch': the recipe's own patch; every head's loss is the entropy, with the prior
    cfg = entropy_config(recipe, tmp_path, str(ckpt), tmp_path, "e", "patch", prior=[0.25] * 4)
    assert cfg.delta_patch == dict(recipe.delta_patch, name="e")
    heads = [cfg.model.decode_head, cfg.model.auxiliary_head]
    assert all(h.loss_decode.type == "PixelEntropyLoss" for h in heads)
    assert heads[0].loss_decode.prior == [0.25] * 4
    steps = [t["type"] for t in cfg.train_dataloader.dataset.pipeline]
    assert "UnlabelledSegMap" in steps and not any("Annotations" in t for t in steps)
    # a detection recipe is refused with a message naming the method to use instead
    det = tmp_path / "det.py"
    _recipe(DET_CONFIG).dump(str(det))
    argv = [
        *("--config", str(det), "--checkpoint", str(ckpt), "--images", str(images)),
        *("--out", str(tmp_path / "det.safetensors"), "--method", "entropy"),
    ]
    assert tool.main(argv) == 2
    assert not (tmp_path / "det.safetensors").exists()
