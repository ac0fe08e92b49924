"""Reading OpenMMLab checkpoints under torch's ``weights_only`` policy, and checked base loads.

torch ≥ 2.6 loads with ``weights_only=True``; mmengine 0.10.7 does not pass ``weights_only``,
so its own training checkpoints (message hub: ``HistoryBuffer`` objects holding numpy
arrays and references to their statistics methods) fail to load, and ``--resume`` breaks.
mmdelta keeps torch's safe unpickler and allow-lists exactly what mmengine writes:
``HistoryBuffer``, numpy arrays / scalars / dtypes, and a ``getattr`` restricted to
``HistoryBuffer``'s registered statistics methods. Nothing else is trusted, wherever the
file comes from; a checkpoint that needs more is refused with a message naming the global.

``load_base_state`` loads a base checkpoint into a model strictly: upstream loads with
``strict=False`` and only warns, so a wrong checkpoint "loads" and trains a wrong base.
"""

import contextlib
import re
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import _load_checkpoint
from torch import nn

from ..patching.slot import DELTA_SEGMENT


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked: unreadable, or not this model's base."""


def _history_buffer_getattr(obj, name: str):
    """``getattr`` as mmengine's pickled ``HistoryBuffer`` uses it, and for nothing else."""
    allowed = {"min", "max", "current", "mean", *HistoryBuffer._statistics_methods}
    if obj is HistoryBuffer and name in allowed:
        return getattr(obj, name)
    raise CheckpointError(
        f"checkpoint asks for getattr({obj!r}, {name!r}); only HistoryBuffer statistics "
        "methods are allowed"
    )


def _numpy_globals() -> list:
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtypes = [type(np.dtype(c)) for c in "?bhilqBHILQefdgFDGUSOV"] + [
        type(np.dtype("M8")),
        type(np.dtype("m8")),
    ]
    found = [np.ndarray, np.dtype, core._reconstruct, core.scalar, *dtypes]
    # files written with numpy < 2 name the same functions under numpy.core
    found += [
        (core._reconstruct, "numpy.core.multiarray._reconstruct"),
        (core.scalar, "numpy.core.multiarray.scalar"),
    ]
    return found


def mmengine_safe_globals() -> list:
    """What ``torch.load(weights_only=True)`` must accept to read mmengine's checkpoints."""
    return [HistoryBuffer, (_history_buffer_getattr, "builtins.getattr"), *_numpy_globals()]


@contextlib.contextmanager
def mmengine_checkpoints() -> Iterator[None]:
    """Scope in which ``torch.load`` (weights only) also accepts mmengine's checkpoint types."""
    with torch.serialization.safe_globals(mmengine_safe_globals()):
        yield


def read_checkpoint(filename: str, map_location="cpu") -> dict:
    """Loads a checkpoint file or URL (mmengine's loaders) with the weights-only policy.

    Raises :class:`CheckpointError` naming the file and the global it needs when the file
    holds anything beyond tensors, plain Python values and mmengine's own types.
    """
    try:
        with mmengine_checkpoints():
            checkpoint = _load_checkpoint(filename, map_location=map_location)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {filename!r} does not exist") from err
    except Exception as err:  # UnpicklingError, RuntimeError from a truncated zip, …
        found = re.search(r"GLOBAL (\S+) was not an allowed global|but got (<[^>]+>)", str(err))
        detail = (
            f"it needs {next(g for g in found.groups() if g)}, which mmdelta does not trust "
            "(torch.load runs with weights_only=True; only tensors, plain values and "
            "mmengine's own checkpoint types are allowed)"
            if found
            else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        )
        raise CheckpointError(f"cannot read checkpoint {filename!r}: {detail}") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {filename!r} holds a {type(checkpoint).__name__}")
    return checkpoint


def state_dict_of(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model state of a checkpoint dict (``state_dict`` or the dict itself), ``module.`` stripped."""
    state = checkpoint.get("state_dict", checkpoint)
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def split_delta(state: dict) -> tuple[dict, dict]:
    """(base entries, mmdelta entries) of a state dict."""
    base = {k: v for k, v in state.items() if DELTA_SEGMENT not in k}
    return base, {k: v for k, v in state.items() if DELTA_SEGMENT in k}


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def base_key_report(
    model: nn.Module, state: dict, owned: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """Compares a checkpoint's base entries with the model's own (un-patched) state.

    Returns (errors, expected): ``expected`` lists what a patch-owned module (``owned``
    module paths) may lack or hold at another shape; every other missing, unexpected or
    mismatched key is an error. ``num_batches_tracked`` counters missing from old
    checkpoints are expected too (BatchNorm uses its momentum, not the counter).
    """
    owned = list(owned)
    own = {k: v for k, v in model.state_dict().items() if DELTA_SEGMENT not in k}
    errors, expected = [], []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched)):
        key = lambda entry: entry.split(" ")[0]  # noqa: E731
        ok = [
            k
            for k in keys
            if _under(key(k), owned) or (what == "missing" and k.endswith("num_batches_tracked"))
        ]
        bad = [k for k in keys if k not in ok]
        if ok:
            expected.append(f"{what}: {_listing(ok)}")
        if bad:
            errors.append(f"{what} keys: {_listing(bad)}")
    return errors, expected


def load_base_state(
    model: nn.Module, state: dict, source: str, owned: Iterable[str] = (), logger=None
) -> None:
    """Loads ``state`` (base entries only) into ``model``, refusing any key it cannot explain.

    ``owned`` are module paths a patch will own: their entries may be missing or shaped
    differently (listed once in the log). Raises :class:`CheckpointError` naming the keys
    otherwise; the model is unchanged then.
    """
    errors, expected = base_key_report(model, state, owned)
    if errors:
        raise CheckpointError(
            f"{source} is not a base checkpoint for this model: "
            + "; ".join(errors)
            + ". Check `load_from` / the checkpoint argument against the config's `model`."
        )
    own = model.state_dict()
    loadable = {
        k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)
    }
    model.load_state_dict(loadable, strict=False)
    if expected and logger is not None:
        logger.info(
            f"mmdelta: {source}: expected differences (modules the patch owns): "
            + "; ".join(expected)
        )


def load_patch_state(model: nn.Module, name: str, state: dict, source: str) -> None:
    """Loads the checkpoint's tensors of patch ``name`` (all of them, or it refuses)."""
    own = {k: v for k, v in model.state_dict().items() if f"{DELTA_SEGMENT}{name}." in f".{k}"}
    other = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    shapes = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    problems = [
        f"{what}: {_listing(keys)}"
        for what, keys in (
            ("tensors of another patch or layout", other),
            ("missing", missing),
            ("wrong shape", shapes),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"{source} holds Δ tensors that do not fit patch {name!r} of this config: "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=False)
