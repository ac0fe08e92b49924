"""Patch files: ``save_patch`` / ``load_patch``.

A patch file is a `safetensors <https://github.com/huggingface/safetensors>`_ file (no
pickle: loading never executes code) holding only the patch's tensors, keyed
``"<layer path>:<tensor>"`` (e.g. ``backbone.layer1.0.conv1:up``,
``roi_head.bbox_head.fc_cls:weight``), and string metadata:

* ``mmdelta.format`` = ``mmdelta-patch``, ``mmdelta.format_version``, ``mmdelta.version``;
* ``mmdelta.name`` and ``mmdelta.cfg`` (the resolved ``delta_patch`` config, JSON), from
  which :func:`load_patch` rebuilds the patch on a plain base model; ``mmdelta.classes``;
* ``mmdelta.base_architecture`` (a hash of the base state dict's names, shapes and
  dtypes), ``mmdelta.base_fingerprint`` (a hash of its values: the base the patch was
  trained on), ``mmdelta.base_model`` and ``mmdelta.base_params`` (for messages).
"""

import hashlib
import json
import weakref
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..exactness import key_mismatch
from ..fileio import write_atomic
from ..version import __version__
from .apply import attach_patch, build_patch
from .config import DEFAULT_NAME, DeltaPatchConfigError, resolve_config
from .slot import iter_slots
from .state import base_state_dict, patch_configs, resolve_patch_name, set_active_patch
from .targets import base_modules

FORMAT = "mmdelta-patch"
FORMAT_VERSION = "1"


class PatchFileError(ValueError):
    """A patch file that cannot be loaded onto the given model (the model is unchanged)."""


def _hash_state(state: dict, values: bool) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key]
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        if values:
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return digest.hexdigest()


#: model -> (tensor ids and versions, the tensors, hash): see :func:`base_fingerprint`
_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def base_architecture(model: nn.Module, state: dict | None = None) -> str:
    """Hash of the base state dict's names, shapes and dtypes (the architecture); ``state``
    is ``base_state_dict(model)`` where the caller has it already."""
    return _hash_state(base_state_dict(model) if state is None else state, values=False)


def base_fingerprint(model: nn.Module, state: dict | None = None) -> str:
    """Hash of the base state dict's values, cached per model (beside it, in a weak map:
    nothing is stored on the model) while no base tensor is replaced or written (keyed on the parameter / buffer objects and their versions; the
    cache holds them, so their ids stay theirs)."""
    tensors = [
        t
        for _, module in base_modules(model)
        for t in (*module._parameters.values(), *module._buffers.values())
        if t is not None
    ]
    key = tuple((id(t), t._version) for t in tensors)
    cached = _FINGERPRINTS.get(model)
    if cached is None or cached[0] != key:
        state = base_state_dict(model) if state is None else state
        cached = (key, tensors, _hash_state(state, values=True))
        _FINGERPRINTS[model] = cached
    return cached[2]


def _patch_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {
        f"{path}:{key}": tensor
        for path, slot in iter_slots(model)
        if name in slot
        for key, tensor in slot[name].state_dict().items()
    }


