"""The delta_patch schema: defaults, clear errors, and never a partial patch."""

import pytest
import torch
from torch import nn

from mmdelta import (
    DeltaPatchConfigError,
    active_patch,
    apply_delta_patch,
    delta_disabled,
    get_delta_patch_cfg,
)
from mmdelta.patching.slot import iter_slots


class TinyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)
        )
        self.neck = nn.Sequential(nn.Conv2d(8, 16, 1))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.neck(self.backbone(x)))


def assert_untouched(model, keys):
    assert set(model.state_dict()) == keys
    assert not any(k.startswith("_mmdelta") for k in vars(model))
    assert "train" not in vars(model)
    assert not list(iter_slots(model))
    assert all(p.requires_grad for p in model.parameters())


def test_default_patch_and_resolved_cfg():
    model = TinyDetector()
    summary = apply_delta_patch(model, {})
    assert [layer.path for layer in summary.layers] == ["backbone.0", "backbone.3", "neck.0"]
    cfg = get_delta_patch_cfg(model)
    assert cfg == dict(
        name="default",
        targets=["backbone", "neck"],
        exclude=[],
        branch=dict(type="LowRankDelta", rank=8, alpha=None, compute="auto"),
        trainable=[],
        task_norm=None,
        classes=None,
        base_classes=None,
        class_map={},
        side=None,
        preset=None,
    )
    assert active_patch(model) == "default"
    assert "backbone.0.delta.default.up" in model.state_dict()


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(target=["backbone"]), "unknown key(s) ['target']; allowed keys are"),
        (dict(branch=dict(type="LoRA")), "registered types: ['"),
        (dict(branch=dict(rnk=4)), "unknown option(s) ['rnk']"),
        (dict(branch=dict(rank=0)), "`rank` must be a positive integer"),
        (dict(branch=dict(rank=2.5)), "`rank` must be a positive integer"),
        (dict(branch=dict(alpha=-1)), "`alpha` must be a positive number"),
        (dict(targets=["backbone.9"]), "pattern 'backbone.9' matches no module"),
        (dict(targets=["bakbone"]), "Close matches: ['backbone',"),
        (dict(exclude=["nek"]), "delta_patch.exclude pattern 'nek'"),
        (dict(targets="backbone.2"), "nothing to patch"),
        (dict(targets=[3]), "must be a list of module-path patterns"),
        (dict(trainable=["heads"]), "delta_patch.trainable pattern 'heads' matches no module"),
        (dict(task_norm="yes"), "task_norm must be False, True ('stats') or 'affine'"),
        (dict(classes="cat"), "delta_patch.classes must be a list of class names"),
        (dict(classes=["cat", "cat"]), "delta_patch.classes names ['cat'] more than once"),
        (dict(base_classes=["cat"]), "only apply with delta_patch.classes"),
        (dict(classes=["cat"], class_map={"dog": "cat"}), "not in delta_patch.classes"),
        (dict(classes=["cat"]), "no module of the model has an int `num_classes`"),
        (dict(branch=None), "the patch would train nothing"),
        (dict(name="my.patch"), "delta_patch.name must start with a letter"),
        (dict(name="active"), "delta_patch.name must start with a letter"),
        ("backbone", "delta_patch must be a dict"),
    ],
)
def test_bad_cfg_raises_clear_error_and_changes_nothing(cfg, message):
    model = TinyDetector()
    keys = set(model.state_dict())
    with pytest.raises(DeltaPatchConfigError) as err:
        apply_delta_patch(model, cfg)
    assert message in str(err.value)
    assert_untouched(model, keys)


def test_model_without_default_targets_lists_its_modules():
    model = nn.Sequential()
    model.add_module("encoder", nn.Conv2d(3, 3, 3))
    with pytest.raises(DeltaPatchConfigError, match=r"top-level modules are \['encoder'\]"):
        apply_delta_patch(model, {})
    apply_delta_patch(model, dict(targets=["encoder"]))


def test_container_pattern_skips_classifier_but_explicit_leaf_is_patched():
    model = nn.Module()
    model.decode_head = nn.Module()
    model.decode_head.bottleneck = nn.Conv2d(8, 8, 3)
    model.decode_head.conv_seg = nn.Conv2d(8, 19, 1)
    summary = apply_delta_patch(model, {})
    assert [layer.path for layer in summary.layers] == ["decode_head.bottleneck"]
    summary = apply_delta_patch(model, dict(name="seg", targets=["decode_head.conv_seg"]))
    assert [layer.path for layer in summary.layers] == ["decode_head.conv_seg"]


def test_exclude_and_globs():
    model = TinyDetector()
    summary = apply_delta_patch(model, dict(targets=["*"], exclude=["backbone.3", "head"]))
    assert [layer.path for layer in summary.layers] == ["backbone.0", "neck.0"]


def test_layers_too_small_are_skipped_and_reported():
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Conv2d(8, 8, 1, groups=8), nn.Conv2d(8, 8, 3))
    summary = apply_delta_patch(model, {})
    assert [layer.path for layer in summary.layers] == ["backbone.1"]
    assert summary.skipped and summary.skipped[0][0] == "backbone.0"
    assert "skipped backbone.0" in str(summary)


def test_second_patch_is_selected_and_first_is_frozen():
    model = TinyDetector()
    apply_delta_patch(model, {})
    with pytest.raises(DeltaPatchConfigError, match="already carries a patch named 'default'"):
        apply_delta_patch(model, {})
    apply_delta_patch(model, dict(name="night", targets=["neck"], branch=dict(rank=2)))
    assert active_patch(model) == "night"
    model.train()
    slot = model.neck[0].delta
    assert set(slot) == {"default", "night"}
    assert all(p.requires_grad for p in slot["night"].parameters())
    assert not any(p.requires_grad for p in slot["default"].parameters())
    assert model.backbone[0].delta.active == "night"  # no 'night' branch there: base conv


def test_delta_disabled_restores_and_refuses_unpatched_models():
    model = TinyDetector()
    with pytest.raises(ValueError, match="carries no Δ patch"):
        with delta_disabled(model):
            pass
    apply_delta_patch(model, {})
    with pytest.raises(RuntimeError):
        with delta_disabled(model):
            raise RuntimeError
    assert all(slot.active == "default" for _, slot in iter_slots(model))


def test_works_with_mmengine_config_dicts():
    from mmengine.config import ConfigDict

    model = TinyDetector().eval()
    x = torch.randn(1, 3, 8, 8)
    before = model(x)
    apply_delta_patch(
        model, ConfigDict(targets=["backbone"], branch=dict(type="LowRankDelta", rank=2, alpha=4))
    )
    assert torch.equal(model(x), before)
    assert get_delta_patch_cfg(model)["branch"] == dict(
        type="LowRankDelta", rank=2, alpha=4, compute="auto"
    )


def test_shared_layer_is_patched_once_and_counted_once():
    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Module()
    model.backbone = nn.Sequential(shared, nn.ReLU(), shared)
    total = sum(p.numel() for p in model.parameters())
    summary = apply_delta_patch(model, {})
    assert [layer.path for layer in summary.layers] == ["backbone.0"]
    assert summary.base_params == total


def test_layer_with_a_foreign_delta_child_is_refused_before_anything_changes():
    model = TinyDetector()
    model.neck[0].delta = nn.Identity()
    keys = set(model.state_dict())
    with pytest.raises(TypeError, match="already has a child called 'delta'"):
        apply_delta_patch(model, {})
    assert set(model.state_dict()) == keys and not list(iter_slots(model))
