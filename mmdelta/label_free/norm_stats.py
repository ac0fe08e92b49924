"""Label-free domain patches: re-estimated normalisation statistics (AdaBN) as a patch.

Given only unlabelled images of a new environment, :func:`adapt_norm_stats` adds a
task-specific-norm patch to a frozen base model and fills it with the statistics of the new
images — no labels, no gradients, no optimiser:

* **What the patch is.** An ordinary mmdelta patch built by :func:`mmdelta.apply_delta_patch`
  with ``branch=None`` (no Δ branches) and ``task_norm='stats'``, targeting every
  normalisation layer with running statistics (BatchNorm, SyncBN, tracked InstanceNorm)
  under ``targets`` (default: the model's ``backbone``, ``neck``, ``decode_head``). The
  patch owns a copy of each such layer (:class:`~mmdelta.branches.PatchOwned`): its affine
  ``weight`` / ``bias`` are the base's, its ``running_mean`` / ``running_var`` (shape
  ``(C,)``, one value per channel) are re-estimated. LayerNorm / GroupNorm normalise each
  sample with its own statistics and have nothing to re-estimate; they are left out.
  It is saved, loaded, switched and merged like any patch (``save_patch``, ``load_patch``).
* **The statistics.** One pass over the images with the model in eval mode except the
  patch's norm copies, which normalise with the statistics of the current batch (as in
  training, and as ``torch.optim.swa_utils.update_bn`` does). For every owned layer the
  per-channel mean and variance of its *input* are accumulated over all images — every
  element of every image counts once, whatever the batching (each batch's moments merged
  in float64, Chan et al.) — and written as ``running_mean`` and ``running_var`` (unbiased,
  as PyTorch's BatchNorm keeps it); ``num_batches_tracked`` is the number of batches seen.
  Images of different sizes are padded by the model's data preprocessor as at inference,
  and the padding counts like image content.
* **The base is never altered.** The pass reads only the patch's copies; the base layers'
  parameters and buffers are neither read for the new statistics nor written (checked
  after the pass: any change to a base tensor raises). Modes are set for the pass by
  putting the whole model in eval (so mmdet ResNet's ``_freeze_stages`` / ``norm_eval`` and
  the frozen-base guard run first) and only then the patch's copies in train mode; nothing
  in a forward pass switches modes. Afterwards the model is back in the mode it had.
  With the patch off (``set_active_patch(model, None)``, ``delta_disabled``) the model is
  the base, bit for bit.
* On any error the patch is removed again and the model is as it was (active patch and
  mode included).

Statistics are those of the layers' inputs *in the patched model* (each layer sees inputs
normalised by the layers before it with batch statistics), so they depend on the batch
size a little; batches of 4-8 images were used for the measurements in the README.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..branches.owned import PatchOwned, tracks_running_stats
from ..datasets.images import list_images
from ..patching import active_patch, apply_delta_patch, remove_patch, set_active_patch
from ..patching.config import default_targets
from ..patching.targets import base_modules, norm_layers


class LabelFreeError(ValueError):
    """Label-free adaptation cannot run: no images, no layer to adapt, a layer never reached."""


# --------------------------------------------------------------------------- images


def _find_pipeline(dataset) -> list | None:
    """The ``pipeline`` of a dataset config, looking through wrappers (``dataset`` /
    ``datasets`` keys)."""
    if not isinstance(dataset, Mapping):
        return None
    if dataset.get("pipeline") is not None:
        return list(dataset["pipeline"])
    inner = dataset.get("dataset")
    if inner is None and dataset.get("datasets"):
        inner = dataset["datasets"][0]
    return _find_pipeline(inner)


def image_only_pipeline(cfg) -> list[dict]:
    """The config's test pipeline (``test_dataloader.dataset.pipeline``, else
    ``test_pipeline``) without its annotation-loading transforms (every transform whose type
    names ``Annotations``: ``LoadAnnotations``, ``mmdet.LoadPanopticAnnotations``, …)."""
    pipeline = _find_pipeline(cfg.get("test_dataloader", {}).get("dataset"))
    if pipeline is None:
        pipeline = cfg.get("test_pipeline")
    if not pipeline:
        raise LabelFreeError(
            "the config has no test pipeline (test_dataloader.dataset.pipeline or "
            "test_pipeline) to read the images with"
        )
    kept = [
        dict(t)
        for t in pipeline
        if not (isinstance(t.get("type"), str) and "Annotations" in t["type"])
    ]
    if not kept:
        raise LabelFreeError(f"the config's test pipeline {pipeline} has no image transforms")
    return kept


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], pipeline: list[dict]):
        from mmengine.dataset import Compose

        self.files = files
        self.pipeline = Compose(pipeline)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        results = self.pipeline(dict(img_path=str(path), img_id=path.stem, sample_idx=index))
        if results is None:
            raise LabelFreeError(f"the image pipeline dropped {path}")
        return results


def unlabelled_loader(
    cfg,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    batch_size: int = 4,
    max_images: int | None = None,
) -> torch.utils.data.DataLoader:
    """A data loader over unlabelled image files through the config's test pipeline without
    annotation loading (:func:`image_only_pipeline`); batches are what mmengine's loaders
    yield (``dict(inputs=[...], data_samples=[...])``). ``max_images``: the first K files."""
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope

    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    files = list_images(images)
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be ≥ 1, got {max_images}")
        files = files[:max_images]
    init_default_scope(cfg.get("default_scope", "mmdet"))
    dataset = _ImageDataset(files, image_only_pipeline(cfg))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=pseudo_collate
    )


# --------------------------------------------------------------------------- statistics


class _ChannelMoments:
    """Per-channel count, mean and sum of squared deviations of a layer's inputs (float64),
    merged batch by batch (Chan et al.'s parallel update)."""

    def __init__(self):
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise LabelFreeError(f"a normalisation layer got an input of shape {tuple(x.shape)}")
        dims = [d for d in range(x.dim()) if d != 1]
        n_b = x.numel() // x.shape[1]
        if n_b == 0:
            return
        # the batch's own moments in its dtype (torch's two-pass var_mean), merged in float64
        var_b, mean_b = torch.var_mean(x.detach(), dim=dims, correction=0)
        mean_b, m2_b = mean_b.double(), var_b.double() * n_b
        if self.n == 0:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / n)
        self.n = n

    def var(self) -> torch.Tensor:
        return self.m2 / max(self.n - 1, 1)  # unbiased, as BatchNorm's running_var