def save_patch(model: nn.Module, path, name: str | None = None, overwrite: bool = False) -> Path:
    """Writes patch ``name`` (default: the active one, else the only one) of ``model`` to
    ``path``.

    Only the patch's tensors are written, with the metadata described above. The write is
    atomic: a temporary file in the same folder, flushed to disk, then renamed over
    ``path`` — a crash never leaves a truncated patch file. An existing file is only
    replaced with ``overwrite=True``.
    """
    name = resolve_patch_name(model, name, "save")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist; create it first")
    tensors = {
        k: t.detach().cpu().contiguous().clone() for k, t in _patch_tensors(model, name).items()
    }
    cfg = patch_configs(model)[name]
    base = base_state_dict(model)
    metadata = {
        "mmdelta.format": FORMAT,
        "mmdelta.format_version": FORMAT_VERSION,
        "mmdelta.version": __version__,
        "mmdelta.name": name,
        "mmdelta.cfg": json.dumps(cfg, sort_keys=True),
        "mmdelta.classes": json.dumps(cfg.get("classes")),
        "mmdelta.base_architecture": base_architecture(model, base),
        "mmdelta.base_fingerprint": base_fingerprint(model, base),
        "mmdelta.base_model": type(model).__name__,
        "mmdelta.base_params": str(sum(t.numel() for t in base.values())),
    }
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def read_patch_file(path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a patch file, validated as a file (not yet against a
    model). Raises :class:`PatchFileError` for a missing, empty, truncated or corrupt file
    or one without mmdelta metadata."""
    path = Path(path)
    if not path.is_file():
        raise PatchFileError(f"no patch file at {path}")
    if path.stat().st_size == 0:
        raise PatchFileError(f"patch file {path} is empty")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise PatchFileError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from err
    if metadata.get("mmdelta.format") != FORMAT:
        raise PatchFileError(f"{path} is a safetensors file but not an mmdelta patch file")
    if metadata.get("mmdelta.format_version") != FORMAT_VERSION:
        raise PatchFileError(
            f"{path} has patch format version {metadata.get('mmdelta.format_version')!r}; this "
            f"mmdelta reads version {FORMAT_VERSION}"
        )
    try:
        cfg = json.loads(metadata["mmdelta.cfg"])
    except (KeyError, ValueError, RecursionError) as err:
        raise PatchFileError(f"{path}: metadata mmdelta.cfg is missing or not JSON") from err
    if not isinstance(cfg, dict):
        raise PatchFileError(
            f"{path}: metadata mmdelta.cfg must be a JSON object (the delta_patch config), "
            f"got {type(cfg).__name__}"
        )
    if not tensors:
        raise PatchFileError(f"patch file {path} holds no tensors")
    return metadata, tensors


def _check_tensors(path, file: dict, expected: dict[str, torch.Tensor]) -> None:
    mismatch = key_mismatch(expected, file)
    if mismatch:
        raise PatchFileError(
            f"{path} does not fit the patch its config builds on this model: tensors {mismatch}"
        )
    for key, tensor in file.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise PatchFileError(
                f"{path}: tensor {key} has shape {tuple(tensor.shape)}, the model needs "
                f"{tuple(want.shape)}"
            )
        if tensor.dtype != want.dtype:  # a cast could round, overflow to Inf or wrap around
            raise PatchFileError(f"{path}: tensor {key} has dtype {tensor.dtype}, not {want.dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise PatchFileError(f"{path}: tensor {key} holds NaN or Inf values")


def load_patch(
    model: nn.Module,
    path,
    name: str | None = None,
    activate: bool = True,
    check_base: bool = True,
) -> str:
    """Loads the patch file at ``path`` onto ``model`` under ``name`` (default: the name it
    was saved with) and, with ``activate``, makes it the active patch. Returns the name.

    Works on a plain base model (the patch is rebuilt from the file's recorded config) and on
    a model that already carries a patch of that name built from the same config (its
    tensors are replaced). Everything is checked before anything changes: on any error the
    model is exactly as it was.

    Raises:
        PatchFileError: missing / empty / truncated / corrupt file, another architecture,
            another base (fingerprint; ``check_base=False`` skips only this check), tensors
            with NaN/Inf, wrong shapes or dtypes, missing or unexpected tensors.
    """
    metadata, tensors = read_patch_file(path)
    cfg = json.loads(metadata["mmdelta.cfg"])
    if name is None:
        name = metadata.get("mmdelta.name", cfg.get("name", DEFAULT_NAME))
    if not isinstance(name, str):
        raise PatchFileError(f"{path}: the patch name it records is not a string: {name!r}")
    base = base_state_dict(model)
    if metadata.get("mmdelta.base_architecture") != base_architecture(model, base):
        params = metadata.get("mmdelta.base_params", "?")
        params = f"{int(params):,}" if params.isdecimal() else repr(params)
        raise PatchFileError(
            f"{path} was built for another base model: {metadata.get('mmdelta.base_model')} "
            f"with {params} parameters, while this is a {type(model).__name__} with "
            f"{sum(t.numel() for t in base.values()):,} (the state dicts' "
            "names or shapes differ)"
        )
    if check_base and metadata.get("mmdelta.base_fingerprint") != base_fingerprint(model, base):
        raise PatchFileError(
            f"{path} was trained on other base weights than this model holds (same "
            "architecture, different values): load the base checkpoint it was trained on, or "
            "pass check_base=False to use it anyway"
        )
    if name in patch_configs(model):
        existing = dict(patch_configs(model)[name])
        try:  # a file written before a schema key existed records no value for it
            recorded = resolve_config(model, {**cfg, "name": name})
        except DeltaPatchConfigError:
            recorded = cfg
        if {**existing, "name": None} != {**recorded, "name": None}:
            raise PatchFileError(
                f"{path}: the model already carries a patch {name!r} built from another "
                "config than this file records; load this file under another name"
            )
        built, expected = None, _patch_tensors(model, name)
    else:
        try:
            built = build_patch(model, cfg, name=name)
        except DeltaPatchConfigError as err:
            raise PatchFileError(f"{path}: its config does not apply to this model: {err}") from err
        expected = built.tensors()
    _check_tensors(path, tensors, expected)
    with torch.no_grad():  # bumps tensor versions: no inference fold cached before is reused
        for key, tensor in tensors.items():
            expected[key].copy_(tensor)
    if built is not None:
        attach_patch(model, built, select=False)
    if activate:
        set_active_patch(model, name)
    return name
