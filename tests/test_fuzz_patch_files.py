"""Fuzzing patch files: loading never executes code, and a damaged file is either loaded
exactly as it is or refused with a ``PatchFileError`` naming the file, the model unchanged.

A valid patch of a small RetinaNet (low-rank Δ on ``backbone.layer4`` and the neck, the
layer's BatchNorms owned by ``task_norm``, a 3-class head) is saved once with non-zero Δ;
hypothesis then damages it byte by byte (flips in the header and in the data, truncation,
garbage appended, a wrong header length) or structurally (a tensor's shape or dtype, NaN /
Inf, keys missing, extra or renamed, metadata fields removed, changed or garbage, the
recorded config replaced by another valid or invalid one, the patch name). Every file is
loaded onto (a) the plain base and (b) a model already carrying that patch:

* success: the model's patch tensors are exactly the file's, with the patch off the model
  computes the base bitwise, with it on it runs;
* refusal: a ``PatchFileError`` whose message names the file, and the model exactly as it
  was (state dict, module tree, patches, selection, ``requires_grad``, head attributes,
  outputs). Any other exception type fails the test.

Mutations that must be refused (a tensor changed in shape / dtype / keys / finiteness,
another format version or base) are checked to be refused; mutations of informational
metadata only are checked to load.
"""

import copy
import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mm_models import _registry, load_cfg, make_batch
from mmengine.registry import DefaultScope
from safetensors.torch import save_file

from mmdelta import (
    PatchFileError,
    active_patch,
    apply_delta_patch,
    delta_disabled,
    load_patch,
    patch_names,
    remove_patch,
    set_active_patch,
)
from mmdelta.exactness import identical, tensor_outputs
from mmdelta.patching.classes import CLASS_COUNT_ATTRS
from mmdelta.patching.files import _patch_tensors, read_patch_file
from mmdelta.patching.targets import base_modules

MODEL = "retinanet_r18_fpn"
NAME = "fz"
CFG = dict(
    name=NAME,
    targets=["backbone.layer4", "neck"],
    branch=dict(type="LowRankDelta", rank=2),
    task_norm=True,
    classes=["a", "b", "c"],
)
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# ---------------------------------------------------------------- the model, its patch


def _randomise(model, name, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if f".delta.{name}." in key and tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.05)


def _state(model):
    """Everything a refused load must leave alone (tensors cloned)."""
    return dict(
        tensors={k: v.clone() for k, v in model.state_dict().items()},
        modules=[n for n, _ in model.named_modules()],
        patches=patch_names(model),
        active=active_patch(model),
        grad={n: p.requires_grad for n, p in model.named_parameters()},
        attrs=sorted(vars(model)),
        heads={
            (path, attr): getattr(m, attr)
            for path, m in base_modules(model)
            for attr in CLASS_COUNT_ATTRS
            if isinstance(getattr(m, attr, None), int)
        },
        training=[m.training for m in model.modules()],
    )


def _differences(before: dict, model) -> list[str]:
    now = _state(model)
    diff = [k for k in before if k != "tensors" and before[k] != now[k]]
    if list(now["tensors"]) != list(before["tensors"]):
        diff.append("state-dict keys")
    else:
        diff += [
            f"tensor {k}"
            for k, v in before["tensors"].items()
            if v.dtype != now["tensors"][k].dtype or not torch.equal(v, now["tensors"][k])
        ]
    return diff


def build_small_retinanet() -> torch.nn.Module:
    """The test suite's RetinaNet R-18 FPN at 1/8 of its width (311k parameters): a real
    mmdet model whose forward is cheap enough to run a few hundred times."""
    cfg = load_cfg(MODEL).model
    cfg.backbone.update(base_channels=8, stem_channels=8)
    cfg.neck.update(in_channels=[8, 16, 32, 64], out_channels=16)
    cfg.bbox_head.update(in_channels=16, feat_channels=16, stacked_convs=1)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope("mmdet"):
        return _registry("mmdet").build(cfg).eval()


