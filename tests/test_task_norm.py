"""Task-specific normalisation (``delta_patch.task_norm``): the patch owns every norm layer
under its targets as its own copy; the base's norm tensors and statistics never change, and
with the patch off the model is the base bit for bit."""

import copy

import pytest
import torch
import torch.nn.functional as F
from mm_models import build_model, build_pair, make_batch, tensor_outputs
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmdelta import (
    apply_delta_patch,
    base_state_dict,
    delta_disabled,
    patch_names,
    set_active_patch,
)
from mmdelta.branches.owned import PatchOwned
from mmdelta.exactness import identical
from mmdelta.patching.slot import iter_slots

#: mmdet images are (size + 32)² pixels: 64² keeps the ResNet-50 steps cheap
SIZE = {"faster_rcnn_r50_fpn": 32, "retinanet_r18_fpn": 32}
NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)
STATS = ("running_mean", "running_var", "num_batches_tracked")


def norms_under(model, roots):
    """(path, module) of every base norm layer under the top-level modules ``roots``."""
    return [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, NORMS) and path.split(".")[0] in roots
    ]


def owned_copy(layer, name="default"):
    """The patch ``name``'s own copy of ``layer`` (asserts it is a PatchOwned)."""
    branch = layer._modules["delta"][name]
    assert isinstance(branch, PatchOwned), type(branch)
    return branch


def snapshot(module):
    """A copy of a module's tensors; for an owned copy keyed like the layer's state dict."""
    tensors = module.tensors() if isinstance(module, PatchOwned) else module.state_dict()
    return {k: v.detach().clone() for k, v in tensors.items()}


def base_snapshot(model):
    return {k: v.detach().clone() for k, v in base_state_dict(model).items()}


def changed_keys(before, after):
    assert before.keys() == after.keys()
    return [k for k in before if not torch.equal(before[k], after[k])]


def patch_params(model, name):
    return [p for _, slot in iter_slots(model) if name in slot for p in slot[name].parameters()]


def train_steps(model, name, steps, patch="default"):
    """``steps`` SGD steps (loss backward) on the active patch's parameters only."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and {id(p) for p in params} == {id(p) for p in patch_params(model, patch)}
    optim = torch.optim.SGD(params, lr=0.01)
    for step in range(steps):
        data = model.data_preprocessor(make_batch(name, seed=step, size=SIZE.get(name, 64)), True)
        loss, _ = model.parse_losses(model(**data, mode="loss"))
        assert torch.isfinite(loss)
        optim.zero_grad()
        loss.backward()
        optim.step()


def bn_input(layer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, layer.num_features, 5, 5, generator=gen) * 3 + 1


@torch.no_grad()
def eval_stats_output(x, layer, tensors):
    """What ``layer`` computes normalising ``x`` with ``tensors``' running statistics."""
    return F.batch_norm(
        x,
        tensors["running_mean"],
        tensors["running_var"],
        tensors["weight"],
        tensors["bias"],
        False,
        0.0,
        layer.eps,
    )


