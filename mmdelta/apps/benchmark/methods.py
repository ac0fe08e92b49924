"""The adaptation methods the benchmark compares, each expressed as a training config.

Every method except full fine-tuning is a ``delta_patch`` on the frozen base — so each keeps
the base exactly when its patch is off, and the comparison isolates *what is trained*:

========== ===================================================================================
full_ft    every weight trains (a plain mmdet / mmseg config, its own learning rate)
head_only  the heads (``rpn_head``, ``roi_head``, ``decode_head`` …) as patch-owned copies;
           backbone and neck frozen
norm_only  BitFit-style: the patch owns every norm layer (affine + running statistics)
lora_conv  LoRA-style: a rank-r low-rank Δ on every conv / linear layer of the model (final
           classifiers excepted), base normalisation statistics
delta      Δ-Patching's default: the task config's own ``delta_patch``
delta_fast the fast preset (``preset='fast'``): a side Δ-network beside the frozen backbone
           (which runs without gradients) and rank-8 Δ on the neck and heads
delta_*    its variants, one axis at a time: placement by backbone stage (Δ from stage k on,
           or none in the backbone), branch type, rank
========== ===================================================================================
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from ...deploy.standalone import standalone_config
from ...patching.config import resolve_config

#: top-level children that are not heads
NOT_HEADS = ("backbone", "neck", "data_preprocessor")


class BenchmarkError(ValueError):
    """A benchmark setting that cannot run (names the option to change)."""


@dataclass(frozen=True)
class Method:
    """One row of the comparison.

    ``delta_patch``: the patch config (``None`` for full fine-tuning); ``axis``/``value``: for
    a Δ variant, what it varies against the default; ``lr``: replaces the optimiser's lr.
    """

    id: str
    family: str  # 'full_ft' | 'head_only' | 'norm_only' | 'lora_conv' | 'delta'
    label: str
    delta_patch: dict | None
    axis: str | None = None  # 'placement' | 'type' | 'rank' (Δ variants)
    value: str | None = None
    lr: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_patch(self) -> bool:
        return self.delta_patch is not None


def heads(model: nn.Module) -> list[str]:
    """Top-level children with parameters that are not backbone / neck / preprocessor."""
    return [
        name
        for name, child in model.named_children()
        if name not in NOT_HEADS and any(True for _ in child.parameters())
    ]


def backbone_stages(model: nn.Module) -> list[list[str]]:
    """The backbone's residual stages, each as the module paths it consists of.

    mmdet / mmseg ResNets name them in ``res_layers`` (``layer1`` …); mmpretrain's ConvNeXt
    has ``stages.i`` with ``downsample_layers.i`` in front of each.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise BenchmarkError("placement variants need a model with a `backbone`")
    if getattr(backbone, "res_layers", None):
        return [[f"backbone.{name}"] for name in backbone.res_layers]
    stages = getattr(backbone, "stages", None)
    if isinstance(stages, nn.ModuleList):
        down = getattr(backbone, "downsample_layers", None)
        return [
            ([f"backbone.downsample_layers.{i}"] if down is not None and i < len(down) else [])
            + [f"backbone.stages.{i}"]
            for i in range(len(stages))
        ]
    raise BenchmarkError(
        f"placement variants: no stages found in {type(backbone).__name__} (expected a "
        "ResNet with `res_layers` or a ConvNeXt with `stages`); pass --placements all"
    )


def _patch(default: dict, **changes) -> dict:
    out = copy.deepcopy(default)
    out.update(changes)
    return out


def comparison_methods(
    cfg,
    model: nn.Module,
    ft_lr: float | None,
    placements: tuple[str, ...] = ("3", "4", "none"),
    branch_types: tuple[str, ...] = ("ScaleShiftDelta", "BlockDelta"),
    ranks: tuple[int, ...] = (4, 16),
    baseline_rank: int = 8,
) -> list[Method]:
    """The benchmark's methods for the patch-training config ``cfg`` (its ``delta_patch`` is
    Δ-Patching's default) on ``model`` (built from ``cfg.model``, used for its layout).

    ``placements``: Δ variants by backbone stage: ``'k'`` = Δ in stages k… (1-based; the
    default's other targets kept), ``'none'`` = no Δ in the backbone. ``branch_types`` /
    ``ranks``: variants of the default's branch. Task-norm and class settings of the default
    carry over to every patch method.
    """
    default = cfg.get("delta_patch")
    if default is None:
        raise BenchmarkError(
            f"{cfg.filename}: the benchmark's config must carry a `delta_patch` (Δ-Patching's "
            "default for the comparison), e.g. configs/delta_faster_rcnn_voc.py"
        )
    default = dict(default)
    resolved = resolve_config(model, default)
    return [
        *_alternatives(default, resolved, model, ft_lr, baseline_rank),
        *_placement_variants(default, resolved["targets"], model, placements),
        *_branch_variants(default, resolved["branch"], branch_types, ranks),
    ]