class _World(dict):
    """The module's shared models and file; a short repr for hypothesis' failure reports."""

    def __repr__(self) -> str:
        return "<world>"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a busy machine
    try:
        yield _world(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _world(tmp_path_factory):
    base = build_small_retinanet()
    batch = make_batch(MODEL, size=32)
    base_out = tensor_outputs(base, batch)

    trained = copy.deepcopy(base)
    apply_delta_patch(trained, CFG)
    _randomise(trained, NAME, seed=0)
    from mmdelta import save_patch

    path = tmp_path_factory.mktemp("fuzz") / "fz.safetensors"
    save_patch(trained, path)
    assert not identical(tensor_outputs(trained, batch)[1:], base_out[1:])  # Δ is non-zero
    del trained

    carrier = copy.deepcopy(base)  # carries the patch, with other values than the file's
    apply_delta_patch(carrier, CFG)
    _randomise(carrier, NAME, seed=1)
    metadata, tensors = read_patch_file(path)
    return _World(
        base=base,
        carrier=carrier,
        batch=batch,
        base_out=base_out,
        path=path,
        bytes=path.read_bytes(),
        metadata=metadata,
        tensors=tensors,
        base_state=_state(base),
        carrier_state=_state(carrier),
    )


def _restore(model, before: dict) -> None:
    """Undoes a successful load (patches added, tensors replaced, selection)."""
    for name in patch_names(model):
        if name not in before["patches"]:
            remove_patch(model, name)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not torch.equal(tensor, before["tensors"][key]):
                tensor.copy_(before["tensors"][key])
    if before["patches"]:
        set_active_patch(model, before["active"])


def _load(world, model, before, path) -> str:
    """Loads ``path`` onto ``model``; checks the outcome; restores the model. Returns
    ``"loaded"`` or ``"refused"``."""
    try:
        name = load_patch(model, path)
    except PatchFileError as err:
        message = str(err)
        assert str(path) in message, f"the error does not name the file: {message!r}"
        diff = _differences(before, model)
        assert not diff, f"refused ({message}) but the model changed: {diff[:5]}"
        if not before["patches"]:
            assert identical(tensor_outputs(model, world["batch"]), world["base_out"])
        return "refused"
    except Exception as err:  # the point: no other exception type may escape
        raise AssertionError(
            f"load_patch raised {type(err).__name__} (not PatchFileError): {err}"
        ) from err
    try:
        assert isinstance(name, str) and name in patch_names(model), name
        assert active_patch(model) == name
        _, file_tensors = read_patch_file(path)
        loaded = _patch_tensors(model, name)
        assert sorted(loaded) == sorted(file_tensors)
        for key, tensor in file_tensors.items():
            assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
        for other in before["patches"]:  # other patches and the base: untouched
            if other != name:
                for key, tensor in _patch_tensors(model, other).items():
                    assert torch.equal(tensor, before["tensors"][_state_key(key, other)])
        state = model.state_dict()
        for key, tensor in before["tensors"].items():
            if ".delta." not in key:
                assert torch.equal(state[key], tensor), f"base tensor {key} changed"
        tensor_outputs(model, world["batch"])  # the patched model runs
        with delta_disabled(model):
            assert identical(tensor_outputs(model, world["batch"]), world["base_out"])
    finally:
        _restore(model, before)
    assert not _differences(before, model), "the test's restore failed"
    return "loaded"


def _state_key(file_key: str, name: str) -> str:
    path, _, tensor = file_key.partition(":")
    return f"{path}.delta.{name}.{tensor}"


def _load_both(world, path) -> tuple[str, str]:
    plain = _load(world, world["base"], world["base_state"], path)
    carrying = _load(world, world["carrier"], world["carrier_state"], path)
    return plain, carrying


def test_the_unmodified_file_loads_onto_both(world):
    assert _load_both(world, world["path"]) == ("loaded", "loaded")


# ---------------------------------------------------------------- byte-level damage


@st.composite
def byte_damage(draw, size: int, header_end: int):
    """A description of damage to a file of ``size`` bytes (drawn small: hypothesis prints
    it when a case fails)."""
    kind = draw(st.sampled_from(["flip_header", "flip_data", "truncate", "append", "length"]))
    if kind in ("flip_header", "flip_data"):
        lo, hi = (0, header_end) if kind == "flip_header" else (header_end, size)
        pos = st.tuples(st.integers(lo, hi - 1), st.integers(1, 255))
        return kind, draw(st.lists(pos, min_size=1, max_size=4))
    if kind == "truncate":
        return kind, draw(st.integers(0, size - 1))
    if kind == "append":
        return kind, draw(st.binary(min_size=1, max_size=64))
    return kind, draw(st.integers(0, 2**64 - 1))


def _damaged(data: bytes, damage: tuple) -> bytes:
    kind, arg = damage
    out = bytearray(data)
    if kind in ("flip_header", "flip_data"):
        for pos, xor in arg:
            out[pos] ^= xor
    elif kind == "truncate":
        out = out[:arg]
    elif kind == "append":
        out += arg
    else:
        out[:8] = struct.pack("<Q", arg)
    return bytes(out)


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_byte_damage_is_loaded_exactly_or_refused(world, tmp_path, data):
    original = world["bytes"]
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    damage = data.draw(byte_damage(len(original), header_end), label="damage")
    damaged = _damaged(original, damage)
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(damaged)
    outcome = _load_both(world, path)
    event(f"{damage[0]}: {outcome}")
    if damage[0] == "truncate" or damaged[:8] != original[:8]:  # data or header cut short
        assert outcome == ("refused", "refused")


# ---------------------------------------------------------------- structural damage

#: metadata fields load_patch reads only for messages, or not at all
INFORMATIONAL = ("mmdelta.version", "mmdelta.base_model", "mmdelta.base_params", "mmdelta.classes")
OTHER_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
)
#: (config key, replacement): valid, invalid and unknown values for the recorded config
CFG_VALUES = st.sampled_from(
    [
        ("branch", dict(type="LowRankDelta", rank=2, alpha=4.0, compute="branch")),
        ("branch", dict(type="LowRankDelta", rank=3)),
        ("branch", dict(type="LowRankDelta", rank=-1)),
        ("branch", dict(type="LowRankDelta", rank=2, alpha=float("inf"))),
        ("branch", dict(type="ScaleShiftDelta")),
        ("branch", dict(type="mmdelta.branches.PatchOwned")),
        ("branch", dict(type="json.JSONDecoder")),
        ("branch", "LowRankDelta"),
        ("branch", None),
        ("targets", ["neck"]),
        ("targets", ["decode_head"]),
        ("targets", []),
        ("targets", "*"),
        ("exclude", ["neck.fpn_convs.*"]),
        ("exclude", ["*"]),
        ("task_norm", "affine"),
        ("task_norm", None),
        ("task_norm", "yes"),
        ("task_norm", 1),
        ("classes", ["a", "b"]),
        ("classes", ["a", "a", "b"]),
        ("classes", []),
        ("classes", None),
        ("class_map", {"a": "nope"}),
        ("class_map", []),
        ("base_classes", [f"c{i}" for i in range(80)]),
        ("trainable", ["bbox_head"]),
        ("trainable", ["nothing_here"]),
        ("name", "other"),
        ("name", "1bad"),
        ("name", ["fz"]),
        ("surprise", 1),
    ]
)


