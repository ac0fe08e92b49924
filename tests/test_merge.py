"""``merge_patch`` on real models: a patch with a substantial Δ folds into plain weights.

The merged model computes what the patched model computes (both forms of the low-rank Δ),
carries nothing of mmdelta, is what plain mmdet / mmseg builds for the patch's class count
(its checkpoint loads there, in a fresh process that never imports mmdelta) and leaves the
patched model as it was. Branches that cannot be folded (``BlockDelta``) are refused.
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mm_models import CONFIGS, MODELS, build_model, load_cfg, make_batch, register_scopes
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import DefaultScope
from torch import nn

from mmdelta import (
    DELTA_BRANCHES,
    LowRankDelta,
    PatchOwned,
    active_patch,
    apply_delta_patch,
    base_state_dict,
    merge_patch,
    patch_names,
    remove_patch,
    set_active_patch,
)
from mmdelta.exactness import flat_tensors, identical
from mmdelta.patching.slot import iter_slots

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5  # relative to each output tensor's max abs
#: RPN proposals per image in mode='tensor' (1000 upstream): keeps the RoI head cheap
MAX_PROPOSALS = 64
#: half the new classes are base classes (their rows are copied), one comes via class_map
NEW_CLASSES = [f"c{i}" for i in range(0, 20, 2)] + [f"new{i}" for i in range(10)]
#: model -> the patch merged in the substantial-Δ tests (default LowRankDelta branch)
SUBSTANTIAL = {
    "faster_rcnn_r50_fpn": dict(
        classes=NEW_CLASSES,
        base_classes=[f"c{i}" for i in range(80)],
        class_map={"new0": "c79"},
    ),
    "upernet_convnext": dict(
        classes=NEW_CLASSES,
        base_classes=[f"c{i}" for i in range(150)],
        class_map={"new0": "c149"},
        task_norm=True,
    ),
}


def needs_branch(type_name: str):
    return pytest.mark.skipif(
        DELTA_BRANCHES.get(type_name) is None, reason=f"{type_name} is not registered yet"
    )


def forward(model: nn.Module, data: dict, grad: bool = False) -> list[torch.Tensor]:
    """``mode='tensor'`` outputs in eval mode; with ``grad`` the forward runs with grad
    enabled (LowRankDelta's branch form ``f(x; W) + Δ(x)``), else under ``no_grad``
    (its weight form ``f(x; W + ΔW)``)."""
    model.eval()
    with torch.set_grad_enabled(grad):
        outputs = flat_tensors(model(**data, mode="tensor"))
    assert outputs and all(t.numel() for t in outputs), "mode='tensor' returned nothing"
    return [t.detach() for t in outputs]


def assert_close(got: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(expected), what
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.shape == e.shape, f"{what}: output {i} {tuple(g.shape)} vs {tuple(e.shape)}"
        scale = e.abs().max().item()
        err = (g - e).abs().max().item() / scale
        assert scale > 0 and err <= TOL, f"{what}: output {i} relative error {err:.3g} > {TOL}"


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "slots": {path: sorted(slot) for path, slot in iter_slots(model)},
        "active": active_patch(model),
        "attrs": {p: simple_attrs(m) for p, m in model.named_modules()},
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k, v in before["state"].items() if not torch.equal(after["state"][k], v)]
    assert not changed, f"state changed: {changed[:5]}"
    for key in ("grad", "slots", "active", "attrs", "training"):
        assert after[key] == before[key], key


def assert_plain(merged: nn.Module) -> None:
    """Nothing of mmdelta is left: no slot, branch, guard, dispatcher or attribute."""
    for path, module in merged.named_modules():
        assert "delta" not in module._modules, f"{path} still has a delta child"
        assert not type(module).__module__.startswith("mmdelta"), (path, type(module))
        leftovers = [a for a in module.__dict__ if a.startswith("_mmdelta")]
        assert not leftovers, f"{path or 'model'} keeps {leftovers}"
        assert "forward" not in module.__dict__, f"{path} keeps an instance-level forward"
        assert "train" not in module.__dict__, f"{path} keeps an instance-level train"
    assert not [k for k in merged.state_dict() if ".delta." in k or k.startswith("delta.")]


def _plain(value) -> bool:
    if isinstance(value, tuple):
        return all(_plain(v) for v in value)
    return isinstance(value, (int, float, str, bool, type(None)))


def simple_attrs(module: nn.Module) -> dict:
    """A module's plain-valued attributes (``num_classes``, ``out_channels``, flags, …)."""
    return {k: v for k, v in module.__dict__.items() if _plain(v)}


def build_plain(name: str, num_classes: int) -> nn.Module:
    """What plain mmdet / mmseg builds from the test config for ``num_classes`` classes."""
    cfg = load_cfg(name).model
    if MODELS[name] == "mmdet":
        cfg.roi_head.bbox_head.num_classes = num_classes
    else:
        cfg.decode_head.num_classes = num_classes
        cfg.auxiliary_head.num_classes = num_classes
    register_scopes()
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(MODELS[name]):
        return ROOT_MODELS.build(cfg).eval()


def set_substantial_delta(model: nn.Module, seed: int = 0) -> dict[str, float]:
    """Random Δ with ‖ΔW‖/‖W‖ between 0.12 and 0.4 on every low-rank layer; owned tensors
    (heads, task norms) perturbed. Returns layer path -> ‖ΔW‖/‖W‖ (from ``delta_weight``)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(t):
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)

    ratios = {}
    with torch.no_grad():
        for path, slot in iter_slots(model):
            layer = model.get_submodule(path)
            for branch in slot.values():
                if isinstance(branch, LowRankDelta):
                    branch.up.copy_(randn(branch.up))
                    target = 0.12 + 0.28 * torch.rand((), generator=gen).item()
                    ratio = branch.delta_weight().norm() / layer.weight.norm()
                    branch.up.mul_(target / ratio)
                    ratios[path] = (branch.delta_weight().norm() / layer.weight.norm()).item()
                elif isinstance(branch, PatchOwned):
                    for tensor in branch.parameters():
                        tensor.mul_(1 + 0.1 * randn(tensor)).add_(0.05 * randn(tensor))
                    for key, tensor in branch.named_buffers():
                        if key.endswith("running_mean"):
                            tensor.add_(0.1 * randn(tensor))
                        elif key.endswith("running_var"):
                            tensor.mul_(1 + 0.3 * torch.rand(tensor.shape, generator=gen))
    return ratios


def build_case(name: str) -> SimpleNamespace:
    """The model patched with a substantial Δ and a new class set, its outputs, and the merge."""
    model = build_model(name)
    if MODELS[name] == "mmdet":
        model.rpn_head.test_cfg.max_per_img = MAX_PROPOSALS
    apply_delta_patch(model, SUBSTANTIAL[name])
    ratios = set_substantial_delta(model)
    with torch.no_grad():
        data = model.data_preprocessor(make_batch(name, size=32), False)
    weight_form = forward(model, data)  # eval + no_grad: f(x; W + ΔW)
    branch_form = forward(model, data, grad=True)  # grad enabled: f(x; W) + Δ(x)
    before = snapshot(model)
    merged = merge_patch(model)
    return SimpleNamespace(
        name=name,
        model=model,
        merged=merged,
        data=data,
        ratios=ratios,
        weight_form=weight_form,
        branch_form=branch_form,
        before=before,
    )


@pytest.fixture(scope="module")
def cases():
    """Builds each substantial-Δ case once for the whole module (on first use)."""
    built = {}

    def get(name: str) -> SimpleNamespace:
        if name not in built:
            built[name] = build_case(name)
        return built[name]

    yield get
    built.clear()


@pytest.fixture(params=list(SUBSTANTIAL))
def case(request, cases):
    return cases(request.param)


def test_delta_is_substantial(case):
    branches = {path: slot["default"] for path, slot in iter_slots(case.model)}
    lowrank = [p for p, b in branches.items() if isinstance(b, LowRankDelta)]
    owned = [p for p, b in branches.items() if isinstance(b, PatchOwned)]
    assert len(lowrank) >= 20 and len(lowrank) + len(owned) == len(branches)
    assert sorted(case.ratios) == sorted(lowrank)
    small = {p: r for p, r in case.ratios.items() if not r >= 0.1}
    assert not small, f"‖ΔW‖/‖W‖ < 0.1 on {small}"
    assert any(p.endswith(("fc_cls", "conv_seg")) for p in owned), owned
    if SUBSTANTIAL[case.name].get("task_norm"):
        assert any(".norm" in p or p.endswith(".bn") for p in owned), owned


def test_merged_outputs_equal_patched(case):
    merged_outputs = forward(case.merged, case.data)
    assert_close(merged_outputs, case.weight_form, "merged vs patched (weight form)")
    assert_close(merged_outputs, case.branch_form, "merged vs patched (branch form)")
    # the class dimension is the patch's: 20 classes (+ background for mmdet's fc_cls)
    assert len(NEW_CLASSES) in merged_outputs[0].shape or (
        len(NEW_CLASSES) + 1 in merged_outputs[0].shape
    )


def test_merged_model_is_plain(case):
    merged = case.merged
    assert type(merged) is type(case.model)
    assert_plain(merged)
    assert not merged.training
    # exactly the base's state-dict keys; only class-dependent tensors change shape
    base = base_state_dict(case.model)
    state = merged.state_dict()
    assert list(state) == list(base)
    reshaped = {k.rpartition(".")[0] for k in base if state[k].shape != base[k].shape}
    assert (
        reshaped
        == {
            "faster_rcnn_r50_fpn": {"roi_head.bbox_head.fc_cls", "roi_head.bbox_head.fc_reg"},
            "upernet_convnext": {"decode_head.conv_seg", "auxiliary_head.conv_seg"},
        }[case.name]
    )
    # no tensor is shared with the patched model
    ours = {t.data_ptr() for t in case.model.state_dict().values() if t.numel()}
    assert not [k for k, t in state.items() if t.numel() and t.data_ptr() in ours]


@pytest.mark.parametrize(
    "name",
    [
        "faster_rcnn_r50_fpn",
        "upernet_convnext",
    ],
)
def test_merged_model_is_what_upstream_builds(name, cases):
    """Same module tree, attributes, ``requires_grad`` and ``train()`` behaviour as the model
    plain mmdet / mmseg builds for the patch's class count."""
    merged = cases(name).merged
    plain = build_plain(name, len(NEW_CLASSES))
    if MODELS[name] == "mmdet":
        plain.rpn_head.test_cfg.max_per_img = MAX_PROPOSALS
    ours, theirs = dict(merged.named_modules()), dict(plain.named_modules())
    assert list(ours) == list(theirs)
    assert [type(m) for m in ours.values()] == [type(m) for m in theirs.values()]
    differ = {
        path: {
            k: (simple_attrs(m).get(k), simple_attrs(theirs[path]).get(k))
            for k in simple_attrs(m).keys() | simple_attrs(theirs[path]).keys()
            if simple_attrs(m).get(k) != simple_attrs(theirs[path]).get(k)
        }
        for path, m in ours.items()
        if simple_attrs(m) != simple_attrs(theirs[path])
    }
    assert not differ, differ
    grads = {k: p.requires_grad for k, p in merged.named_parameters()}
    assert grads == {k: p.requires_grad for k, p in plain.named_parameters()}
    if MODELS[name] == "mmdet":
        assert not all(grads.values())  # frozen_stages=1: the stem and layer1 stay frozen
    try:
        merged.train()
        plain.train()
        assert [m.training for m in merged.modules()] == [m.training for m in plain.modules()]
    finally:
        merged.eval()


def test_merge_keeps_parameters_the_config_froze():
    cfg = load_cfg("retinanet_r18_fpn").model
    cfg.backbone.norm_cfg = dict(type="BN", requires_grad=False)  # caffe-style recipes
    register_scopes()
    with DefaultScope.overwrite_default_scope("mmdet"):
        plain, model = ROOT_MODELS.build(cfg).eval(), ROOT_MODELS.build(cfg).eval()
    expected = {k: p.requires_grad for k, p in plain.named_parameters()}
    assert not all(expected.values())
    apply_delta_patch(model, {})
    grads = {k: p.requires_grad for k, p in merge_patch(model).named_parameters()}
    assert grads == expected, sorted(k for k in grads if grads[k] != expected[k])[:5]
    remove_patch(model, "default")
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    assert grads == expected, sorted(k for k in grads if grads[k] != expected[k])[:5]


def test_merge_by_name_while_inactive(cases):
    """Merging a patch that is not active gives the same model (its class set included), and
    the input model stays inactive."""
    case = cases("upernet_convnext")
    model = case.model
    set_active_patch(model, None)
    try:
        merged = merge_patch(model, "default")
        assert active_patch(model) is None
        assert model.decode_head.num_classes == 150
    finally:
        set_active_patch(model, "default")
    assert_unchanged(model, case.before)
    assert_plain(merged)
    assert merged.decode_head.num_classes == merged.auxiliary_head.num_classes == 20
    assert {p: simple_attrs(m) for p, m in merged.named_modules()} == {
        p: simple_attrs(m) for p, m in case.merged.named_modules()
    }
    assert identical(forward(merged, case.data), forward(case.merged, case.data))


def test_input_model_untouched(case):
    model = case.model
    assert_unchanged(model, case.before)
    assert active_patch(model) == "default"
    assert identical(forward(model, case.data), case.weight_form)
    assert all("default" in slot for _, slot in iter_slots(model))


#: runs in a fresh interpreter: plain mmengine / mmdet / mmseg / torch, never mmdelta
CHECK_SCRIPT = r"""
import importlib.abc
import json
import sys


class NoMmdelta(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mmdelta" or name.startswith("mmdelta."):
            raise ImportError(f"{name} imported while loading a merged checkpoint")


sys.meta_path.insert(0, NoMmdelta())

import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.runner import load_checkpoint


def flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for item in out for t in flat(item)] if isinstance(out, (list, tuple)) else []


for job in json.loads(sys.argv[1]):
    scope, num_classes = job["scope"], job["num_classes"]
    if scope == "mmdet":
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    else:
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(job["config"])
    if scope == "mmdet":
        cfg.model.roi_head.bbox_head.num_classes = num_classes
        cfg.model.test_cfg.rpn.max_per_img = job["max_proposals"]
    else:
        cfg.model.decode_head.num_classes = num_classes
        aux = cfg.model.get("auxiliary_head") or []
        for head in aux if isinstance(aux, list) else [aux]:
            head.num_classes = num_classes
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(cfg.model).eval()

    # a plain checkpoint: tensors, dicts and strings only
    plain = torch.load(job["checkpoint"], map_location="cpu", weights_only=True)
    assert set(plain) == {"state_dict", "meta"}, set(plain)
    load_checkpoint(model, job["checkpoint"], map_location="cpu", strict=True)

    io = torch.load(job["io"], map_location="cpu", weights_only=False)
    with torch.no_grad():
        got = flat(model(io["inputs"], io["data_samples"], mode="tensor"))
    expected = io["expected"]
    assert len(got) == len(expected), (scope, len(got), len(expected))
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape, (scope, i, g.shape, e.shape)
        err = ((g - e).abs().max() / e.abs().max()).item()
        assert err <= job["tol"], f"{scope} output {i}: relative error {err:.3g}"
    print(f"{scope}: merged checkpoint OK")

leaked = sorted(m for m in sys.modules if m == "mmdelta" or m.startswith("mmdelta."))
assert not leaked, leaked
print("no mmdelta imported")
"""


def test_merged_checkpoints_load_into_plain_openmmlab(cases, tmp_path):
    """Both merged checkpoints load strictly into plain mmdet / mmseg (one fresh process,
    which never imports mmdelta) and compute the patched model's outputs there."""
    jobs = []
    for name in SUBSTANTIAL:
        case = cases(name)
        checkpoint, io_file = tmp_path / f"{name}.pth", tmp_path / f"{name}_io.pth"
        meta = {"classes": list(NEW_CLASSES), "mmdelta_patch": "default", "base": name}
        torch.save({"state_dict": case.merged.state_dict(), "meta": meta}, checkpoint)
        torch.save(
            {
                "inputs": case.data["inputs"],
                "data_samples": case.data["data_samples"],
                "expected": case.weight_form,
            },
            io_file,
        )
        jobs.append(
            dict(
                scope=MODELS[name],
                config=str(CONFIGS / f"{name}.py"),
                checkpoint=str(checkpoint),
                io=str(io_file),
                num_classes=len(NEW_CLASSES),
                max_proposals=MAX_PROPOSALS,
                tol=TOL,
            )
        )
    result = subprocess.run(
        [sys.executable, "-c", CHECK_SCRIPT, json.dumps(jobs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split("\n")[-3:] == [
        "mmseg: merged checkpoint OK",
        "no mmdelta imported",
        "",
    ], result.stdout


# ------------------------------------------------- ScaleShiftDelta, BlockDelta (DeepLabV3)


@pytest.fixture(scope="module")
def deeplab():
    """DeepLabV3 R-18 with a ScaleShiftDelta patch 'ss' (random γ/β) and, when registered, a
    BlockDelta patch 'blk' (random Δ network); outputs per active patch."""
    if DELTA_BRANCHES.get("ScaleShiftDelta") is None:
        pytest.skip("ScaleShiftDelta is not registered yet")
    name = "deeplabv3_r18_v1c"
    model = build_model(name)
    apply_delta_patch(model, dict(name="ss", branch=dict(type="ScaleShiftDelta")))
    gen = torch.Generator().manual_seed(0)
    scale_shift = 0
    with torch.no_grad():
        for _, slot in iter_slots(model):
            branch = slot["ss"]
            branch.gamma.copy_(0.3 * torch.randn(branch.gamma.shape, generator=gen))
            if branch.beta is not None:
                branch.beta.copy_(0.2 * torch.randn(branch.beta.shape, generator=gen))
            scale_shift += 1
    if DELTA_BRANCHES.get("BlockDelta") is not None:
        apply_delta_patch(model, dict(name="blk", branch=dict(type="BlockDelta", width=16)))
        with torch.no_grad():
            for _, slot in iter_slots(model):
                if "blk" in slot:
                    slot["blk"].up.copy_(0.05 * torch.randn(slot["blk"].up.shape, generator=gen))
    with torch.no_grad():
        data = model.data_preprocessor(make_batch(name, size=32), False)
    outputs = {}
    for patch in (None, "ss", "blk" if "blk" in patch_names(model) else None):
        set_active_patch(model, patch)
        outputs[patch] = forward(model, data)
    return SimpleNamespace(model=model, data=data, outputs=outputs, scale_shift=scale_shift)


@needs_branch("ScaleShiftDelta")
def test_scale_shift_merges_exactly(deeplab):
    model = deeplab.model
    set_active_patch(model, "ss")
    assert deeplab.scale_shift >= 20
    patched = deeplab.outputs["ss"]
    assert not torch.allclose(patched[0], deeplab.outputs[None][0], rtol=1e-2, atol=1e-2)
    before = snapshot(model)

    merged = merge_patch(model)  # the active patch
    assert_plain(merged)
    assert list(merged.state_dict()) == list(base_state_dict(model))
    merged_outputs = forward(merged, deeplab.data)
    assert_close(merged_outputs, patched, "merged vs patched")
    # documented: W', b' come from the very operations the patched forward uses
    assert identical(merged_outputs, patched)
    assert_unchanged(model, before)
    assert identical(forward(model, deeplab.data), patched)


@needs_branch("BlockDelta")
def test_non_mergeable_patch_is_refused(deeplab):
    model = deeplab.model
    set_active_patch(model, "blk")
    before = snapshot(model)
    for selected in ("blk", None):  # by name, or the active patch by default
        with pytest.raises(ValueError, match="BlockDelta") as err:
            merge_patch(model, selected) if selected else merge_patch(model)
        assert "'blk'" in str(err.value) and "backbone.layer" in str(err.value)
        assert_unchanged(model, before)
    assert identical(forward(model, deeplab.data), deeplab.outputs["blk"])

    # the mergeable patch still merges by name while 'blk' is active; 'blk' is dropped
    merged = merge_patch(model, "ss")
    assert_plain(merged)
    assert_unchanged(model, before)
    assert identical(forward(merged, deeplab.data), deeplab.outputs["ss"])


def test_merge_needs_a_patch(deeplab):
    model = deeplab.model
    set_active_patch(model, None)
    before = snapshot(model)
    with pytest.raises(ValueError, match="no patch is active"):
        merge_patch(model)
    with pytest.raises(KeyError, match="nope"):
        merge_patch(model, "nope")
    assert_unchanged(model, before)
