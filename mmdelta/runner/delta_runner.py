"""``DeltaRunner``: an MMEngine runner that trains, tests and resumes Δ-patches.

Selected with ``runner_type = "DeltaRunner"`` (mmdet's and mmseg's ``tools/train.py``,
mmdet's ``tools/test.py``) and always used by mmdelta's ``tools/train.py`` / ``tools/test.py``.
A config without ``delta_patch`` (and without a patch file) runs exactly as with
mmengine's ``Runner``, plus three fixes that only turn failures into working runs: the
weights-only checkpoint policy (:mod:`.checkpoint`), CPU distributed training (``gloo``, no
``device_ids``) and the fp32 fallback for ``AmpOptimWrapper`` without a GPU.

With ``delta_patch`` the model is built in this order, all inside :meth:`build_model`, i.e.
before DDP wrapping and before the optimiser exists:

1. build; SyncBN → BN where it would be reverted later anyway (so nothing the patch
   attaches to a norm layer is replaced afterwards);
2. base weights: ``init_weights()`` (``Pretrained`` initialisers were nulled when a
   checkpoint replaces them), then ``load_from``, checked key by key
   (:func:`.checkpoint.load_base_state`); on ``resume`` the checkpoint restores everything
   later instead;
3. the patch: ``apply_delta_patch(model, cfg.delta_patch)`` — or ``load_patch`` of
   ``cfg.delta_patch_file`` (``tools/test.py --patch``), which overrides Δ tensors in the
   checkpoint; Δ tensors in ``load_from`` (a training checkpoint) are loaded into the patch.

``init_weights`` is never called again (``_init_model_weights`` is a no-op): mmengine's
``train()`` would otherwise re-initialise the base after it was loaded.

Evaluation (``val()`` / ``test()``) runs the patch when its tensors came from a patch file or
the checkpoint, and the base exactly otherwise (a zero Δ patch is switched off, so the
numbers are the base's by construction). Every checkpoint gets the patch file beside it
(``iter_8.pth`` → ``iter_8.patch.safetensors``), and the end of training writes
``<work_dir>/<patch name>.patch.safetensors``.
"""

import copy
import datetime
import glob
import os
import os.path as osp
import re

import torch
from mmengine.dist import is_distributed, master_only
from mmengine.model import convert_sync_batchnorm, revert_sync_batchnorm
from mmengine.registry import MODEL_WRAPPERS, RUNNERS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint_to_model
from torch import nn

from ..datasets.paths import check_dataset_paths
from ..exactness import key_mismatch
from ..patching import (
    active_patch,
    apply_delta_patch,
    load_patch,
    patch_names,
    save_patch,
    set_active_patch,
)
from .checkpoint import CheckpointError, load_patch_state, read_checkpoint, state_dict_of
from .model_setup import load_base_checkpoint, null_pretrained, patch_root

#: top-level config key naming a patch file to evaluate (set by ``tools/test.py --patch``)
PATCH_FILE_KEY = "delta_patch_file"


def _mb(size: int) -> str:
    return f"{size / 2**20:.2f} MB"


