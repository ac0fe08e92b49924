"""Patch files: round trip onto an independent base, and every bad file refused cleanly."""

import json
from pathlib import Path

import pytest
import torch
from mm_models import build_model, make_batch, tensor_outputs
from safetensors.torch import save_file

from mmdelta import (
    PatchFileError,
    active_patch,
    apply_delta_patch,
    delta_disabled,
    load_patch,
    patch_names,
    save_patch,
    set_active_patch,
)
from mmdelta.patching.files import read_patch_file
from mmdelta.patching.slot import iter_slots

MODEL = "retinanet_r18_fpn"
CLASSES = [f"c{i}" for i in range(20)]
BASE_CLASSES = [f"c{i}" for i in range(0, 160, 2)]  # every even new class is a base class


def randomise(model, name, scale=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f".delta.{name}." in key:
                param.add_(torch.randn(param.shape, generator=gen) * scale)


def snapshot(model):
    """Everything a failed load must leave alone: tensors, module tree, patches, selection."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [name for name, _ in model.named_modules()],
        patch_names(model),
        active_patch(model),
    )


def assert_same(before, model):
    state, modules, names, active = before
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [name for name, _ in model.named_modules()] == modules
    assert patch_names(model) == names and active_patch(model) == active


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base, a patched copy with a 20-class head and non-zero Δ, its file and outputs."""
    base = build_model(MODEL, seed=0)
    patched = build_model(MODEL, seed=1)
    patched.load_state_dict(base.state_dict())
    apply_delta_patch(
        patched, dict(name="voc", classes=CLASSES, base_classes=BASE_CLASSES, task_norm=True)
    )
    randomise(patched, "voc")
    batch = make_batch(MODEL)
    path = tmp_path_factory.mktemp("patches") / "voc.safetensors"
    save_patch(patched, path)
    return dict(
        base_state=base.state_dict(),
        path=path,
        batch=batch,
        patched_out=tensor_outputs(patched, batch),
        base_out=tensor_outputs(base, batch),
        patched=patched,
    )


def fresh_base(trained, seed=7):
    model = build_model(MODEL, seed=seed)
    model.load_state_dict(trained["base_state"])
    return model


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Writes a copy of patch file ``src`` after ``edit(metadata, tensors)``."""
    metadata, tensors = read_patch_file(src)
    edit(metadata, tensors)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def test_round_trip_onto_an_independently_built_base(trained):
    model = fresh_base(trained)
    assert load_patch(model, trained["path"]) == "voc"
    out = tensor_outputs(model, trained["batch"])
    assert all(torch.equal(a, b) for a, b in zip(out, trained["patched_out"], strict=True))
    assert [tuple(t.shape)[1] for t in out[:5]] == [9 * 20] * 5  # 20-class RetinaNet head
    with delta_disabled(model):
        off = tensor_outputs(model, trained["batch"])
    assert all(torch.equal(a, b) for a, b in zip(off, trained["base_out"], strict=True))


def test_load_replaces_the_tensors_of_a_patch_built_from_the_same_cfg(trained):
    model = fresh_base(trained)
    apply_delta_patch(
        model, dict(name="voc", classes=CLASSES, base_classes=BASE_CLASSES, task_norm=True)
    )
    assert not all(
        torch.equal(a, b)
        for a, b in zip(
            tensor_outputs(model, trained["batch"]), trained["patched_out"], strict=True
        )
    )
    load_patch(model, trained["path"])
    out = tensor_outputs(model, trained["batch"])
    assert all(torch.equal(a, b) for a, b in zip(out, trained["patched_out"], strict=True))
    assert patch_names(model) == ["voc"]


def test_file_holds_only_the_patch_and_its_metadata(trained):
    metadata, tensors = read_patch_file(trained["path"])
    patched = trained["patched"]
    expected = {
        f"{path}:{key}" for path, slot in iter_slots(patched) for key in slot["voc"].state_dict()
    }
    assert set(tensors) == expected
    assert "backbone.conv1:down" in tensors and "backbone.conv1:weight" not in tensors
    cfg = json.loads(metadata["mmdelta.cfg"])
    assert cfg["classes"] == CLASSES and cfg["task_norm"] == "stats"
    assert json.loads(metadata["mmdelta.classes"]) == CLASSES
    assert len(metadata["mmdelta.base_fingerprint"]) == 64
    assert metadata["mmdelta.base_model"] == "RetinaNet"
    full = sum(t.numel() * t.element_size() for t in trained["base_state"].values())
    assert trained["path"].stat().st_size < 0.1 * full


def test_save_is_atomic_and_never_overwrites_by_accident(trained, tmp_path):
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"the user's file")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_patch(trained["patched"], path)
    assert path.read_bytes() == b"the user's file"
    save_patch(trained["patched"], path, overwrite=True)
    assert read_patch_file(path)[0]["mmdelta.name"] == "voc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]  # no temp file left
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_patch(trained["patched"], tmp_path / "missing" / "p.safetensors")


def _truncated(src, dst):
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])


def _flipped_header(src, dst):
    data = bytearray(src.read_bytes())
    data[10:40] = b"\xff" * 30
    dst.write_bytes(bytes(data))


def _no_metadata(src, dst):
    _, tensors = read_patch_file(src)
    save_file(tensors, str(dst))


def _empty(src, dst):
    dst.write_bytes(b"")


def _pickle(src, dst):
    torch.save({"a": torch.zeros(1)}, dst)


def _nan(src, dst):
    def edit(metadata, tensors):
        key = sorted(k for k in tensors if k.endswith(":up"))[0]
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("nan")

    rewrite(src, dst, edit)


def _inf(src, dst):
    def edit(metadata, tensors):
        tensors["bbox_head.retina_cls:own_bias"] = tensors["bbox_head.retina_cls:own_bias"].clone()
        tensors["bbox_head.retina_cls:own_bias"][3] = float("inf")

    rewrite(src, dst, edit)


def _wrong_shape(src, dst):
    def edit(metadata, tensors):
        key = sorted(k for k in tensors if k.endswith(":down"))[0]
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])

    rewrite(src, dst, edit)


def _missing_key(src, dst):
    rewrite(src, dst, lambda metadata, tensors: tensors.pop(sorted(tensors)[0]))


def _extra_key(src, dst):
    rewrite(src, dst, lambda m, t: t.update({"backbone.conv1:extra": torch.zeros(3)}))


def _wrong_dtype(src, dst):
    def edit(metadata, tensors):
        key = sorted(k for k in tensors if k.endswith(":up"))[0]
        tensors[key] = tensors[key].to(torch.int32)

    rewrite(src, dst, edit)


def _other_base(src, dst):
    rewrite(src, dst, lambda m, t: m.update({"mmdelta.base_fingerprint": "0" * 64}))


def _other_architecture(src, dst):
    rewrite(src, dst, lambda m, t: m.update({"mmdelta.base_architecture": "1" * 64}))


def _bad_cfg(src, dst):
    rewrite(src, dst, lambda m, t: m.update({"mmdelta.cfg": "{not json"}))


def _cfg_for_another_model(src, dst):
    def edit(metadata, tensors):
        cfg = json.loads(metadata["mmdelta.cfg"])
        cfg["targets"] = ["decode_head"]
        metadata["mmdelta.cfg"] = json.dumps(cfg)

    rewrite(src, dst, edit)


BAD_FILES = {
    "truncated": (_truncated, "truncated or corrupt"),
    "flipped_header": (_flipped_header, "truncated or corrupt"),
    "empty": (_empty, "is empty"),
    "pickle": (_pickle, "truncated or corrupt"),
    "no_metadata": (_no_metadata, "not an mmdelta patch file"),
    "nan": (_nan, "NaN or Inf"),
    "inf": (_inf, "NaN or Inf"),
    "wrong_shape": (_wrong_shape, "has shape"),
    "wrong_dtype": (_wrong_dtype, "has dtype"),
    "missing_key": (_missing_key, "tensors missing 1"),
    "extra_key": (_extra_key, "unexpected 1"),
    "other_base": (_other_base, "trained on other base weights"),
    "other_architecture": (_other_architecture, "built for another base model"),
    "bad_cfg": (_bad_cfg, "not JSON"),
    "cfg_for_another_model": (_cfg_for_another_model, "does not apply to this model"),
}


@pytest.fixture(scope="module")
def target(trained):
    """A base carrying one other patch: a failed load must leave all of it as it was."""
    model = fresh_base(trained, seed=3)
    apply_delta_patch(model, dict(name="other"))
    randomise(model, "other", seed=1)
    set_active_patch(model, None)
    return model


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_file_is_refused_and_the_model_is_unchanged(kind, trained, target, tmp_path):
    make, message = BAD_FILES[kind]
    path = tmp_path / f"{kind}.safetensors"
    make(trained["path"], path)
    before = snapshot(target)
    with pytest.raises(PatchFileError, match=message):
        load_patch(target, path)
    assert_same(before, target)


def test_missing_file_and_a_patch_of_another_architecture(trained, tmp_path):
    model = fresh_base(trained)
    with pytest.raises(PatchFileError, match="no patch file at"):
        load_patch(model, tmp_path / "nope.safetensors")
    other = build_model("deeplabv3_r18_v1c")
    before = snapshot(other)
    with pytest.raises(PatchFileError, match=r"RetinaNet with .* parameters, while this is a"):
        load_patch(other, trained["path"])
    assert_same(before, other)


def test_other_base_weights_refused_unless_asked(trained, target):
    other = build_model(MODEL, seed=11)  # same architecture, different weights
    before = snapshot(other)
    with pytest.raises(PatchFileError, match="other base weights"):
        load_patch(other, trained["path"])
    assert_same(before, other)
    load_patch(other, trained["path"], check_base=False)
    assert patch_names(other) == ["voc"]


def test_same_name_with_another_cfg_is_refused(trained, tmp_path):
    model = fresh_base(trained)
    apply_delta_patch(model, dict(name="voc"))
    before = snapshot(model)
    with pytest.raises(PatchFileError, match="built from another config"):
        load_patch(model, trained["path"])
    assert_same(before, model)
    load_patch(model, trained["path"], name="voc2", activate=False)
    assert patch_names(model) == ["voc", "voc2"] and active_patch(model) == "voc"


def test_base_fingerprint_is_cached_until_a_base_tensor_changes(trained):
    from mmdelta.patching import files

    model = fresh_base(trained)
    calls = []
    original = files._hash_state

    def counting(state, values):
        calls.append(values)
        return original(state, values)

    files._hash_state = counting
    try:
        first = files.base_fingerprint(model)
        assert files.base_fingerprint(model) == first and calls == [True]  # cached
        with torch.no_grad():
            model.backbone.conv1.weight[0, 0, 0, 0] += 1  # in place: the version moves
        assert files.base_fingerprint(model) != first and calls == [True, True]
        model.backbone.conv1.weight = torch.nn.Parameter(model.backbone.conv1.weight.clone())
        files.base_fingerprint(model)  # a replaced tensor object is noticed too
        assert calls == [True, True, True]
    finally:
        files._hash_state = original
