"""A standalone checkpoint + config: a Δ-patch merged into its base for plain mmdet / mmseg.

:func:`write_standalone` loads the base checkpoint and the patch file
(:func:`~mmdelta.apis.init_patched_model`: every base key checked, the patch checked against
the base), folds the patch into plain weights (:func:`~mmdelta.patching.merge_patch`) and
writes two files that upstream loads with no mmdelta installed:

* the checkpoint ``{'state_dict': …, 'meta': {'dataset_meta': …, 'mmdelta': provenance}}``,
  only tensors and plain Python values, so ``torch.load(weights_only=True)`` — what
  mmengine's ``load_checkpoint`` does under torch ≥ 2.6 — reads it;
* the config: the source config resolved, without ``delta_patch``, the ``DeltaRunner``, mmdelta
  hooks and imports, with the heads' class counts and the datasets' ``metainfo`` of the
  patch's class set. Before anything is written, the model this config builds must take
  the merged state dict with every key and shape matching.

Invariants: nothing is written unless both files can be; an existing file is replaced only
with ``overwrite=True``; each write is atomic (:func:`mmdelta.fileio.write_atomic`).
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.fileio import dump
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from ..apis.inference import build_model, init_patched_model
from ..fileio import write_atomic, write_text_atomic
from ..patching import delta_disabled, merge_patch, patch_classes
from ..patching.classes import CLASS_COUNT_ATTRS
from ..patching.state import resolve_patch_name
from ..registry import DELTA_BRANCHES
from ..runner.checkpoint import load_base_state
from ..runner.delta_runner import PATCH_FILE_KEY
from ..version import __version__

CONFIG_FORMATS = (".py", ".json", ".yaml", ".yml")


class StandaloneError(RuntimeError):
    """No standalone checkpoint can be written as asked (nothing was written)."""


class NotMergeableError(StandaloneError):
    """The patch has branches no plain layer can compute (e.g. ``BlockDelta``)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _NotPlain(TypeError):
    pass


def _plain(value):
    """``value`` as tuples / lists / dicts of str, int, float, bool, None (what
    ``torch.load(weights_only=True)`` reads); raises ``_NotPlain`` for anything else."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    raise _NotPlain(type(value).__name__)


def _dataset_meta(merged, classes: list[str] | None) -> dict:
    """The merged model's ``dataset_meta`` (the patch's classes; a palette only when it has
    one colour per class), as plain values."""
    meta = dict(getattr(merged, "dataset_meta", None) or {})
    if classes is not None:
        meta["classes"] = tuple(classes)
    if "classes" in meta:
        meta["classes"] = tuple(str(c) for c in meta["classes"])
        palette = meta.get("palette")
        if palette is not None and (
            isinstance(palette, str) or len(palette) != len(meta["classes"])
        ):
            del meta["palette"]
    plain = {}
    for key, value in meta.items():
        try:
            plain[str(key)] = _plain(value)
        except _NotPlain:
            pass  # e.g. a visualiser object: upstream checkpoints carry none either
    return plain


def _cfg_node(model_cfg, path: str):
    """The config dict that builds module ``path`` of the model, or None."""
    node = model_cfg
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if isinstance(node, MutableMapping) else None


def _class_count_changes(model, merged) -> dict[str, dict[str, int]]:
    """Module path -> {class-count attribute -> merged value} where the merged model's value
    differs from the base's (the heads a patch with its own class set switches)."""
    with delta_disabled(model):
        base = {
            path: {
                a: getattr(m, a) for a in CLASS_COUNT_ATTRS if isinstance(getattr(m, a, None), int)
            }
            for path, m in model.named_modules()
        }
    changes = {}
    for path, module in merged.named_modules():
        values = {
            a: getattr(module, a)
            for a in CLASS_COUNT_ATTRS
            if isinstance(getattr(module, a, None), int) and base.get(path, {}).get(a) is not None
        }
        changed = {a: v for a, v in values.items() if v != base[path][a]}
        if changed:
            changes[path] = changed
    return changes


def _set_head_classes(cfg: Config, changes: dict[str, dict[str, int]]) -> None:
    """Writes the changed class counts into ``cfg.model``: ``num_classes`` always, the other
    class-count attributes only where the config sets them. Modules the config does not
    describe are fine when an enclosing head's entry was set (the head builds them) or at
    the root (mmseg's segmentor copies its decode head's count)."""
    done: list[str] = []
    for path in sorted(changes, key=len):
        if not path:
            continue
        node = _cfg_node(cfg.model, path)
        if node is None:
            if any(path.startswith(p + ".") for p in done):
                continue
            raise StandaloneError(
                f"the patch changes the class count of module {path!r} "
                f"({changes[path]}), but the config has no model.{path} entry to set it in; "
                "write the standalone config by hand"
            )
        for attr, value in changes[path].items():
            if attr == "num_classes" or attr in node:
                node[attr] = value
        done.append(path)


