"""Model-side helpers the runner and the inference helpers share.

* :func:`null_pretrained`: drop ImageNet ``Pretrained`` initialisers a base checkpoint
  replaces anyway (nothing downloads for nothing).
* :func:`patch_root`: the model a patch applies to (inside test-time augmentation wrappers).
* :func:`owned_paths`: the modules a patch config will own, without attaching anything.
* :func:`dataset_meta_of`: class names a checkpoint was trained with (``model.dataset_meta``).
* :func:`load_base_checkpoint`: the base part of a checkpoint into a model, every key checked.
"""

from collections.abc import Mapping, MutableMapping

from mmengine.model import BaseTTAModel, is_model_wrapper
from torch import nn

from ..branches import PatchOwned
from ..patching.apply import build_patch
from .checkpoint import (
    base_key_report,
    load_base_state,
    read_checkpoint,
    split_delta,
    state_dict_of,
)


def null_pretrained(model_cfg: MutableMapping) -> list[str]:
    """Removes every ``Pretrained`` ``init_cfg`` (and mmseg's ``model.pretrained``), in place.

    Returns the dotted config paths it removed, for the log.
    """
    removed = []

    def is_pretrained(init) -> bool:
        return isinstance(init, Mapping) and init.get("type") == "Pretrained"

    def walk(node, path: str) -> None:
        if isinstance(node, MutableMapping):
            if node.get("pretrained") is not None and isinstance(node["pretrained"], str):
                removed.append(f"{path}.pretrained")
                node["pretrained"] = None
            init = node.get("init_cfg")
            if is_pretrained(init):
                removed.append(f"{path}.init_cfg")
                node["init_cfg"] = None
            elif isinstance(init, list) and any(is_pretrained(i) for i in init):
                removed.append(f"{path}.init_cfg")
                node["init_cfg"] = [i for i in init if not is_pretrained(i)] or None
            for key, value in node.items():
                if key != "init_cfg":
                    walk(value, f"{path}.{key}")
        elif isinstance(node, list | tuple):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(model_cfg, "model")
    return removed


def patch_root(model: nn.Module) -> nn.Module:
    """The detector / segmenter itself: unwraps DDP and test-time-augmentation wrappers."""
    if is_model_wrapper(model):
        model = model.module
    while isinstance(model, BaseTTAModel):
        model = model.module
    return model


def owned_paths(model: nn.Module, cfg: Mapping | None) -> list[str]:
    """Module paths a patch built from ``cfg`` would own (a dry run; ``model`` unchanged)."""
    built = build_patch(model, cfg)
    return [path for path, _, branch in built.branches if isinstance(branch, PatchOwned)]


def dataset_meta_of(checkpoint: dict) -> dict | None:
    """``meta['dataset_meta']`` of an mmengine checkpoint, or the old ``meta['CLASSES']``."""
    meta = checkpoint.get("meta") or {}
    if isinstance(meta.get("dataset_meta"), Mapping) and meta["dataset_meta"].get("classes"):
        return dict(meta["dataset_meta"])
    if meta.get("CLASSES"):
        return {"classes": tuple(meta["CLASSES"])}
    return None


def load_base_checkpoint(
    model: nn.Module, filename: str, patch_cfg: Mapping | None = None, logger=None
) -> tuple[dict, dict | None]:
    """Loads the base entries of checkpoint ``filename`` into the un-patched ``model``.

    Every base key is checked (:func:`~mmdelta.runner.checkpoint.load_base_state`); modules
    the patch ``patch_cfg`` is going to own may be missing or shaped differently (found by
    a dry run, only when the keys do not match as they are). Returns ``(Δ entries of the
    checkpoint, its dataset_meta or None)``; the model is unchanged when it raises.
    """
    checkpoint = read_checkpoint(filename)
    base, delta = split_delta(state_dict_of(checkpoint))
    owned = []
    if patch_cfg is not None and base_key_report(model, base)[0]:
        owned = owned_paths(model, patch_cfg)
    load_base_state(model, base, f"checkpoint {filename}", owned, logger)
    return delta, dataset_meta_of(checkpoint)