def test_task_norm_on_resnet50_with_frozen_stages_and_norm_eval():
    name = "faster_rcnn_r50_fpn"  # mmdet ResNet-50: frozen_stages=1, norm_eval=True
    model, base = build_pair(name)
    batch = make_batch(name, size=SIZE.get(name, 64))
    base_out = tensor_outputs(base, batch)
    bns = norms_under(model, ("backbone", "neck"))
    bn_paths = [p for p, _ in bns]
    assert all(isinstance(m, _BatchNorm) for _, m in bns)
    assert {"backbone.bn1", "backbone.layer1.0.bn1", "backbone.layer4.2.bn3"} <= set(bn_paths)

    summary = apply_delta_patch(model, dict(task_norm=True))
    # the summary lists every BN as owned and counts their affine parameters
    assert [layer.path for layer in summary.owned] == bn_paths
    assert {layer.form for layer in summary.owned} == {"owned"}
    affine = sum(m.weight.numel() + m.bias.numel() for _, m in bns)
    assert summary.owned_params == affine
    assert summary.patch_fraction == pytest.approx(
        (summary.delta_params + affine) / summary.base_params
    )
    assert identical(tensor_outputs(model, batch), base_out)

    owned = {path: owned_copy(m) for path, m in bns}
    assert all(o.update_stats for o in owned.values())

    # negative control: the model's own train() (ResNet._freeze_stages, norm_eval) puts the
    # owned copies in eval too
    type(model).train(model, True)
    assert not any(o.training for o in owned.values())
    model.train()
    assert model.training and model.backbone.training
    not_training = [p for p, o in owned.items() if not o.training]
    assert not not_training, f"owned BN copies left in eval: {not_training}"
    base_training = [p for p, m in bns if m.training]
    assert not base_training, f"base BNs in train mode: {base_training}"

    before = base_snapshot(model)
    owned_before = {p: snapshot(o) for p, o in owned.items()}
    train_steps(model, name, steps=2)

    for path, o in owned.items():
        after = snapshot(o)
        assert (
            int(after["num_batches_tracked"]) == int(owned_before[path]["num_batches_tracked"]) + 2
        ), path
        for key in ("running_mean", "running_var", "weight", "bias"):
            assert not torch.equal(after[key], owned_before[path][key]), f"{path}.{key}"
    changed = changed_keys(before, base_snapshot(model))
    assert not changed, f"base tensors changed by training: {changed}"
    assert not changed_keys(base.state_dict(), base_snapshot(model))

    with delta_disabled(model):
        assert identical(tensor_outputs(model, batch), base_out)
    set_active_patch(model, None)
    assert identical(tensor_outputs(model, batch), base_out)
    set_active_patch(model, "default")
    patched = tensor_outputs(model, batch)
    assert not identical(patched, base_out)
    assert not changed_keys(before, base_snapshot(model))  # eval forwards change nothing

    # layer level: in eval the owned copy normalises with its own running statistics; in
    # train mode with batch statistics, updating its own (and only its own) statistics
    for path in ("backbone.bn1", "backbone.layer3.0.bn2"):
        layer, own = model.get_submodule(path), owned[path]
        x = bn_input(layer)
        with torch.no_grad():
            model.eval()
            assert torch.equal(layer(x), eval_stats_output(x, layer, snapshot(own)))
            model.train()
            expected = snapshot(own)
            ref = F.batch_norm(
                x,
                expected["running_mean"],
                expected["running_var"],
                expected["weight"],
                expected["bias"],
                True,
                layer.momentum,
                layer.eps,
            )
            assert torch.equal(layer(x), ref), path
        got = snapshot(own)
        for key in ("running_mean", "running_var"):
            assert torch.equal(got[key], expected[key]), f"{path}.{key}"
    assert not changed_keys(before, base_snapshot(model))