def _alternatives(default, resolved, model, ft_lr, baseline_rank) -> list[Method]:
    """Full fine-tuning, head only, norm only, LoRA-conv and Δ-Patching (default and fast)."""
    keep = {k: default[k] for k in ("name", "classes", "base_classes", "class_map") if k in default}
    head_names = heads(model)
    everything = ["backbone", *(["neck"] if hasattr(model, "neck") else []), *head_names]
    norm = resolved["task_norm"] or "stats"
    return [
        Method("full_ft", "full_ft", "full fine-tuning", None, lr=ft_lr),
        Method(
            "head_only",
            "head_only",
            "head only",
            dict(keep, branch=None, trainable=head_names),
        ),
        Method(
            "norm_only",
            "norm_only",
            "norm only (BitFit-style)",
            dict(keep, branch=None, targets=everything, task_norm=norm),
        ),
        Method(
            "lora_conv",
            "lora_conv",
            f"LoRA-conv r{baseline_rank} (every layer)",
            dict(
                keep,
                branch=dict(type="LowRankDelta", rank=baseline_rank),
                targets=everything,
                task_norm=False,
            ),
        ),
        Method("delta", "delta", "Δ-Patching (default)", default),
        Method(
            "delta_fast",
            "delta",
            "Δ-Patching fast (preset='fast': side network)",
            dict(keep, preset="fast"),
        ),
    ]


def _placement_variants(default, targets, model, placements) -> list[Method]:
    """The default with Δ in later backbone stages only, or none in the backbone."""
    if not placements:
        return []
    if "backbone" not in targets:
        raise BenchmarkError(
            f"placement variants replace the default's 'backbone' target by stages, but its "
            f"targets are {targets}; pass --placements '' or add 'backbone'"
        )
    stages = backbone_stages(model)
    rest = [t for t in targets if t != "backbone"]
    methods = []
    for where in placements:
        changes = {}
        if where == "none":
            new_targets, label = rest, "no Δ in the backbone"
            # the default's task norms sit in the backbone (necks and heads rarely have any)
            changes["task_norm"] = False
        else:
            k = int(where)
            if not 1 <= k <= len(stages):
                raise BenchmarkError(
                    f"placement {where!r}: the backbone has stages 1–{len(stages)}"
                )
            chosen = [p for stage in stages[k - 1 :] for p in stage]
            new_targets = chosen + rest
            label = f"Δ in stages {k}–{len(stages)}" if k < len(stages) else f"Δ in stage {k}"
        if not new_targets:
            continue
        methods.append(
            Method(
                f"delta_stages_{where}",
                "delta",
                label,
                _patch(default, targets=new_targets, **changes),
                axis="placement",
                value=label,
            )
        )
    return methods


def _branch_variants(default, branch, branch_types, ranks) -> list[Method]:
    """The default with another branch type, or its low-rank branch at other ranks."""
    methods = []
    for type_ in branch_types:
        if branch is not None and type_ == branch["type"]:
            continue
        methods.append(
            Method(
                f"delta_{type_}",
                "delta",
                f"Δ {type_}",
                _patch(default, branch=dict(type=type_)),
                axis="type",
                value=type_,
                notes=["BlockDelta patches residual blocks only (none in necks or heads)"]
                if type_ == "BlockDelta"
                else [],
            )
        )
    if branch is not None and "rank" in branch:
        for rank in ranks:
            if rank == branch["rank"]:
                continue
            methods.append(
                Method(
                    f"delta_rank{rank}",
                    "delta",
                    f"Δ rank {rank}",
                    _patch(default, branch=dict(branch, rank=rank)),
                    axis="rank",
                    value=str(rank),
                )
            )
    return methods


def method_config(cfg, method: Method):
    """The training config of ``method`` derived from the patch-training config ``cfg``."""
    if method.is_patch:
        out = copy.deepcopy(cfg)
        out.delta_patch = copy.deepcopy(method.delta_patch)
    else:
        if cfg.delta_patch.get("classes") is not None:
            raise BenchmarkError(
                "full fine-tuning on a new class set needs its own config (the heads' "
                "num_classes): pass --finetune-config (e.g. configs/finetune_faster_rcnn_voc.py)"
            )
        out = standalone_config(cfg, None, None, None, {})
        out.load_from = cfg.load_from
    if method.lr is not None:
        out.optim_wrapper.optimizer.lr = method.lr
    return out