def stats_layers(
    model: nn.Module, targets: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> list[tuple[str, nn.Module]]:
    """``(path, layer)`` of every normalisation layer with running statistics under
    ``targets`` (default: the model's ``backbone``, ``neck``, ``decode_head``), minus
    ``exclude``: what :func:`adapt_norm_stats` re-estimates.

    Raises:
        LabelFreeError: there is none (naming the targets and the norm layers found).
        DeltaPatchConfigError: a pattern matches no module.
    """
    targets = list(targets) if targets else default_targets(model)
    norms = norm_layers(model, targets, list(exclude), set())
    layers = [(p, m) for p, m in norms if tracks_running_stats(m)]
    if not layers:
        other = sorted({type(m).__name__ for _, m in norms})
        raise LabelFreeError(
            f"targets {targets} (exclude {list(exclude)}) hold no normalisation layer with "
            "running statistics (BatchNorm, SyncBN, tracked InstanceNorm): nothing to "
            "re-estimate"
            + (
                f"; the norm layers there ({other}) normalise each sample with its own statistics"
                if other
                else ""
            )
            + ". Name the modules that hold BatchNorm layers with `targets`."
        )
    return layers


def _literal(path: str) -> str:
    """An fnmatch pattern matching exactly ``path``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def _batch_size(batch) -> int:
    inputs = batch["inputs"] if isinstance(batch, Mapping) else batch
    return len(inputs)


def _head(batch, k: int):
    """The first ``k`` images of a batch (``dict(inputs=..., data_samples=...)``)."""
    if isinstance(batch, Mapping):
        return {
            key: value[:k] if isinstance(value, list | tuple | torch.Tensor) else value
            for key, value in batch.items()
        }
    return batch[:k]


def _run(model: nn.Module, batch) -> None:
    if not isinstance(batch, Mapping) or "inputs" not in batch:
        raise LabelFreeError(
            "adapt_norm_stats needs data batches as mmengine data loaders yield them "
            f"(dict(inputs=..., data_samples=...)), got {type(batch).__name__}; pass a folder "
            "or image files (with the config) to read them through the test pipeline"
        )
    data = model.data_preprocessor(batch, False)
    model(**data, mode="tensor")


def _base_tensor_versions(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        f"{path}:{name}": (id(t), t._version)
        for path, module in base_modules(model)
        for name, t in (*module._parameters.items(), *module._buffers.items())
        if t is not None
    }


def adapt_norm_stats(
    model: nn.Module,
    data: Iterable | str | os.PathLike | Sequence[str | os.PathLike],
    name: str = "adabn",
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    max_images: int | None = None,
    activate: bool = True,
    cfg=None,
    batch_size: int = 4,
) -> str:
    """Adds a label-free patch ``name`` to ``model``: its own copies of the normalisation
    layers with running statistics under ``targets``, their statistics re-estimated on
    ``data``. Returns the patch name. See the module docstring for what is computed and
    the guarantees (the base is never altered; patch off == base bitwise).

    Args:
        model: an mmdet / mmseg (or mmpretrain) model, e.g. from
            :func:`mmdelta.apis.init_base_model`; it may carry other patches.
        data: unlabelled images: an iterable of data batches as an mmengine data loader
            yields them (``dict(inputs=[...], data_samples=[...])``, raw, before the data
            preprocessor), or a folder / image files, read through the test pipeline of
            ``cfg`` (default ``model.cfg``) without annotation loading.
        name: the patch name.
        targets, exclude: module-path globs (as ``delta_patch.targets`` / ``exclude``).
        max_images: use at most this many images (the first ones); ``None``: all.
        activate: leave the new patch active (default); ``False`` restores the patch that
            was active before (``None``: the base).
        cfg: the config whose test pipeline reads image files (only for files / folders).
        batch_size: images per batch when reading files.

    Raises:
        LabelFreeError: no images; no layer with running statistics under ``targets``; a
            targeted layer that the forward pass never reached (leave it out with
            ``exclude``).
        DeltaPatchConfigError: bad patterns, or a patch ``name`` the model already carries.
        FileNotFoundError: a named image file or folder does not exist.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be ≥ 1, got {max_images}")
    data = _as_batches(model, data, cfg, batch_size, max_images)
    layers = stats_layers(model, targets, exclude)
    patch_cfg = dict(
        name=name,
        targets=[_literal(path) for path, _ in layers],
        branch=None,
        task_norm="stats",
    )
    was_active, was_training = active_patch(model), model.training
    before = _base_tensor_versions(model)
    apply_delta_patch(model, patch_cfg)
    try:
        copies = [(path, layer, layer._modules["delta"][name]) for path, layer in layers]
        moments = {path: _ChannelMoments() for path, _, _ in copies}
        images, batches = _statistics_pass(model, data, copies, moments, max_images)
        _check_every_layer_reached(images, moments)
        _store_statistics(copies, moments, batches)
        if _base_tensor_versions(model) != before:
            changed = [k for k, v in _base_tensor_versions(model).items() if before.get(k) != v]
            raise RuntimeError(f"adapt_norm_stats changed base tensors {changed[:5]}")  # a bug
    except BaseException:
        remove_patch(model, name)
        if was_active is not None:
            set_active_patch(model, was_active)
        model.train(was_training)
        raise
    model.train(was_training)  # the guard puts the patch's copies back in this mode
    set_active_patch(model, name if activate else was_active)
    return name


def _as_batches(model: nn.Module, data, cfg, batch_size: int, max_images: int | None):
    """``data`` as data batches: a folder or image files are read through the test pipeline
    of ``cfg`` (default ``model.cfg``); batches are passed through."""
    if isinstance(data, str | os.PathLike) or (
        isinstance(data, Sequence) and data and all(isinstance(d, str | os.PathLike) for d in data)
    ):
        cfg = cfg if cfg is not None else getattr(model, "cfg", None)
        if cfg is None:
            raise ValueError(
                "adapt_norm_stats: image files need a config to read them with (its test "
                "pipeline): pass cfg=... (models from init_base_model carry theirs)"
            )
        data = unlabelled_loader(cfg, data, batch_size=batch_size, max_images=max_images)
    return data


def _check_every_layer_reached(images: int, moments: dict) -> None:
    """Refuses an empty pass, or one that left a targeted layer without input."""
    if images == 0:
        raise LabelFreeError("no images: the data given to adapt_norm_stats is empty")
    unreached = [path for path, m in moments.items() if m.n == 0]
    if unreached:
        raise LabelFreeError(
            f"{len(unreached)} targeted normalisation layer(s) got no input in the "
            f"forward pass (mode='tensor'), e.g. {unreached[:5]}: leave them out with "
            "exclude=[...]"
        )


def _store_statistics(copies, moments: dict, batches: int) -> None:
    """Writes each layer's input moments into the patch's copy as its running statistics."""
    with torch.no_grad():
        for path, _, branch in copies:
            own = branch.tensors()
            m = moments[path]
            own["running_mean"].copy_(m.mean.to(own["running_mean"].dtype))
            own["running_var"].copy_(m.var().to(own["running_var"].dtype))
            if own.get("num_batches_tracked") is not None:
                own["num_batches_tracked"].fill_(batches)
            branch.clear_cache()


def _statistics_pass(model, data, copies, moments, max_images) -> tuple[int, int]:
    """Runs ``data`` through ``model`` with the patch's norm copies normalising with batch
    statistics, accumulating each targeted layer's input moments; returns (images,
    batches)."""
    model.eval()  # the model's own train(False) and the guard first: base in eval
    for _, _, branch in copies:
        if not isinstance(branch, PatchOwned):
            raise TypeError(f"expected the patch's own norm layer, got {type(branch).__name__}")
        branch.train(True)  # only the copies: batch statistics
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, p=path: moments[p].add(args[0]))
        for path, layer, _ in copies
    ]
    images = batches = 0
    try:
        with torch.no_grad():
            for batch in data:
                n = _batch_size(batch)
                if max_images is not None and images + n > max_images:
                    batch, n = _head(batch, max_images - images), max_images - images
                if n == 0:
                    break
                _run(model, batch)
                images, batches = images + n, batches + 1
                if max_images is not None and images >= max_images:
                    break
    finally:
        for hook in hooks:
            hook.remove()
        for _, _, branch in copies:
            branch.train(False)
    return images, batches