def _leaf_datasets(node) -> list[MutableMapping]:
    """The dataset configs inside a dataloader's ``dataset`` (through wrappers)."""
    if not isinstance(node, MutableMapping):
        return []
    inner = [node["dataset"]] if isinstance(node.get("dataset"), Mapping) else []
    inner += [d for d in node.get("datasets", None) or [] if isinstance(d, Mapping)]
    return [leaf for d in inner for leaf in _leaf_datasets(d)] if inner else [node]


def _set_metainfo(cfg: Config, meta: dict, base_classes) -> None:
    """Every ``metainfo`` of the config, and every dataloader's dataset, gets the patch's
    classes (and its palette, or none); a top-level ``classes`` equal to the base's names
    follows."""
    classes = meta["classes"]

    def fix(metainfo: MutableMapping) -> None:
        metainfo["classes"] = tuple(classes)
        if meta.get("palette") is not None:
            metainfo["palette"] = [list(c) for c in meta["palette"]]
        else:
            metainfo.pop("palette", None)

    def walk(node) -> None:
        if isinstance(node, MutableMapping):
            if isinstance(node.get("metainfo"), MutableMapping):
                fix(node["metainfo"])
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(cfg._cfg_dict)
    for key in [k for k in cfg if k.endswith("_dataloader")]:
        for dataset in _leaf_datasets(cfg[key]):
            if not isinstance(dataset.get("metainfo"), MutableMapping):
                dataset["metainfo"] = dict()
                fix(dataset["metainfo"])
    top = cfg.get("classes")
    if base_classes is not None and isinstance(top, (list, tuple)):
        if [str(c) for c in top] == [str(c) for c in base_classes]:
            cfg["classes"] = tuple(classes)


def _is_mmdelta(type_) -> bool:
    if isinstance(type_, type):
        return type_.__module__.split(".")[0] == "mmdelta"
    cls = HOOKS.module_dict.get(type_) if isinstance(type_, str) else None
    return cls is not None and cls.__module__.split(".")[0] == "mmdelta"


def standalone_config(cfg: Config, merged, model, classes: list[str] | None, meta: dict) -> Config:
    """The plain config of the merged model: ``cfg`` without anything of mmdelta, with the
    patch's class counts and class names. ``cfg`` is not changed."""
    out = copy.deepcopy(cfg)
    for key in ("delta_patch", PATCH_FILE_KEY):
        out.pop(key, None)
    if out.get("runner_type") == "DeltaRunner":
        out.pop("runner_type")
    if out.get("custom_hooks"):
        out.custom_hooks = [h for h in out.custom_hooks if not _is_mmdelta(h.get("type"))]
        if not out.custom_hooks:
            out.pop("custom_hooks")
    imports = out.get("custom_imports")
    if imports:
        kept = [
            i for i in imports.get("imports", []) if i != "mmdelta" and not i.startswith("mmdelta.")
        ]
        if kept:
            out.custom_imports.imports = kept
        else:
            out.pop("custom_imports")
    # the source's load_from is the base checkpoint, which does not fit this model
    if out.get("load_from") is not None:
        out.load_from = None
    if classes is not None:
        _set_head_classes(out, _class_count_changes(model, merged))
        with delta_disabled(model):  # dataset_meta follows the active patch
            base_classes = (getattr(model, "dataset_meta", None) or {}).get("classes")
        _set_metainfo(out, meta, base_classes)
    return out


def _config_text(cfg: Config, path: Path) -> str:
    if path.suffix == ".py":
        return cfg.pretty_text
    return dump(cfg.to_dict(), file_format=path.suffix.lstrip(".").replace("yml", "yaml"))


def _check_config_builds(text: str, suffix: str, state: dict, what: str) -> None:
    """The model the written config builds takes ``state`` with every key and shape."""
    try:
        built, _ = build_model(Config.fromstring(text, suffix), None)
        load_base_state(built, state, what)
    except Exception as err:
        raise StandaloneError(
            f"the standalone config does not build a model that fits the merged checkpoint "
            f"(a bug, or a config mmdelta cannot rewrite): {type(err).__name__}: {err}"
        ) from err


