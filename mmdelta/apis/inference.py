"""Patched models for inference: the counterparts of ``init_detector`` / ``init_model``.

Upstream's ``init_detector`` (mmdet), ``init_model`` (mmseg) and their Inferencers load
checkpoints with ``strict=False``: Δ tensors in a checkpoint are silently dropped, and a
config's ``delta_patch`` key is ignored. :func:`init_patched_model` builds the model, loads
the base (every key checked), then the patch — from patch files, or from the Δ tensors of
a training checkpoint — and raises when there is no patch to apply.
:func:`patched_inferencer` is ``DetInferencer`` / ``MMSegInferencer`` on such a model.
"""

import copy
from collections.abc import Sequence
from pathlib import Path

from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import MODELS, init_default_scope
from torch import nn

from ..patching import active_patch, apply_delta_patch, load_patch, set_active_patch
from ..runner.checkpoint import load_patch_state
from ..runner.model_setup import load_base_checkpoint, null_pretrained


class PatchNotFoundError(ValueError):
    """Asked for a patched model, but nothing says which patch."""


def _config(config) -> Config:
    if isinstance(config, str | Path):
        if not Path(config).is_file():
            raise FileNotFoundError(f"config file {str(config)!r} does not exist")
        return Config.fromfile(str(config))
    return copy.deepcopy(config)


def build_model(config, cfg_options: dict | None) -> tuple[nn.Module, Config]:
    """The config's model, built un-initialised for a checkpoint (no ImageNet download)."""
    cfg = _config(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    null_pretrained(cfg.model)
    if cfg.model.get("data_preprocessor") is None and cfg.get("data_preprocessor"):
        cfg.model.data_preprocessor = cfg.data_preprocessor
    init_default_scope(cfg.get("default_scope", "mmdet"))
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    model.cfg = cfg  # what the Inferencers and visualisers read
    return model, cfg


def _load_base(model: nn.Module, checkpoint, patch_cfg) -> dict:
    delta, meta = load_base_checkpoint(model, str(checkpoint), patch_cfg)
    if meta is not None:
        model.dataset_meta = meta
    return delta


def init_base_model(
    config, checkpoint: str, device: str = "cpu", cfg_options: dict | None = None
) -> nn.Module:
    """The plain base model of ``config`` (no patch, ``delta_patch`` ignored), in eval.

    Unlike upstream's ``init_detector`` / ``init_model`` every base key of ``checkpoint`` is
    checked (missing, unexpected or mis-shaped keys raise ``CheckpointError``) and the file
    is read with ``weights_only``. Δ tensors in the checkpoint are ignored.
    """
    model, _ = build_model(config, cfg_options)
    _load_base(model, checkpoint, None)
    return model.to(device).eval()


def init_patched_model(
    config,
    checkpoint: str,
    patch: str | Path | Sequence[str | Path] | None = None,
    device: str = "cpu",
    cfg_options: dict | None = None,
) -> nn.Module:
    """An mmdet / mmseg model (the config's ``default_scope``) carrying its Δ-patch, in eval.

    Args:
        config: config file or ``Config``.
        checkpoint: the base checkpoint, or a training checkpoint holding Δ tensors.
        patch: one or more patch files; the first is active, the others are loaded
            inactive (``set_active_patch`` switches). ``None``: the checkpoint's Δ tensors,
            for the config's ``delta_patch``.

    Raises:
        PatchNotFoundError: ``patch`` is None and the checkpoint holds no Δ tensors (or the
            config has no ``delta_patch``): use upstream's ``init_detector`` /
            ``init_model`` for the plain base.
        CheckpointError, PatchFileError, DeltaPatchConfigError: as their messages say.
    """
    model, cfg = build_model(config, cfg_options)
    patch_cfg = cfg.get("delta_patch")
    delta = _load_base(model, checkpoint, patch_cfg if patch is None else None)
    if patch is not None:
        files = [patch] if isinstance(patch, str | Path) else list(patch)
        names = [load_patch(model, f, activate=False) for f in files]
        set_active_patch(model, names[0])
    elif patch_cfg is not None and delta:
        apply_delta_patch(model, patch_cfg)
        load_patch_state(model, active_patch(model), delta, str(checkpoint))
    else:
        raise PatchNotFoundError(
            "no patch to apply: pass patch='….safetensors'"
            + (
                f" ({checkpoint} holds no Δ tensors)"
                if patch_cfg is not None
                else " (the config has no delta_patch and"
                f" {checkpoint} holds no Δ tensors it could describe)"
            )
            + "; for the plain base model use mmdet.apis.init_detector / mmseg.apis.init_model"
        )
    return model.to(device).eval()


def inferencer_class(cfg: Config) -> type:
    """The upstream Inferencer for a config: ``DetInferencer`` (``default_scope='mmdet'``,
    the default) or ``MMSegInferencer`` (``'mmseg'``); ``ValueError`` for any other scope."""
    scope = cfg.get("default_scope", "mmdet")
    if scope == "mmdet":
        from mmdet.apis import DetInferencer

        return DetInferencer
    if scope == "mmseg":
        from mmseg.apis import MMSegInferencer

        return MMSegInferencer
    raise ValueError(f"no Inferencer for default_scope {scope!r} (mmdet or mmseg)")


def patched_inferencer(
    config,
    checkpoint: str,
    patch: str | Path | Sequence[str | Path] | None = None,
    device: str = "cpu",
    **kwargs,
):
    """``DetInferencer`` (mmdet configs) or ``MMSegInferencer`` (mmseg) on a patched model.

    Same arguments as :func:`init_patched_model`; ``kwargs`` go to the Inferencer. The
    visualiser takes the class names of the patch active at construction.
    """
    cfg = _config(config)
    Inferencer = inferencer_class(cfg)

    class PatchedInferencer(Inferencer):
        def _init_model(self, cfg, weights, device="cpu"):
            return init_patched_model(cfg, weights, patch, device)

    return PatchedInferencer(model=cfg, weights=checkpoint, device=device, **kwargs)
