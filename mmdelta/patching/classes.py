"""A patch with its own class set: which layers change shape, and how their rows map.

OpenMMLab heads keep the class count in an ``int`` attribute ``num_classes`` and lay out
their final layers' output channels per class:

* classifiers (``fc_cls``, ``retina_cls``, ``conv_seg``, ``conv_logits``, …): per anchor
  (``num_base_priors``, 1 if absent) a block of ``K`` class channels, plus one background
  channel for softmax heads (mmdet puts it last): channel ``a·(K+b) + k``;
* per-class regressors (``fc_reg`` of a ``BBoxHead`` with ``reg_class_agnostic=False``): a
  block of ``w`` (= 4) channels per class: channel ``k·w + j``; class-agnostic regressors
  (every anchor head's ``*_reg``) do not depend on the class set.

For a new class set of ``K'`` names, every head with ``num_classes == K`` (the base's count)
switches ``num_classes`` — and ``cls_out_channels`` / ``out_channels`` where they count
classes — while the patch is active, and its class-dependent final layers become
patch-owned with ``K'`` classes. A new class whose name (or ``class_map`` alias) is among the
base's classes starts from the base's rows for it (VOC ⊂ COCO); background rows start from
the background rows.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..branches import PATCHABLE_LAYERS
from .config import DeltaPatchConfigError
from .targets import CLASSIFIER_NAMES, base_modules

#: head attributes that count classes and change with the class set
CLASS_COUNT_ATTRS = ("num_classes", "cls_out_channels", "out_channels")


@dataclass
class ClassChange:
    """What a new class set changes in a model."""

    #: layer path -> output-row map (new row -> base row or None) for every class layer
    rows: dict[str, list[int | None]] = field(default_factory=dict)
    #: module path -> {attribute: value while the patch is active}
    attrs: dict[str, dict] = field(default_factory=dict)
    #: module paths of the heads that switch class set
    heads: list[str] = field(default_factory=list)
    #: new class name -> base class index it starts from
    matched: dict[str, int] = field(default_factory=dict)


def _heads(model: nn.Module) -> dict[str, nn.Module]:
    return {
        path: m
        for path, m in base_modules(model)
        if isinstance(getattr(m, "num_classes", None), int)
        and not isinstance(m.num_classes, bool)
        and any(isinstance(c, PATCHABLE_LAYERS) for c in m.children())
    }


def _final_layers(head_path: str, head: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(path, name, layer)`` of a head's final classifier / regressor layers."""
    return [
        (f"{head_path}.{name}" if head_path else name, name, layer)
        for name, layer in head.named_children()
        if name in CLASSIFIER_NAMES and isinstance(layer, PATCHABLE_LAYERS)
    ]


def base_class_names(model: nn.Module) -> list[str] | None:
    meta = getattr(model, "dataset_meta", None)
    classes = meta.get("classes") if isinstance(meta, dict) else None
    return list(classes) if classes else None


def _row_map(
    layer: nn.Module, name: str, head: nn.Module, k_base: int, new_index: list[int | None]
) -> list[int | None] | None:
    """The new layer's row map, or None when the layer does not depend on the class set."""
    out = layer.weight.shape[0]
    k_new = len(new_index)
    if "reg" in name:
        if getattr(head, "reg_class_agnostic", True) or out % k_base:
            return None
        width = out // k_base
        return [
            None if new_index[k] is None else new_index[k] * width + j
            for k in range(k_new)
            for j in range(width)
        ]
    anchors = int(getattr(head, "num_base_priors", 1) or 1)
    if out % anchors or out // anchors not in (k_base, k_base + 1):
        return None
    block = out // anchors
    background = block - k_base
    rows: list[int | None] = []
    for a in range(anchors):
        rows += [None if new_index[k] is None else a * block + new_index[k] for k in range(k_new)]
        rows += [a * block + k_base + b for b in range(background)]
    return rows


def plan_class_change(
    model: nn.Module,
    classes: Sequence[str],
    base_classes: Sequence[str] | None,
    class_map: dict[str, str],
) -> ClassChange:
    """Works out the class-dependent layers, their row maps and the head attributes.

    Raises:
        DeltaPatchConfigError: no head counts classes, ``base_classes`` does not match any
            head, the base class count is ambiguous without ``base_classes``, or
            ``class_map`` maps onto a name that is not a base class.
    """
    heads = _heads(model)
    counts = sorted({h.num_classes for h in heads.values()})
    if not heads:
        raise DeltaPatchConfigError(
            "delta_patch.classes is set but no module of the model has an int `num_classes` "
            "next to its final layers (an mmdet/mmseg head); set delta_patch.trainable instead"
        )
    if base_classes is None:
        base_classes = base_class_names(model)
    if base_classes is not None:
        k_base = len(base_classes)
        if k_base not in counts:
            raise DeltaPatchConfigError(
                f"delta_patch.base_classes has {k_base} names but the model's heads have "
                f"num_classes {counts}: they must be the base model's class names, in order"
            )
    elif len([c for c in counts if c > 1]) == 1:
        k_base = max(counts)
    else:
        raise DeltaPatchConfigError(
            f"the model's heads have num_classes {counts}; set delta_patch.base_classes to the "
            "base model's class names so mmdelta knows which heads to switch"
        )
    unknown = sorted(set(class_map.values()) - set(base_classes or []))
    if unknown:  # a typo would silently start those classes from fresh rows
        raise DeltaPatchConfigError(
            f"delta_patch.class_map maps onto {unknown}, which are not base class names"
            + (
                f" (the base's classes are {list(base_classes)[:10]}"
                f"{', …' if len(base_classes) > 10 else ''})"
                if base_classes is not None
                else ": the base's class names are unknown, set delta_patch.base_classes"
            )
        )
    index = {name: i for i, name in enumerate(base_classes or [])}
    new_index = [index.get(class_map.get(name, name)) for name in classes]
    change = ClassChange(
        matched={n: i for n, i in zip(classes, new_index, strict=True) if i is not None}
    )
    # every module counting the base's classes switches, also those without layers of their
    # own (mmseg's EncoderDecoder copies its decode head's num_classes / out_channels)
    for path, module in base_modules(model):
        if getattr(module, "num_classes", None) != k_base or isinstance(module.num_classes, bool):
            continue
        attrs = {}
        for attr in CLASS_COUNT_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and value in (k_base, k_base + 1):
                attrs[attr] = value - k_base + len(classes)
        change.attrs[path] = attrs
    meta = getattr(model, "dataset_meta", None)
    if isinstance(meta, dict):  # visualisers and evaluators read the class names from it
        meta = {k: v for k, v in meta.items() if k != "palette" or len(v) == len(classes)}
        change.attrs.setdefault("", {})["dataset_meta"] = {**meta, "classes": tuple(classes)}
    for head_path, head in heads.items():
        if head.num_classes != k_base:
            continue
        change.heads.append(head_path)
        for path, name, layer in _final_layers(head_path, head):
            rows = _row_map(layer, name, head, k_base, new_index)
            if rows is not None:
                change.rows[path] = rows
    return change


def default_head_layers(model: nn.Module, change: ClassChange) -> list[str]:
    """The default new-class recipe's ``trainable``: every final classifier/regressor layer
    of the switching heads (class-agnostic regressors included)."""
    return [
        path
        for head_path in change.heads
        for path, _, _ in _final_layers(head_path, model.get_submodule(head_path))
    ]
