"""The ``delta_patch`` config schema: validation and resolution (defaults filled in).

Schema (what a config's top-level ``delta_patch = dict(...)`` key holds)::

    delta_patch = dict(
        name='default',          # patch name: letters, digits, '_'; keys its Δ parameters
        targets=None,            # module-path glob patterns to patch; None = the default:
                                 #   'backbone', 'neck' (if any), 'decode_head' (if any)
        exclude=[],              # module-path glob patterns to leave out of `targets`
        branch=dict(type='LowRankDelta', rank=8, alpha=None),   # a DELTA_BRANCHES type;
                                 #   None: no Δ branches (owned modules / task_norm only)
        trainable=[],            # module-path globs the patch retrains as its own copies
                                 #   (patch-owned); with `classes`: default = the heads'
                                 #   final classifier/regressor layers
        task_norm=False,         # True/'stats': the patch owns the targeted norm layers
                                 #   (affine + running stats, updated while training);
                                 #   'affine': owns them with the base's stats, frozen
        classes=None,            # the patch's own class names (a new class set)
        base_classes=None,       # the base's class names (default: model.dataset_meta)
        class_map={},            # new class name -> base class name it starts from
        side=None,               # a side Δ-network beside one frozen module, e.g.
                                 #   dict(type='SideDelta', at='backbone', width=64): reads
                                 #   its outputs (and the image), adds corrections; the
                                 #   module then runs without gradients (mmdelta.branches.side)
        preset=None,             # a named starting point (PRESETS): 'accurate' (= the
                                 #   defaults above) or 'fast' (side network on the backbone,
                                 #   rank-8 Δ on neck and heads); keys set beside it win,
                                 #   `branch` / `side` dicts are merged into the preset's
    )

Patterns are ``fnmatch`` globs over dotted module paths (``*`` also crosses dots). A pattern
that names a container patches every supported layer inside it (``nn.Conv2d``,
``nn.Linear``) except final classifiers (``conv_seg``, ``fc_cls``, ``retina_cls``, …); a
pattern that names a single layer patches that layer.
"""

import inspect
import re
from collections.abc import Mapping, Sequence

from torch import nn

from ..registry import DELTA_BRANCHES

DEFAULT_NAME = "default"
DEFAULT_BRANCH = {"type": "LowRankDelta"}
DEFAULT_SIDE = {"type": "SideDelta", "at": "backbone"}
#: top-level children the fast preset never patches (the side network covers the backbone;
#: an auxiliary head only trains, it never serves)
FAST_SKIPS = ("backbone", "data_preprocessor", "auxiliary_head")
#: top-level children patched by default, when the model has them
DEFAULT_TARGET_ROOTS = ("backbone", "neck", "decode_head")
ALLOWED_KEYS = (
    "name",
    "targets",
    "exclude",
    "branch",
    "trainable",
    "task_norm",
    "classes",
    "base_classes",
    "class_map",
    "side",
    "preset",
)
TASK_NORM_MODES = {False: None, True: "stats", "stats": "stats", "affine": "affine", None: None}
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class DeltaPatchConfigError(ValueError):
    """A ``delta_patch`` config that cannot be applied to the given model."""