def test_task_norm_affine_keeps_the_copied_statistics_frozen():
    name = "retinanet_r18_fpn"  # mmdet ResNet-18: frozen_stages=1, norm_eval=True
    model, base = build_pair(name)
    batch = make_batch(name, size=SIZE.get(name, 64))
    base_out = tensor_outputs(base, batch)
    apply_delta_patch(model, dict(task_norm="affine"))
    assert identical(tensor_outputs(model, batch), base_out)
    bns = norms_under(model, ("backbone", "neck"))
    owned = {path: owned_copy(m) for path, m in bns}
    assert owned and not any(o.update_stats for o in owned.values())

    before = base_snapshot(model)
    owned_before = {p: snapshot(o) for p, o in owned.items()}
    model.train()
    assert all(o.training for o in owned.values())
    assert not any(m.training for _, m in bns)
    train_steps(model, name, steps=2)

    base_now = base_snapshot(model)
    assert not changed_keys(before, base_now)
    for path, o in owned.items():
        after = snapshot(o)
        for key in STATS:  # its own statistics stay the base's
            assert torch.equal(after[key], owned_before[path][key]), f"{path}.{key}"
            assert torch.equal(after[key], base_now[f"{path}.{key}"]), f"{path}.{key}"
        for key in ("weight", "bias"):
            assert not torch.equal(after[key], owned_before[path][key]), f"{path}.{key}"

    # in train mode the owned copy still normalises with the (copied) running statistics
    assert model.training
    for path in ("backbone.bn1", "backbone.layer1.0.bn1", "backbone.layer3.1.bn2"):
        layer, own = model.get_submodule(path), owned[path]
        assert own.training and not layer.training
        x = bn_input(layer, seed=1)
        with torch.no_grad():
            out = layer(x)
        assert torch.equal(out, eval_stats_output(x, layer, snapshot(own))), path
        # and it is the patch's affine, not the base's
        assert not torch.equal(out, eval_stats_output(x, layer, snapshot(layer)))
        assert torch.equal(snapshot(own)["running_mean"], owned_before[path]["running_mean"])

    with delta_disabled(model):
        assert identical(tensor_outputs(model, batch), base_out)
    assert not identical(tensor_outputs(model, batch), base_out)
    assert not changed_keys(before, base_snapshot(model))


def test_task_norm_owns_convnext_layernorms():
    name = "upernet_convnext"  # mmpretrain LayerNorm2d, called with data_format=...
    model, base = build_pair(name)
    batch = make_batch(name, size=SIZE.get(name, 64))
    base_out = tensor_outputs(base, batch)
    summary = apply_delta_patch(model, dict(task_norm=True))
    owned_paths = [layer.path for layer in summary.owned]
    expected = [p for p, _ in norms_under(base, ("backbone", "decode_head"))]
    assert owned_paths == expected
    lns = [p for p, m in norms_under(model, ("backbone",)) if isinstance(m, nn.LayerNorm)]
    assert {"backbone.stages.0.0.norm", "backbone.stages.2.1.norm"} <= set(lns)
    assert {"backbone.norm0", "backbone.norm3", "backbone.downsample_layers.0.1"} <= set(lns)
    assert set(lns) <= set(owned_paths)
    assert identical(tensor_outputs(model, batch), base_out)

    before = base_snapshot(model)
    owned_before = {p: snapshot(owned_copy(model.get_submodule(p))) for p in lns}
    train_steps(model, name, steps=1)

    moved = [
        p
        for p in lns
        if not torch.equal(
            snapshot(owned_copy(model.get_submodule(p)))["weight"], owned_before[p]["weight"]
        )
    ]
    assert moved == lns, f"owned LN weights that did not move: {sorted(set(lns) - set(moved))}"
    changed = changed_keys(before, base_snapshot(model))
    assert not changed, f"base tensors changed by training: {changed}"
    assert not changed_keys(base.state_dict(), base_snapshot(model))

    with delta_disabled(model):
        assert identical(tensor_outputs(model, batch), base_out)
    assert not identical(tensor_outputs(model, batch), base_out)


