"""Fuzzing the ``delta_patch`` schema: every config either builds a valid patch or raises a
``DeltaPatchConfigError`` that names the offending key — never a partial patch, never a
silently unpatched model, never another exception type.

Configs are drawn from the schema's keys (plus unknown ones) with valid and invalid values:
wrong types, ``None``, empty lists, patterns that match nothing / some / everything,
branch dicts of every registered type and unregistered ones with good and bad options
(rank negative, zero, huge; alpha infinite; width huge), task_norm modes, class lists with
duplicates and empty names, class maps onto unknown names. Each is applied to a small real
RetinaNet, either plain or already carrying an active new-class patch:

* success: the patch is there and active, has trainable tensors, the base tensors are
  untouched, with the patch off the model computes the base bitwise, with it on it runs
  (and, without a new class set, still computes the base bitwise: every Δ starts at zero);
* refusal: ``DeltaPatchConfigError`` naming a key of the config, and the model exactly as
  it was (no slots, state dict, ``requires_grad``, attributes, patches, selection).
"""

import copy
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mm_models import _registry, load_cfg, make_batch
from mmengine.registry import DefaultScope

from mmdelta import (
    DeltaPatchConfigError,
    active_patch,
    apply_delta_patch,
    delta_disabled,
    patch_names,
    remove_patch,
    set_active_patch,
)
from mmdelta.exactness import identical, tensor_outputs
from mmdelta.patching.classes import CLASS_COUNT_ATTRS
from mmdelta.patching.config import ALLOWED_KEYS
from mmdelta.patching.state import patch_configs
from mmdelta.patching.targets import base_modules

MODEL = "retinanet_r18_fpn"
BASE_CLASSES = tuple(f"c{i}" for i in range(80))
HELD = "held"  # the patch the carrier model already has
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def build_small_retinanet() -> torch.nn.Module:
    """The test suite's RetinaNet R-18 FPN at 1/8 of its width (311k parameters), with the
    80 base class names in its ``dataset_meta``."""
    cfg = load_cfg(MODEL).model
    cfg.backbone.update(base_channels=8, stem_channels=8)
    cfg.neck.update(in_channels=[8, 16, 32, 64], out_channels=16)
    cfg.bbox_head.update(in_channels=16, feat_channels=16, stacked_convs=1)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope("mmdet"):
        model = _registry("mmdet").build(cfg).eval()
    model.dataset_meta = {"classes": BASE_CLASSES}
    return model