@st.composite
def tensor_damage(draw, keys: list[str], tensors: dict):
    key = draw(st.sampled_from(keys))
    kind = draw(st.sampled_from(["shape", "dtype", "nonfinite", "remove", "extra", "rename"]))
    if kind == "nonfinite":
        floats = [k for k in keys if tensors[k].is_floating_point() and tensors[k].numel()]
        key = draw(st.sampled_from(floats))
        return (
            kind,
            key,
            draw(st.integers(0, tensors[key].numel() - 1)),
            draw(st.sampled_from([float("nan"), float("inf"), float("-inf")])),
        )
    if kind == "shape":
        how = draw(st.sampled_from(["grow", "shrink", "add_dim", "drop_dim", "scalar"]))
        return (kind, key, how)
    if kind == "dtype":
        dtype = draw(st.sampled_from([d for d in OTHER_DTYPES if d != tensors[key].dtype]))
        return (kind, key, dtype)
    if kind == "extra":
        name = draw(
            st.sampled_from(
                [
                    "backbone.conv1:down",  # a layer the patch does not touch
                    key.rpartition(":")[0] + ":extra",  # a tensor the layer's branch lacks
                    "x",
                ]
            )
        )
        return (kind, name, draw(st.integers(0, 4)))
    return (kind, key)


