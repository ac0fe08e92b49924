"""The central promise on real mmdet / mmseg / mmpretrain models: with the patch off the
model is the base model bit for bit — right after patching, with non-zero Δ weights, and
after real training steps (BatchNorm statistics included)."""

import pytest
import torch
from mm_models import MODELS, build_pair, make_batch, outputs_equal, tensor_outputs
from mmengine.optim import OptimWrapper

from mmdelta import apply_delta_patch, delta_disabled
from mmdelta.patching.slot import iter_slots, slot_prefixes


def delta_params(model):
    return {
        f"{path}.delta.{name}.{pname}": p
        for path, slot in iter_slots(model)
        for name, branch in slot.items()
        for pname, p in branch.named_parameters()
    }


def base_state(model):
    prefixes = slot_prefixes(model)
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(prefixes)}


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_model_is_exact_until_delta_is_nonzero(name):
    model, base = build_pair(name)
    batch = make_batch(name)
    expected = tensor_outputs(base, batch)

    summary = apply_delta_patch(model, {})
    assert summary.layers and summary.delta_params > 0
    assert outputs_equal(tensor_outputs(model, batch), expected)

    torch.manual_seed(0)
    for key, p in delta_params(model).items():
        if key.endswith(".up"):
            torch.nn.init.normal_(p, std=0.1)
    patched = tensor_outputs(model, batch)
    assert not outputs_equal(patched, expected), "non-zero Δ weights must change the output"

    with delta_disabled(model):
        assert outputs_equal(tensor_outputs(model, batch), expected)
    # the patch is live again after the block
    assert outputs_equal(tensor_outputs(model, batch), patched)


@pytest.mark.parametrize("name", list(MODELS))
def test_training_steps_touch_only_delta(name):
    model, base = build_pair(name)
    batch = make_batch(name)
    expected = tensor_outputs(base, batch)
    apply_delta_patch(model, {})
    before = base_state(model)
    deltas = delta_params(model)
    initial = {k: p.detach().clone() for k, p in deltas.items()}

    assert {id(p) for p in model.parameters() if p.requires_grad} == {
        id(p) for p in deltas.values()
    }

    got_grad = dict.fromkeys(deltas, False)
    for key, p in deltas.items():
        p.register_hook(
            lambda g, key=key: got_grad.__setitem__(key, got_grad[key] or bool(g.abs().sum() > 0))
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = OptimWrapper(torch.optim.SGD(trainable, lr=0.01, momentum=0.9))
    model.train()
    for step in range(3):
        losses = model.train_step(make_batch(name, seed=step), optim)
        assert all(torch.isfinite(v).all() for v in losses.values())

    assert all(got_grad.values()), [k for k, v in got_grad.items() if not v]
    unchanged = [k for k, p in deltas.items() if torch.equal(p, initial[k])]
    assert not unchanged, unchanged

    after = base_state(model)
    reference = base.state_dict()
    assert after.keys() == before.keys() == reference.keys()
    changed = [
        k
        for k in before
        if not (torch.equal(before[k], after[k]) and torch.equal(after[k], reference[k]))
    ]
    assert not changed, f"base tensors changed by training: {changed}"
    with delta_disabled(model):
        assert outputs_equal(tensor_outputs(model, batch), expected)
    assert not outputs_equal(tensor_outputs(model, batch), expected)
