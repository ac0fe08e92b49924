"""One :class:`~mmdelta.patching.state.PatchState` per patched model, and what it promises.

A patched model survives ``copy.deepcopy``, ``pickle`` and ``torch.save(model)`` /
``torch.load`` with its patches, selection and frozen-base guard, and computes bit for bit
what it computed before, patch on and off (real mmdet / mmseg / mmpretrain models, two
patches of different kinds with trained-looking values). The copy is independent of the
original; the last patch removed leaves a plain model; one rule says which patch save /
merge mean when none is named.
"""

import copy
import io
import pickle

import pytest
import torch
from mm_models import MODELS, build_model, make_batch, tensor_outputs
from torch import nn

from mmdelta import (
    active_patch,
    apply_delta_patch,
    base_state_dict,
    merge_patch,
    patch_names,
    remove_patch,
    save_patch,
    set_active_patch,
)
from mmdelta.exactness import identical
from mmdelta.patching.slot import SlotForward, iter_slots
from mmdelta.patching.state import STATE_ATTR, GuardedTrain, PatchState, resolve_patch_name
from mmdelta.patching.targets import base_modules

#: model -> its two patches: the default low-rank Δ, and a second one of another kind
PATCHES = {
    "retinanet_r18_fpn": [
        dict(name="a"),
        dict(name="b", preset="fast", classes=[f"n{i}" for i in range(5)]),
    ],
    "deeplabv3_r18_v1c": [dict(name="a", task_norm=True), dict(name="b", preset="fast")],
    "convnext_classifier": [
        dict(name="a"),
        dict(name="b", branch=dict(type="ScaleShiftDelta"), targets=["backbone.*"]),
    ],
}


def round_trip(model: nn.Module, how: str) -> nn.Module:
    if how == "deepcopy":
        return copy.deepcopy(model)
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def patched(name: str) -> nn.Module:
    """The model with both patches, every patch tensor moved off its zero init."""
    model = build_model(name)
    if MODELS[name] == "mmdet":
        model.bbox_head.test_cfg.max_per_img = 20
    for cfg in PATCHES[name]:
        apply_delta_patch(model, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, slot in iter_slots(model):
            for part in slot.values():
                for p in part.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    set_active_patch(model, "a")
    return model.eval()


def outputs(model: nn.Module, batch: dict) -> dict:
    """Outputs with each selection; the selection is put back."""
    saved, out = active_patch(model), {}
    for selection in (None, "a", "b"):
        set_active_patch(model, selection)
        with torch.no_grad():
            out[selection] = tensor_outputs(model, batch)
    set_active_patch(model, saved)
    return out


@pytest.fixture(scope="module", params=list(PATCHES))
def world(request):
    name = request.param
    model = patched(name)
    batch = make_batch(name, size=32)
    return dict(name=name, model=model, batch=batch, out=outputs(model, batch))


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_patched_model_survives_a_round_trip_bit_for_bit(world, how):
    model = world["model"]
    twin = round_trip(model, how)
    assert isinstance(twin.__dict__[STATE_ATTR], PatchState)
    assert patch_names(twin) == ["a", "b"] and active_patch(twin) == "a"
    assert isinstance(twin.__dict__["train"], GuardedTrain) and twin.train.model is twin
    for path, _ in iter_slots(twin):
        forward = twin.get_submodule(path).__dict__["forward"]
        assert isinstance(forward, SlotForward) and forward.layer is twin.get_submodule(path)
    got = outputs(twin, world["batch"])
    for selection, expected in world["out"].items():
        assert identical(got[selection], expected), f"{how}: patch {selection} differs"
    assert not identical(world["out"]["a"], world["out"][None])  # the patch does something

    # independent of the original: switching or removing on the twin leaves it alone
    set_active_patch(twin, "b")
    remove_patch(twin, "a")
    assert active_patch(model) == "a" and patch_names(model) == ["a", "b"]
    assert identical(outputs(model, world["batch"])["a"], world["out"]["a"])


def test_the_guard_survives_a_round_trip(world):
    twin = round_trip(world["model"], "torch.save")
    set_active_patch(twin, "b")
    set_active_patch(twin, "a")  # the batch's labels are the base's classes
    twin.train()
    trainable = {n for n, p in twin.named_parameters() if p.requires_grad}
    assert trainable and all(".delta.a." in n for n in trainable)
    assert all(
        not m.training
        for _, m in base_modules(twin)
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )
    base = {k: v.clone() for k, v in base_state_dict(twin).items()}
    batch = twin.data_preprocessor(world["batch"], True)
    loss, _ = twin.parse_losses(twin(**batch, mode="loss"))
    loss.backward()
    after = base_state_dict(twin)
    assert all(torch.equal(after[k], v) for k, v in base.items()), "a base tensor changed"
    assert all(p.grad is None for n, p in twin.named_parameters() if ".delta." not in n)


def test_last_patch_removed_leaves_a_plain_model():
    model = build_model("retinanet_r18_fpn")
    plain = build_model("retinanet_r18_fpn")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_delta_patch(model, dict(name="a"))
    apply_delta_patch(model, dict(name="b", branch=dict(type="ScaleShiftDelta")))
    remove_patch(model, "a")
    assert STATE_ATTR in model.__dict__ and patch_names(model) == ["b"]
    remove_patch(model, "b")
    for path, module in model.named_modules():
        assert not any(a.startswith("_mmdelta") for a in module.__dict__), path
        assert "forward" not in module.__dict__ and "train" not in module.__dict__, path
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.state_dict().keys() == plain.state_dict().keys()
    batch = make_batch("retinanet_r18_fpn", size=32)
    assert identical(tensor_outputs(model, batch), tensor_outputs(plain, batch))


def test_one_rule_says_which_patch_is_meant(tmp_path):
    model = build_model("deeplabv3_r18_v1c")
    apply_delta_patch(model, dict(name="a", branch=dict(type="ScaleShiftDelta")))
    set_active_patch(model, None)
    # one patch, none active: that one
    assert resolve_patch_name(model, None, "save") == "a"
    assert save_patch(model, tmp_path / "a.safetensors").is_file()
    assert not any(".delta." in k for k in merge_patch(model).state_dict())
    # two patches, none active: say which (the message names the action and the patches)
    apply_delta_patch(model, dict(name="b", branch=dict(type="ScaleShiftDelta")))
    set_active_patch(model, None)
    with pytest.raises(ValueError, match=r"say which to save: one of \['a', 'b'\]"):
        save_patch(model, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=r"say which to merge: one of \['a', 'b'\]"):
        merge_patch(model)
    with pytest.raises(KeyError, match="carries no patch 'c'"):
        merge_patch(model, "c")
    set_active_patch(model, "b")
    assert resolve_patch_name(model, None) == "b"
    assert not (tmp_path / "x.safetensors").exists()