def _state(model) -> dict:
    return dict(
        tensors={k: v.clone() for k, v in model.state_dict().items()},
        modules=[n for n, _ in model.named_modules()],
        patches=patch_names(model),
        active=active_patch(model),
        grad={n: p.requires_grad for n, p in model.named_parameters()},
        attrs=sorted(vars(model)),
        forwards=[n for n, m in model.named_modules() if "forward" in vars(m)],
        heads={
            (path, attr): getattr(m, attr)
            for path, m in base_modules(model)
            for attr in (*CLASS_COUNT_ATTRS, "dataset_meta")
            if hasattr(m, attr)
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


class _World(dict):
    """The module's shared models; a short repr for hypothesis' failure reports."""

    def __repr__(self) -> str:
        return "<world>"


@pytest.fixture(scope="module")
def world():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a busy machine
    try:
        base = build_small_retinanet()
        batch = make_batch(MODEL, size=32)
        carrier = copy.deepcopy(base)
        apply_delta_patch(carrier, dict(name=HELD, classes=["c3", "x", "c5"]))
        yield _World(
            base=base,
            carrier=carrier,
            batch=batch,
            base_out=tensor_outputs(base, batch),
            states={"base": _state(base), "carrier": _state(carrier)},
        )
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- configs
#
# A config is drawn as a *well-typed* config (every value passes the schema's type checks;
# it may still fail on this model: patterns that match nothing or only parameter-less
# modules, branch options out of range, a class map onto unknown names, a name in use)
# plus, half the time, exactly one *ill-typed* value (or unknown key), which must be refused
# with an error that names that key.

PATTERNS = st.sampled_from(
    [
        "backbone",
        "neck",
        "bbox_head",
        "backbone.layer1",
        "backbone.layer4.1.conv2",
        "backbone.layer2.0.bn1",
        "neck.fpn_convs.*",
        "*conv*",
        "*",
        "bbox_head.retina_cls",
        "backbone.relu",  # a module without parameters
        "data_preprocessor",
        "backbone.layer9",  # matches nothing
        "bakbone",
    ]
)
PATTERN_LISTS = st.one_of(
    st.lists(PATTERNS, min_size=1, max_size=3), PATTERNS, st.sampled_from([None, [], ()])
)
BAD_PATTERNS = st.sampled_from([3, [3], [None], [""], "", {"a": 1}, 2.5, True, [["neck"]]])
CLASS_NAMES = st.sampled_from(["a", "b", "c3", "c79", "x"])


def _branch_option_values():
    return {
        "LowRankDelta": {
            "rank": st.sampled_from([1, 2, 8, 10**6, 10**400, 0, -1, 2.5, True, "4", None]),
            "alpha": st.sampled_from([None, 0.5, 16, 1e308, 0, -1, math.inf, math.nan, "1"]),
            "compute": st.sampled_from(["auto", "branch", "weight", "fast", None]),
        },
        "BlockDelta": {"width": st.sampled_from([1, 4, 0, -3, 2.5, None, 2**40])},
        "ScaleShiftDelta": {},
    }


@st.composite
def branches(draw):
    """``None``, ``{}`` or a registered type with some of its options (any values)."""
    kind = draw(st.sampled_from(["none", "default", "typed", "typed", "typed"]))
    if kind == "none":
        return None
    if kind == "default":
        return {}
    options = _branch_option_values()
    branch_type = draw(st.sampled_from(sorted(options)))
    names = sorted(options[branch_type])
    chosen = draw(st.sets(st.sampled_from(names), max_size=2)) if names else set()
    return {"type": branch_type, **{k: draw(options[branch_type][k]) for k in sorted(chosen)}}


@st.composite
def good_configs(draw):
    keys = draw(st.sets(st.sampled_from(ALLOWED_KEYS), max_size=5))
    cfg = {}
    for key in sorted(keys):
        if key == "name":
            cfg[key] = draw(st.sampled_from(["p", "patch_1", "default", "A9", HELD]))
        elif key in ("targets", "exclude", "trainable"):
            cfg[key] = draw(PATTERN_LISTS)
        elif key == "branch":
            cfg[key] = draw(branches())
        elif key == "task_norm":
            cfg[key] = draw(st.sampled_from([True, False, "stats", "affine", None]))
        elif key == "classes":
            cfg[key] = draw(st.lists(CLASS_NAMES, min_size=1, max_size=4, unique=True))
    if "classes" in cfg:  # only meaningful with a class set
        if "base_classes" in keys:
            cfg["base_classes"] = draw(
                st.sampled_from([None, list(BASE_CLASSES), list(BASE_CLASSES[:79])])
            )
        if "class_map" in keys:
            new = st.sampled_from(cfg["classes"])
            old = st.sampled_from(["c0", "c7", "c79", "zzz"])
            cfg["class_map"] = draw(st.one_of(st.none(), st.dictionaries(new, old, max_size=2)))
    return cfg


#: ill-typed values: the schema refuses each, whatever else the config holds
BAD_VALUES = {
    "name": st.sampled_from(["", "1x", "a.b", "my patch", "active", None, 3, ["p"]]),
    "targets": BAD_PATTERNS,
    "exclude": BAD_PATTERNS,
    "trainable": BAD_PATTERNS,
    "branch": st.sampled_from(
        [
            "LowRankDelta",
            [],
            3,
            [("type", "LowRankDelta")],
            {"type": "LoRA"},
            {"type": "mmdelta.branches.PatchOwned"},  # a class, not a registered type
            {"type": "mmdelta.LowRankDelta"},
            {"type": "json.JSONDecoder"},
            {"type": None},
            {"type": 3},
            {"rnk": 4},
            {3: 1, "rank": 2},
            {"type": "ScaleShiftDelta", "rank": 2},
            {"type": "BlockDelta", "alpha": 1.0},
        ]
    ),
    "task_norm": st.sampled_from(["yes", 1, 0, [], "Affine", 2.5, {"mode": "stats"}]),
    "classes": st.sampled_from(["cat", [], [1, 2], ["a", "a"], ["a", ""], 3, {"a": 1}, b"ab"]),
    "base_classes": st.sampled_from(["c0", [], ["c0", "c0"], [1], 80, [None]]),
    "class_map": st.sampled_from([[], "a", 0, False, {"a": 1}, {1: "c0"}, {"zz": "c1"}]),
}
UNKNOWN_KEYS = st.sampled_from(["target", "rank", "Name", "", 3, None, ("name",)])


@st.composite
def configs(draw):
    """``(cfg, key)``: a config and the key that must be named in its error (``None``: the
    config may apply or fail for any of its keys)."""
    if draw(st.integers(0, 24)) == 0:  # now and then not a dict at all
        return draw(st.sampled_from(["backbone", [("name", "p")], 3, ("p",)])), "delta_patch"
    cfg = draw(good_configs())
    fault = draw(st.sampled_from([None, None, "unknown", *sorted(BAD_VALUES)]))
    if fault == "unknown":
        key = draw(UNKNOWN_KEYS)
        cfg[key] = draw(st.sampled_from([None, 1, "x", [], {}]))
        return cfg, key
    if fault is not None:
        cfg[fault] = draw(BAD_VALUES[fault])
        if fault == "class_map" and cfg[fault] == {"zz": "c1"}:
            cfg["classes"] = cfg.get("classes") or ["a"]  # 'zz' is not among them
        if fault in ("base_classes", "class_map") and cfg[fault] in ([], "a", 0, False):
            cfg.setdefault("classes", ["a"])
    return cfg, fault


# ---------------------------------------------------------------- the property


def _names_a_key(message: str, cfg, key) -> bool:
    """Whether the error names ``key`` (``None``: any key of ``cfg``); ``"delta_patch"``:
    ``cfg`` is not a dict at all."""
    if key == "delta_patch":
        return message.startswith("delta_patch must be a dict")
    if "delta_patch" not in message:
        return False
    keys = list(cfg) if key is None else [key]
    return any(
        repr(k) in message or (isinstance(k, str) and k and re.search(rf"\b{k}\b", message))
        for k in keys
    )


def _check(world, which: str, cfg, key=None) -> str:
    model = world[which]
    before = world["states"][which]
    try:
        summary = apply_delta_patch(model, copy.deepcopy(cfg))
    except DeltaPatchConfigError as err:
        message = str(err)
        named = "the key" if key is None else repr(key)
        assert _names_a_key(message, cfg, key), f"{cfg!r}: error does not name {named}: {message!r}"
        diff = _differences(before, model)
        assert not diff, f"refused ({message}) but the model changed: {diff[:5]}"
        return "refused"
    except Exception as err:  # the point: no other exception type may escape
        raise AssertionError(
            f"{cfg!r} raised {type(err).__name__} (not DeltaPatchConfigError): {err}"
        ) from err
    assert key is None, f"{cfg!r} was applied, but its {key!r} is ill-typed"
    name = summary.name
    try:
        assert patch_names(model) == [*before["patches"], name]
        assert active_patch(model) == name
        params = dict(model.named_parameters())
        own = [k for k in params if f".delta.{name}." in k]
        assert own and any(params[k].requires_grad for k in own), "the patch trains nothing"
        assert not any(p.requires_grad for k, p in params.items() if f".delta.{name}." not in k), (
            "a tensor outside the new patch requires grad"
        )
        state = model.state_dict()
        for key, tensor in before["tensors"].items():
            assert torch.equal(state[key], tensor), f"{key} changed"
        out = tensor_outputs(model, world["batch"])
        assert all(bool(torch.isfinite(t).all()) for t in out), "non-finite outputs"
        classes = patch_configs(model)[name]["classes"]
        if classes is None:  # every Δ is zero and every owned copy is exact: the base
            assert identical(out, world["base_out"]), "a fresh patch changed the outputs"
        else:
            assert out[0].shape[1] == 9 * len(classes)  # RetinaNet: 9 anchors per class
        with delta_disabled(model):
            assert identical(tensor_outputs(model, world["batch"]), world["base_out"])
    finally:
        remove_patch(model, name)
        if before["active"] is not None:  # the new patch was made the active one
            set_active_patch(model, before["active"])
    diff = _differences(before, model)
    assert not diff, f"removing the patch left {diff[:5]}"
    return "applied"


@FUZZ
@given(drawn=configs(), which=st.sampled_from(["base", "base", "carrier"]))
def test_every_config_builds_a_valid_patch_or_names_its_error(world, drawn, which):
    cfg, key = drawn
    outcome = _check(world, which, cfg, key)
    event(f"{outcome} ({'well-typed' if key is None else 'ill-typed'})")


def test_the_fuzzer_reaches_both_outcomes(world):
    """Known configs through the same checks: the property holds for both outcomes."""
    assert _check(world, "base", {}) == "applied"
    assert _check(world, "carrier", dict(name="p", classes=["a", "c7"])) == "applied"
    assert _check(world, "base", dict(branch=dict(type="ScaleShiftDelta"))) == "applied"
    assert _check(world, "base", dict(branch=dict(alpha=math.inf))) == "refused"
    assert _check(world, "base", {3: 1, "target": 2}, key=3) == "refused"
    assert _check(world, "base", dict(branch={"type": "BlockDelta", "width": 2**40})) == "refused"
    assert _check(world, "base", dict(classes=["a"], class_map={"a": "zzz"})) == "refused"
    assert _check(world, "base", dict(class_map=[]), key="class_map") == "refused"
    assert _check(world, "carrier", dict(name=HELD)) == "refused"


@pytest.mark.parametrize("type_name", ["mmdelta_fuzz_cfg_payload.Branch", "json.JSONDecoder"])
def test_a_branch_type_is_never_imported(world, tmp_path, monkeypatch, type_name):
    """``branch.type`` names a registered Δ branch type; a dotted path is refused without
    importing anything (mmengine's ``Registry.get`` imports the module a dotted name names
    and returns any object in it)."""
    marker = tmp_path / "imported.marker"
    (tmp_path / "mmdelta_fuzz_cfg_payload.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n\n"
        "class Branch:\n    supports = staticmethod(lambda layer: True)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DeltaPatchConfigError, match="not a registered Δ branch type"):
        apply_delta_patch(world["base"], dict(branch=dict(type=type_name)))
    assert not marker.exists()
    assert not _differences(world["states"]["base"], world["base"])