def perturb_owned(model, name, seed):
    """Randomises patch ``name``'s owned norm tensors (affine and statistics)."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for _, slot in iter_slots(model):
            branch = slot[name] if name in slot else None
            if not isinstance(branch, PatchOwned):
                continue
            tensors = branch.tensors()
            for key in ("weight", "bias", "running_mean"):
                t = tensors[key]
                t.add_(torch.randn(t.shape, generator=gen) * 0.2)
            var = tensors["running_var"]
            var.mul_(torch.rand(var.shape, generator=gen) + 0.5)
            count += 1
    assert count


def test_a_norm_owned_by_two_patches():
    name = "retinanet_r18_fpn"
    model, base = build_pair(name)
    batch = make_batch(name, size=SIZE.get(name, 64))
    base_out = tensor_outputs(base, batch)

    apply_delta_patch(model, dict(name="a", task_norm=True, branch=None))
    assert identical(tensor_outputs(model, batch), base_out)
    perturb_owned(model, "a", seed=1)
    out_a = tensor_outputs(model, batch)

    apply_delta_patch(model, dict(name="b", task_norm="affine", branch=None))
    # b copies the base's norms, not a's
    assert identical(tensor_outputs(model, batch), base_out)
    perturb_owned(model, "b", seed=2)
    out_b = tensor_outputs(model, batch)
    assert patch_names(model) == ["a", "b"]

    bns = norms_under(model, ("backbone", "neck"))
    for _, m in bns:
        a, b = owned_copy(m, "a"), owned_copy(m, "b")
        assert a.update_stats and not b.update_stats
        ptrs = {o.tensors()["weight"].data_ptr() for o in (a, b)} | {m.weight.data_ptr()}
        assert len(ptrs) == 3
    assert not identical(out_a, base_out) and not identical(out_b, base_out)
    assert not identical(out_a, out_b)

    for active, expected in [("a", out_a), (None, base_out), ("b", out_b), ("a", out_a)]:
        set_active_patch(model, active)
        assert identical(tensor_outputs(model, batch), expected), active
    set_active_patch(model, "b")
    with delta_disabled(model):
        assert identical(tensor_outputs(model, batch), base_out)
    assert identical(tensor_outputs(model, batch), out_b)

    # a forward in train mode with `a` active updates a's statistics only
    set_active_patch(model, "a")
    before = base_snapshot(model)
    b_before = {p: snapshot(owned_copy(m, "b")) for p, m in bns}
    a_before = {p: snapshot(owned_copy(m, "a")) for p, m in bns}
    model.train()
    assert all(owned_copy(m, "b").training for _, m in bns)  # every branch follows the model
    with torch.no_grad():
        model(**model.data_preprocessor(batch, True), mode="loss")
    assert not changed_keys(before, base_snapshot(model))
    for path, m in bns:
        assert not changed_keys(b_before[path], snapshot(owned_copy(m, "b"))), path
        assert changed_keys(a_before[path], snapshot(owned_copy(m, "a"))), path
    set_active_patch(model, "b")
    assert identical(tensor_outputs(model, batch), out_b)
    set_active_patch(model, None)
    assert identical(tensor_outputs(model, batch), base_out)
    set_active_patch(model, "a")
    assert not identical(tensor_outputs(model, batch), out_a)  # a's statistics moved


@pytest.mark.parametrize(
    ("name", "task_norm"),
    [("retinanet_r18_fpn", "affine"), ("upernet_convnext", True), ("deeplabv3_r18_v1c", True)],
)
def test_summary_lists_the_owned_norms_and_counts_their_affine(name, task_norm):
    model = build_model(name)
    fresh = copy.deepcopy(model)
    summary = apply_delta_patch(model, dict(task_norm=task_norm))
    roots = ("backbone", "neck", "decode_head")
    norms = norms_under(fresh, roots)
    assert norms
    assert [layer.path for layer in summary.owned] == [p for p, _ in norms]
    assert [layer.layer_type for layer in summary.owned] == [type(m).__name__ for _, m in norms]
    direct = sum(p.numel() for _, m in norms for p in m.parameters(recurse=False))
    assert direct == sum(m.weight.numel() + m.bias.numel() for _, m in norms)
    assert summary.owned_params == direct
    # each copy holds all of its layer's tensors (statistics too); only parameters count
    for path, m in norms:
        own = owned_copy(model.get_submodule(path))
        assert own.tensors().keys() == m.state_dict().keys(), path
        assert sum(p.numel() for p in own.parameters()) == m.weight.numel() + m.bias.numel()
    assert f"owned {len(norms)} layers, {direct:,} params" in summary.line()
    assert summary.patch_fraction == pytest.approx(
        (summary.delta_params + direct) / summary.base_params
    )
    # the Δ branches patch the convs / linears, never a norm layer
    assert not {layer.path for layer in summary.layers} & {p for p, _ in norms}