def _mergeable_types() -> list[str]:
    return sorted(k for k, cls in DELTA_BRANCHES.module_dict.items() if cls.mergeable)


def write_standalone(
    config,
    base_checkpoint,
    patch_file,
    out_checkpoint,
    out_config=None,
    overwrite: bool = False,
    cfg_options: dict | None = None,
) -> tuple[Path, Path]:
    """Merges ``patch_file`` into ``base_checkpoint`` and writes the standalone checkpoint
    ``out_checkpoint`` and its plain config ``out_config`` (default: ``out_checkpoint`` with
    suffix ``.py``). Returns both paths.

    ``config`` is the base's config (a patch-training config with ``delta_patch`` works too;
    the patch file's own recorded config builds the patch). The files load with
    ``mmdet.apis.init_detector(out_config, out_checkpoint)`` /
    ``mmseg.apis.init_model(...)`` and compute the patched model's outputs.

    Raises:
        FileNotFoundError: a missing input file.
        FileExistsError: an output exists and ``overwrite`` is False (nothing is written).
        PatchFileError: the patch does not fit the base (another model, other base weights).
        CheckpointError: the checkpoint is not this config's base.
        NotMergeableError: the patch has branches that cannot be folded (``BlockDelta``).
        StandaloneError: the config cannot be rewritten for the merged model.
    """
    out_checkpoint = Path(out_checkpoint)
    out_config = Path(out_config) if out_config is not None else out_checkpoint.with_suffix(".py")
    inputs = {"config": config, "base checkpoint": base_checkpoint, "patch file": patch_file}
    for what, path in inputs.items():
        if isinstance(path, (str, Path)) and not Path(path).is_file():
            raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if out_config.suffix not in CONFIG_FORMATS:
        raise ValueError(f"out_config {out_config} must end with one of {CONFIG_FORMATS}")
    if out_config.resolve() == out_checkpoint.resolve():
        raise ValueError(f"out_config and out_checkpoint are the same file {out_checkpoint}")
    for out in (out_checkpoint, out_config):
        if any(
            isinstance(p, (str, Path)) and out.resolve() == Path(p).resolve()
            for p in inputs.values()
        ):
            raise ValueError(f"output {out} would replace one of the inputs")
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass --force (overwrite=True) to replace it")

    cfg = Config.fromfile(str(config)) if isinstance(config, (str, Path)) else copy.deepcopy(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    model = init_patched_model(cfg, str(base_checkpoint), str(patch_file))
    name = resolve_patch_name(model, None, "merge")
    try:
        merged = merge_patch(model, name)
    except ValueError as err:
        raise NotMergeableError(
            f"{patch_file}: no standalone checkpoint written. {err} — e.g. "
            "`tools/test.py CONFIG BASE --patch PATCH` or "
            "`mmdelta.apis.init_patched_model(config, base, patch)`. To deploy without "
            f"mmdelta, retrain the patch with a mergeable branch type ({_mergeable_types()})."
        ) from err
    classes = patch_classes(model, name)
    dataset_meta = _dataset_meta(merged, classes)
    merged_state = merged.state_dict()
    state = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in merged_state.items())
    state._metadata = merged_state._metadata  # module versions, as upstream checkpoints keep
    provenance = {
        "patch_name": name,
        "patch_file": Path(patch_file).name,
        "patch_sha256": _sha256(Path(patch_file)),
        "base_checkpoint": Path(base_checkpoint).name,
        "base_checkpoint_sha256": _sha256(Path(base_checkpoint)),
        "config": Path(config).name if isinstance(config, (str, Path)) else None,
        "classes": None if classes is None else tuple(classes),
        "mmdelta_version": __version__,
    }
    checkpoint = {"state_dict": state, "meta": {"mmdelta": provenance}}
    if dataset_meta:
        checkpoint["meta"]["dataset_meta"] = dataset_meta
    plain_cfg = standalone_config(cfg, merged, model, classes, dataset_meta)
    text = _config_text(plain_cfg, out_config)
    _check_config_builds(text, out_config.suffix, state, f"standalone checkpoint {out_checkpoint}")

    write_atomic(out_checkpoint, lambda tmp: torch.save(checkpoint, tmp))
    write_text_atomic(out_config, text)
    print_log(
        f"mmdelta: merged patch {name!r} ({len(classes) if classes else 'base'} classes) into "
        f"{base_checkpoint}: wrote {out_checkpoint} and {out_config}",
        logger="current",
    )
    return out_checkpoint, out_config