def _apply_tensor_damage(tensors: dict, damage: tuple) -> None:
    kind, key = damage[:2]
    if kind == "nonfinite":
        _, _, index, value = damage
        t = tensors[key].clone()
        t.view(-1)[index] = value
        tensors[key] = t
    elif kind == "shape":
        t, how = tensors[key], damage[2]
        shape = list(t.shape)
        if not shape:  # a scalar (num_batches_tracked): any shape is another one
            shape = [1]
        elif how == "grow":
            shape[0] += 1
        elif how == "shrink" and shape[0] > 1:
            shape[0] -= 1
        elif how == "shrink":
            shape = [*shape, 2]
        elif how == "add_dim":
            shape.append(1)
        elif how == "drop_dim" and len(shape) > 1:
            shape = [shape[0] * shape[1], *shape[2:]]
        elif how == "drop_dim":
            shape = [*shape, 1]
        else:
            shape = []
        tensors[key] = torch.zeros(shape, dtype=t.dtype)
    elif kind == "dtype":
        tensors[key] = tensors[key].to(damage[2])
    elif kind == "remove":
        del tensors[key]
    elif kind == "extra":
        tensors[key] = torch.ones(damage[2])
    else:  # rename
        tensors[key + "_renamed"] = tensors.pop(key)


@st.composite
def metadata_damage(draw, fields: list[str]):
    # the harmless fields first: hypothesis leans towards the first elements
    first = [*INFORMATIONAL, "mmdelta.name", "mmdelta.cfg", "mmdelta.unknown", "other"]
    field = draw(st.sampled_from([*first, *(f for f in fields if f not in first)]))
    kind = draw(st.sampled_from(["text", "json", "remove"]))
    if field == "mmdelta.cfg":
        kind = draw(st.sampled_from(["cfg", "cfg", "cfg", "remove", "text", "json"]))
    if field == "mmdelta.name":
        kind = draw(st.sampled_from(["name", "name", "remove", "text"]))
    if kind == "text":
        return (field, kind, draw(st.text(max_size=20)))
    if kind == "json":
        value = draw(
            st.sampled_from(["{", "null", "[]", "3", '"fz"', "{}", '{"name": "fz"}', "NaN"])
        )
        return (field, kind, value)
    if kind == "cfg":
        return (field, kind, draw(st.lists(CFG_VALUES, min_size=1, max_size=2)))
    if kind == "name":
        return (field, kind, draw(st.sampled_from(["other", NAME, "Other_2", "", "1x", "a.b"])))
    return (field, kind)


def _apply_metadata_damage(metadata: dict, damage: tuple, original: dict) -> None:
    field, kind = damage[:2]
    if kind == "remove":
        metadata.pop(field, None)
    elif kind in ("text", "json", "name"):
        metadata[field] = damage[2]
    else:  # cfg: the recorded config with some keys replaced
        try:
            cfg = json.loads(metadata["mmdelta.cfg"])
            assert isinstance(cfg, dict)
        except (KeyError, ValueError, AssertionError):  # an earlier change broke it
            cfg = json.loads(original["mmdelta.cfg"])
        for key, value in damage[2]:
            cfg[key] = value
        metadata[field] = json.dumps(cfg)


def _metadata_verdict(world, damage: tuple) -> str:
    """``refuse`` / ``load`` / ``either`` for one metadata change (before tensor damage)."""
    field, kind = damage[:2]
    value = damage[2] if len(damage) > 2 else None
    original = world["metadata"].get(field)
    if kind != "remove" and value == original:
        return "load"  # no change
    if field in INFORMATIONAL or field in ("mmdelta.unknown", "other"):
        return "load"
    if field == "mmdelta.name":
        if kind == "remove" or value in ("other", "Other_2"):
            return "load"
        return "refuse" if value in ("", "1x", "a.b") else "either"
    if field == "mmdelta.cfg" and kind == "cfg":
        return "either"
    return "refuse"  # format, version, architecture, fingerprint, cfg garbage / removed


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_structural_damage_is_loaded_exactly_or_refused(world, tmp_path, data):
    metadata, tensors = dict(world["metadata"]), dict(world["tensors"])
    keys = sorted(tensors)
    where = data.draw(st.sampled_from(["metadata", "tensors", "both"]), label="where")
    tensor_changes, meta_changes = [], []
    if where != "metadata":
        tensor_changes = data.draw(
            st.lists(tensor_damage(keys, tensors), min_size=1, max_size=2), label="tensor damage"
        )
    if where != "tensors":
        meta_changes = data.draw(
            st.lists(metadata_damage(sorted(metadata)), min_size=1, max_size=2),
            label="metadata damage",
        )
    for damage in tensor_changes:
        if damage[0] != "extra" and damage[1] not in tensors:
            continue  # removed or renamed by an earlier change
        _apply_tensor_damage(tensors, damage)
    for damage in meta_changes:
        _apply_metadata_damage(metadata, damage, world["metadata"])
    path = tmp_path / "damaged.safetensors"
    if not tensors:
        tensors["x"] = torch.zeros(1)
    save_file(tensors, str(path), metadata=metadata)

    outcome = _load_both(world, path)
    event(str(outcome))
    tensors_changed = set(tensors) != set(world["tensors"]) or any(
        t.dtype != world["tensors"][k].dtype
        or t.shape != world["tensors"][k].shape
        or not torch.equal(t, world["tensors"][k])
        for k, t in tensors.items()
    )
    last = {d[0]: d for d in meta_changes}  # a later change of a field wins
    verdicts = [_metadata_verdict(world, d) for d in last.values()]
    if tensors_changed or "refuse" in verdicts:
        assert outcome == ("refused", "refused"), (tensor_changes, meta_changes)
    elif all(v == "load" for v in verdicts):
        assert outcome == ("loaded", "loaded"), (tensor_changes, meta_changes)