@RUNNERS.register_module()
class DeltaRunner(Runner):
    """mmengine ``Runner`` that builds the ``delta_patch`` into the model (see module doc)."""

    # ----------------------------------------------------------------- environment
    @property
    def delta_mode(self) -> bool:
        """Whether this run carries a patch (``delta_patch`` key or a patch file)."""
        return self.cfg.get("delta_patch") is not None or bool(self.cfg.get(PATCH_FILE_KEY))

    def setup_env(self, env_cfg: dict) -> None:
        if self.distributed and not torch.cuda.is_available() and not is_distributed():
            # mmengine's init_dist calls torch.cuda.set_device and the configs ask for nccl
            dist_cfg = dict(env_cfg.get("dist_cfg") or {})
            self._cpu_notes = [
                f"no GPU: distributed backend {dist_cfg.get('backend', 'nccl')!r} -> 'gloo', "
                f"launcher {self.launcher!r}"
            ]
            if self.launcher != "pytorch":
                raise RuntimeError(
                    f"CPU distributed training supports launcher='pytorch' (torchrun), not "
                    f"{self.launcher!r}"
                )
            timeout = dist_cfg.get("timeout")
            torch.distributed.init_process_group(
                backend="gloo",
                **({"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}),
            )
        super().setup_env(env_cfg)

    def wrap_model(self, model_wrapper_cfg, model: nn.Module):
        if not self.distributed or torch.cuda.is_available():
            return super().wrap_model(model_wrapper_cfg, model)
        # CPU DDP: mmengine passes device_ids=[LOCAL_RANK], which DDP rejects for CPU modules
        wrapper_cfg = dict(model_wrapper_cfg or {})
        wrapper_cfg.setdefault("type", "MMDistributedDataParallel")
        wrapper_cfg.setdefault("broadcast_buffers", False)
        wrapper_cfg.setdefault(
            "find_unused_parameters", self.cfg.get("find_unused_parameters", False)
        )
        return MODEL_WRAPPERS.build(wrapper_cfg, default_args=dict(module=model))

    def build_optim_wrapper(self, optim_wrapper):
        if (
            isinstance(optim_wrapper, dict)
            and str(optim_wrapper.get("type", "")).split(".")[-1] == "AmpOptimWrapper"
            and not torch.cuda.is_available()
        ):
            optim_wrapper = {
                k: v
                for k, v in optim_wrapper.items()
                if k not in ("loss_scale", "dtype", "use_fsdp")
            }
            optim_wrapper["type"] = "OptimWrapper"
            self.logger.info(
                "mmdelta: AmpOptimWrapper needs a GPU; training in fp32 with OptimWrapper"
            )
        return super().build_optim_wrapper(optim_wrapper)

    # ----------------------------------------------------------------- the model
    def build_model(self, model) -> nn.Module:
        for note in getattr(self, "_cpu_notes", []):
            self.logger.info(f"mmdelta: {note}")
        if not self.delta_mode:
            return super().build_model(model)
        nulled = []
        if isinstance(model, dict) and (self._load_from or self._resume):
            model = copy.deepcopy(model)
            nulled = null_pretrained(model)
        model = super().build_model(model)
        if nulled:
            self.logger.info(
                "mmdelta: the base checkpoint replaces these Pretrained initialisers, so they "
                f"were dropped (nothing is downloaded): {', '.join(nulled)}"
            )
        model = self._normalise_sync_bn(model)
        root = patch_root(model)
        delta_state = {}
        if not self._resume:
            if hasattr(model, "init_weights"):
                model.init_weights()
            if self._load_from:
                delta_state = self._load_base(root, self._load_from)
                self._has_loaded = True
        elif not self._load_from and not osp.exists(osp.join(self.work_dir, "last_checkpoint")):
            raise CheckpointError(
                f"resume is set but {self.work_dir} has no checkpoint to resume from (no "
                "'last_checkpoint' file), and with resume the base is not loaded from "
                "load_from: start the run without --resume"
            )
        self._eval_patch = None
        self.patch_summary = None  # PatchSummary of the patch this run builds
        self._checkpoint_dirs: set[str] = set()  # where patch files sit beside checkpoints
        patch_file = self.cfg.get(PATCH_FILE_KEY)
        if patch_file:
            if delta_state:
                self.logger.info(
                    f"mmdelta: {len(delta_state)} Δ tensors in {self._load_from} are ignored: "
                    f"the patch comes from {patch_file}"
                )
            self._eval_patch = load_patch(root, patch_file)
            self.logger.info(f"mmdelta: loaded patch {self._eval_patch!r} from {patch_file}")
        else:
            summary = apply_delta_patch(root, self.cfg.delta_patch)
            self.patch_summary = summary
            self.logger.info(f"mmdelta patch summary:\n{summary}")
            if delta_state:
                load_patch_state(root, active_patch(root), delta_state, str(self._load_from))
                self._eval_patch = active_patch(root)
                self.logger.info(
                    f"mmdelta: patch {self._eval_patch!r} restored from {self._load_from}"
                )
        self._delta_name = active_patch(root)
        return model

    def _normalise_sync_bn(self, model: nn.Module) -> nn.Module:
        """SyncBN conversions happen before the patch attaches to any norm layer."""
        sync_bn = self.cfg.get("sync_bn")
        if self.distributed and torch.cuda.is_available():
            if sync_bn is not None:
                model = convert_sync_batchnorm(model, sync_bn)
                self.cfg.sync_bn = None  # done: wrap_model must not replace the layers again
            return model
        return revert_sync_batchnorm(model)

    def _load_base(self, root: nn.Module, filename: str) -> dict:
        """Loads the base part of ``filename`` into ``root``; returns its Δ entries."""
        patch_cfg = None if self.cfg.get(PATCH_FILE_KEY) else self.cfg.get("delta_patch")
        # (no hooks exist yet to see the checkpoint)
        delta, meta = load_base_checkpoint(root, filename, patch_cfg, self.logger)
        if meta is not None and getattr(root, "dataset_meta", None) is None:
            root.dataset_meta = meta
        self.logger.info(f"mmdelta: base weights loaded from {filename} (every key checked)")
        return delta

    def _init_model_weights(self) -> None:
        if not self.delta_mode:
            return super()._init_model_weights()
        # the base was initialised (and loaded) before the patch was built: running
        # init_weights now would re-initialise it

    # ----------------------------------------------------------------- checkpoints
    def load_checkpoint(self, filename, map_location="cpu", strict=False, revise_keys=None):
        revise_keys = revise_keys or [(r"^module\.", "")]
        checkpoint = read_checkpoint(filename, map_location=map_location)
        self.call_hook("after_load_checkpoint", checkpoint=checkpoint)
        model = self.model.module if hasattr(self.model, "module") else self.model
        if self.delta_mode:
            # a resume: the checkpoint must hold this patched model, every key of it
            state = state_dict_of(checkpoint)
            mismatch = key_mismatch(model.state_dict(), state)
            if mismatch:
                raise CheckpointError(
                    f"cannot resume from {filename}: it is not a checkpoint of this patched "
                    f"model ({mismatch})"
                )
            strict = True
        checkpoint = _load_checkpoint_to_model(model, checkpoint, strict, revise_keys=revise_keys)
        self._has_loaded = True
        self.logger.info(f"Load checkpoint from {filename}")
        return checkpoint

    @master_only
    def save_checkpoint(self, out_dir, filename, *args, **kwargs):
        super().save_checkpoint(out_dir, filename, *args, **kwargs)
        if not self.delta_mode:
            return
        full = osp.join(out_dir, filename)
        stem = filename[: -len(".pth")] if filename.endswith(".pth") else filename
        self._write_patch(osp.join(out_dir, f"{stem}.patch.safetensors"), full)
        self._checkpoint_dirs.add(out_dir)
        self._drop_orphan_patches()

    def _drop_orphan_patches(self) -> None:
        """CheckpointHook(max_keep_ckpts) deletes old checkpoints: their patch files follow."""
        for out_dir in self._checkpoint_dirs:
            for patch in glob.glob(osp.join(glob.escape(out_dir), "*.patch.safetensors")):
                stem = osp.basename(patch)[: -len(".patch.safetensors")]
                if re.fullmatch(r"(iter|epoch)_\d+", stem) and not osp.exists(
                    osp.join(out_dir, f"{stem}.pth")
                ):
                    os.remove(patch)

    def _write_patch(self, path: str, full_checkpoint: str | None = None) -> None:
        root = patch_root(self.model)
        save_patch(root, path, name=self._delta_name, overwrite=True)
        size = os.path.getsize(path)
        line = f"mmdelta: patch file {path}: {_mb(size)}"
        if full_checkpoint and osp.exists(full_checkpoint):
            total = os.path.getsize(full_checkpoint)
            line += f" = {100 * size / total:.2f} % of the full checkpoint ({_mb(total)})"
        self.logger.info(line)

    # ----------------------------------------------------------------- entry points
    def _check_data(self, *loaders: str) -> None:
        check_dataset_paths(self.cfg, loaders)

    def train(self) -> nn.Module:
        self._check_data("train_dataloader", "val_dataloader")
        if self.delta_mode:
            set_active_patch(patch_root(self.model), self._delta_name)
        model = super().train()
        if self.delta_mode:
            self._final_patch()
        return model

    @property
    def final_patch_file(self) -> str:
        """Where ``train()`` writes the trained patch: ``<work_dir>/<name>.patch.safetensors``."""
        return osp.join(self.work_dir, f"{self._delta_name}.patch.safetensors")

    @master_only
    def _final_patch(self) -> None:
        self._drop_orphan_patches()
        self._write_patch(self.final_patch_file)

    def _select_for_eval(self) -> None:
        if not self.delta_mode:
            return
        root = patch_root(self.model)
        set_active_patch(root, self._eval_patch)
        if self._eval_patch is None:
            self.logger.info(
                f"mmdelta: no trained patch given (patches: {patch_names(root)}): evaluating "
                "the base model exactly; pass --patch PATCH.safetensors to evaluate a patch"
            )
        else:
            self.logger.info(f"mmdelta: evaluating with patch {self._eval_patch!r}")

    def val(self) -> dict:
        self._check_data("val_dataloader")
        self._select_for_eval()
        return super().val()

    def test(self) -> dict:
        self._check_data("test_dataloader")
        self._select_for_eval()
        return super().test()

    def register_custom_hooks(self, hooks) -> None:
        """The config's hooks, plus ``DeltaPatchHook`` and ``RandomStateHook`` (bitwise
        resume) for a patch run unless the config lists them."""
        hooks = list(hooks or [])
        listed = {h.get("type") if isinstance(h, dict) else type(h).__name__ for h in hooks}
        if self.delta_mode:
            hooks += [
                dict(type=t) for t in ("DeltaPatchHook", "RandomStateHook") if t not in listed
            ]
        super().register_custom_hooks(hooks)
