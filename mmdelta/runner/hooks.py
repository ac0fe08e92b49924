"""``DeltaPatchHook``: guards patched configs and evaluates the base task beside the new one.

* ``before_run``: a config with ``delta_patch`` run by a runner that is not
  :class:`~mmdelta.runner.DeltaRunner` (mmseg's ``tools/test.py`` ignores ``runner_type``)
  would evaluate or train an unpatched model: it stops with a message instead.
* ``after_val_epoch``: with ``base_val_dataloader`` / ``base_val_evaluator`` (the base
  task's own validation set, e.g. COCO val for a COCO→VOC patch), runs it with the patch
  switched off and logs the base-task metric next to the new-task metric, as
  ``val/base/<metric>`` scalars (same log line, same visualiser backends).
"""

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..datasets.paths import check_dataset_paths
from ..patching import delta_disabled
from .model_setup import patch_root


@HOOKS.register_module()
class DeltaPatchHook(Hook):
    """See the module docstring. ``DeltaRunner`` adds one when a config lists none."""

    priority = "NORMAL"  # after RuntimeInfoHook (metrics in the hub), before LoggerHook

    def __init__(self, base_val_dataloader: dict | None = None, base_val_evaluator=None):
        if (base_val_dataloader is None) != (base_val_evaluator is None):
            raise ValueError(
                "DeltaPatchHook: base_val_dataloader and base_val_evaluator go together "
                "(the base task's validation set and its metric)"
            )
        self._loader_cfg, self._evaluator_cfg = base_val_dataloader, base_val_evaluator
        self._loader = self._evaluator = None

    def before_run(self, runner) -> None:
        from .delta_runner import DeltaRunner

        if runner.cfg.get("delta_patch") is not None and not isinstance(runner, DeltaRunner):
            raise RuntimeError(
                "this config has a `delta_patch` key, but it is being run by "
                f"{type(runner).__name__}, which ignores it and would use the unpatched "
                "model. mmseg's tools/test.py ignores `runner_type`: use mmdelta's "
                "`python tools/test.py CONFIG BASE_CHECKPOINT --patch PATCH` (or any tool "
                "that honours runner_type='DeltaRunner' with custom_imports=['mmdelta'])."
            )

    def before_train(self, runner) -> None:
        if self._loader_cfg is not None and isinstance(self._loader_cfg, dict):
            # a missing base val set stops training now, not at the first evaluation
            check_dataset_paths(
                {"base_val_dataloader": self._loader_cfg}, ("base_val_dataloader",), ()
            )

    def after_val_epoch(self, runner, metrics=None) -> None:
        if self._loader_cfg is None:
            return
        if self._loader is None:
            self._loader = runner.build_dataloader(self._loader_cfg)
            self._evaluator = runner.build_evaluator(self._evaluator_cfg)
            self._evaluator.dataset_meta = getattr(self._loader.dataset, "metainfo", None)
        model = runner.model
        model.eval()
        with delta_disabled(patch_root(model)), torch.no_grad():
            for batch in self._loader:
                outputs = model.val_step(batch)
                self._evaluator.process(data_samples=outputs, data_batch=batch)
        base = self._evaluator.evaluate(len(self._loader.dataset))
        for key, value in base.items():
            runner.message_hub.update_scalar(f"val/base/{key}", value)
        runner.logger.info(
            "mmdelta: new task (patch on): "
            + ", ".join(f"{k}: {v:.4f}" for k, v in (metrics or {}).items() if _scalar(v))
            + " | base task (patch off): "
            + ", ".join(f"{k}: {v:.4f}" for k, v in base.items() if _scalar(v))
        )


def _scalar(value) -> bool:
    return isinstance(value, int | float) or (
        isinstance(value, torch.Tensor) and value.numel() == 1
    )