def _pattern_list(key: str, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise DeltaPatchConfigError(
            f"delta_patch.{key} must be a list of module-path patterns (strings), got {value!r}"
        )
    return list(value)


def default_targets(model: nn.Module) -> list[str]:
    children = dict(model.named_children())
    targets = [name for name in DEFAULT_TARGET_ROOTS if name in children]
    if not targets:
        raise DeltaPatchConfigError(
            "delta_patch.targets is not set and the model has none of the default target "
            f"modules {list(DEFAULT_TARGET_ROOTS)}; its top-level modules are "
            f"{sorted(children)}. Set delta_patch.targets to the modules to patch."
        )
    return targets


def branch_type(name) -> type | None:
    """The registered Δ branch class called ``name``, or ``None``.

    Only names registered in ``DELTA_BRANCHES`` are looked up: no scope prefix, no dotted
    import path (``Registry.get`` would import the module a dotted name names and return any
    object in it, and a patch file's recorded config must never import or run anything).
    """
    if not isinstance(name, str):
        return None
    DELTA_BRANCHES.import_from_location()
    return DELTA_BRANCHES.module_dict.get(name)


def resolve_branch(branch, key: str = "branch", default: Mapping = DEFAULT_BRANCH) -> dict:
    """``branch`` (the value of ``delta_patch.<key>``) with ``type`` (``default``'s when
    not given) and every constructor default filled in."""
    if branch is None:
        branch = {}
    if not isinstance(branch, Mapping):
        raise DeltaPatchConfigError(f"delta_patch.{key} must be a dict, got {branch!r}")
    branch = {**default, **dict(branch)}
    cls = branch_type(branch["type"])
    if cls is None:
        raise DeltaPatchConfigError(
            f"delta_patch.{key}.type {branch['type']!r} is not a registered Δ branch type; "
            f"registered types: {sorted(DELTA_BRANCHES.module_dict)}"
        )
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, layer
    options = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    unknown = sorted(set(branch) - {"type"} - set(options), key=repr)
    if unknown:
        raise DeltaPatchConfigError(
            f"delta_patch.{key} has unknown option(s) {unknown} for type {branch['type']!r}; "
            f"its options are {sorted(options)}"
        )
    return {"type": branch["type"], **options, **{k: v for k, v in branch.items() if k != "type"}}


def resolve_side(side) -> dict | None:
    """``delta_patch.side`` resolved: ``None``, or ``{type, at, **options}`` with ``at`` the
    module path the side network sits beside (default ``'backbone'``)."""
    if side is None:
        return None
    if not isinstance(side, Mapping):
        raise DeltaPatchConfigError(
            f"delta_patch.side must be a dict such as dict(type='SideDelta', at='backbone'), "
            f"got {side!r}"
        )
    side = {**DEFAULT_SIDE, **dict(side)}
    at = side.pop("at")
    if not isinstance(at, str) or not at:
        raise DeltaPatchConfigError(
            f"delta_patch.side.at must be the module path of the network's host, e.g. "
            f"'backbone', got {at!r}"
        )
    resolved = resolve_branch(side, "side", {"type": DEFAULT_SIDE["type"]})
    return {"type": resolved.pop("type"), "at": at, **resolved}


def fast_targets(model: nn.Module) -> list[str]:
    """The fast preset's per-layer Δ targets: every top-level child with parameters except
    the backbone (the side network's), the data preprocessor and auxiliary heads."""
    targets = [
        name
        for name, child in model.named_children()
        if name not in FAST_SKIPS and any(True for _ in child.parameters())
    ]
    if not targets:
        raise DeltaPatchConfigError(
            "delta_patch.preset='fast': the model has no neck or head to patch beside its "
            f"backbone (top-level modules: {[n for n, _ in model.named_children()]}); set "
            "delta_patch.targets"
        )
    return targets


#: preset name -> the keys it sets (callables take the model); see the schema above
PRESETS = {
    "accurate": {},
    "fast": {"side": dict(DEFAULT_SIDE), "targets": fast_targets, "task_norm": False},
}


def apply_preset(model: nn.Module, cfg: Mapping) -> dict:
    """``cfg`` over its ``preset``'s keys: a key set in ``cfg`` wins, except that ``branch``
    and ``side`` dicts are merged into the preset's."""
    preset = cfg.get("preset")
    if preset is None:
        return dict(cfg)
    if not isinstance(preset, str) or preset not in PRESETS:
        raise DeltaPatchConfigError(
            f"delta_patch.preset must be one of {sorted(PRESETS)}, got {preset!r}"
        )
    out = {}
    for key, value in PRESETS[preset].items():
        out[key] = value(model) if callable(value) else value
    for key, value in cfg.items():
        if key in ("branch", "side") and isinstance(out.get(key), Mapping):
            out[key] = None if value is None else {**out[key], **dict(value)}
        else:
            out[key] = value
    return out


def resolve_config(model: nn.Module, cfg: Mapping | None) -> dict:
    """Validates ``cfg`` against the schema and returns it as a plain dict, defaults filled."""
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise DeltaPatchConfigError(f"delta_patch must be a dict, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(ALLOWED_KEYS), key=repr)  # keys of any type
    if unknown:
        raise DeltaPatchConfigError(
            f"delta_patch has unknown key(s) {unknown}; allowed keys are {list(ALLOWED_KEYS)}"
        )
    cfg = apply_preset(model, cfg)
    name = cfg.get("name", DEFAULT_NAME)
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in _RESERVED_NAMES:
        raise DeltaPatchConfigError(
            f"delta_patch.name must start with a letter and contain only letters, digits and "
            f"'_' (and not be one of {sorted(_RESERVED_NAMES)}), got {name!r}"
        )
    targets = _pattern_list("targets", cfg.get("targets"))
    task_norm = cfg.get("task_norm", False)
    if not isinstance(task_norm, (bool, str, type(None))) or task_norm not in TASK_NORM_MODES:
        raise DeltaPatchConfigError(
            f"delta_patch.task_norm must be False, True ('stats') or 'affine', got {task_norm!r}"
        )
    classes = _names("classes", cfg.get("classes"))
    base_classes = _names("base_classes", cfg.get("base_classes"))
    class_map = cfg.get("class_map")
    class_map = {} if class_map is None else class_map
    if not isinstance(class_map, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in class_map.items()
    ):
        raise DeltaPatchConfigError(
            f"delta_patch.class_map must map new class names to base class names, got {class_map!r}"
        )
    unknown = sorted(set(class_map) - set(classes or []))
    if classes is not None and unknown:
        raise DeltaPatchConfigError(
            f"delta_patch.class_map has key(s) {unknown} that are not in delta_patch.classes"
        )
    if classes is None and (base_classes is not None or class_map):
        raise DeltaPatchConfigError(
            "delta_patch.base_classes / class_map only apply with delta_patch.classes (the "
            "patch's own class names)"
        )
    return {
        "name": name,
        "targets": targets or default_targets(model),
        "exclude": _pattern_list("exclude", cfg.get("exclude")),
        "branch": None
        if "branch" in cfg and cfg["branch"] is None
        else resolve_branch(cfg.get("branch")),
        "trainable": _pattern_list("trainable", cfg.get("trainable")),
        "task_norm": TASK_NORM_MODES[task_norm],
        "classes": classes,
        "base_classes": base_classes,
        "class_map": dict(class_map),
        "side": resolve_side(cfg.get("side")),
        "preset": cfg.get("preset"),
    }


def _names(key: str, value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise DeltaPatchConfigError(
            f"delta_patch.{key} must be a list of class names, got {value!r}"
        )
    names = list(value)
    if not names or not all(isinstance(v, str) and v for v in names):
        raise DeltaPatchConfigError(
            f"delta_patch.{key} must be a non-empty list of class names (strings), got {value!r}"
        )
    dupes = sorted({v for v in names if names.count(v) > 1})
    if dupes:
        raise DeltaPatchConfigError(f"delta_patch.{key} names {dupes} more than once")
    return names


def _reserved_names() -> frozenset[str]:
    from .slot import DeltaSlot

    return frozenset(n for n in dir(DeltaSlot()) if _NAME_RE.match(n))


_RESERVED_NAMES = _reserved_names()