# ---------------------------------------------------------------- recorded configs


def _with_cfg(world, path: Path, edit) -> Path:
    metadata = dict(world["metadata"])
    cfg = json.loads(metadata["mmdelta.cfg"])
    edit(cfg)
    metadata["mmdelta.cfg"] = json.dumps(cfg)
    save_file(dict(world["tensors"]), str(path), metadata=metadata)
    return path


def test_a_file_without_any_patch_name_loads_under_the_default_name(world, tmp_path):
    """No ``mmdelta.name`` and no ``name`` in the recorded config: the patch gets the
    config's default name, is active, and that name is what load_patch returns (it used to
    return ``None`` and leave the patch it had just loaded inactive)."""
    metadata = dict(world["metadata"])
    del metadata["mmdelta.name"]
    cfg = json.loads(metadata["mmdelta.cfg"])
    del cfg["name"]
    metadata["mmdelta.cfg"] = json.dumps(cfg)
    path = tmp_path / "noname.safetensors"
    save_file(dict(world["tensors"]), str(path), metadata=metadata)
    model = world["base"]
    try:
        assert load_patch(model, path) == "default"
        assert patch_names(model) == ["default"] and active_patch(model) == "default"
    finally:
        for name in patch_names(model):
            remove_patch(model, name)
    assert not _differences(world["base_state"], model)
    assert _load_both(world, path) == ("loaded", "loaded")


def test_recorded_config_never_imports_a_module(world, tmp_path, monkeypatch):
    """A branch ``type`` in the file's config that is a dotted path is not imported (mmengine's
    ``Registry.get`` would import the module it names and return any object in it)."""
    marker = tmp_path / "imported.marker"
    module = tmp_path / "mmdelta_fuzz_payload.py"
    module.write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n\n"
        "class Branch:\n    supports = staticmethod(lambda layer: True)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for type_name in ("mmdelta_fuzz_payload.Branch", "mmdelta_fuzz_payload.registry"):
        path = _with_cfg(
            world,
            tmp_path / "payload.safetensors",
            lambda c, t=type_name: c.update(branch={"type": t}),
        )
        assert _load_both(world, path) == ("refused", "refused")
        assert not marker.exists(), f"loading a patch imported a module it names ({type_name})"
    assert "mmdelta_fuzz_payload" not in sys.modules


# ---------------------------------------------------------------- pickles


class _Payload:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("filename", ["evil.safetensors", "evil.pth", "evil.pt", "evil"])
def test_a_pickle_is_refused_without_being_unpickled(world, tmp_path, filename):
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / filename
    torch.save({"backbone.conv1:down": _Payload(str(marker))}, path)
    # the payload works: unpickling it really does create the marker (torch.load reads a
    # *.safetensors name as safetensors, hence a copy)
    check = tmp_path / "check.pth"
    check.write_bytes(path.read_bytes())
    torch.load(check, weights_only=False)
    assert marker.exists()
    marker.unlink()
    assert _load_both(world, path) == ("refused", "refused")
    assert not marker.exists(), "load_patch unpickled the file"


def test_a_safetensors_file_with_a_pickle_in_its_metadata_is_not_unpickled(world, tmp_path):
    import pickle

    marker = tmp_path / "unpickled.marker"
    metadata = dict(world["metadata"])
    metadata["mmdelta.cfg"] = pickle.dumps(_Payload(str(marker))).decode("latin-1")
    path = tmp_path / "meta.safetensors"
    save_file(dict(world["tensors"]), str(path), metadata=metadata)
    assert _load_both(world, path) == ("refused", "refused")
    assert not marker.exists()
    assert os.path.getsize(path) > 0
