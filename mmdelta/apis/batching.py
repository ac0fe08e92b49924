"""A batch of images, each with its own patch, on one patched model: the two strategies and
the rule that picks between them (``PatchEngine``'s worker and
``MultiPatchInferencer.predict(images, patches=...)`` both run batches this way).

* ``group``: the batch grouped by patch; each group with its patch active (weight form:
  the base's kernels with folded weights), one image per forward. Every answer is **bit
  for bit** the single-image answer of that patch (the same kernels run).
* ``route``: one forward for the routable part of the batch (per preprocessed image size:
  images are never padded to another's size), each sample with its own patch (:func:`~mmdelta.patching.routed_patches`: each patched layer runs the base once for
  the whole batch and adds each patch's Δ to its own samples). Routable: the base, and
  patches that keep the base's classes and whose every part is an additive per-sample Δ in
  a module whose dim 0 is the image batch (the default low-rank patch on backbone and neck
  / decode head). Answers equal the single-image answers up to float32 batching (tested:
  boxes within 1e-3 px, scores within 1e-4). The rest of the batch runs grouped; a patch
  whose routed forward fails (``NotRoutable``, e.g. a Δ in an RoI head) is grouped from
  then on.
* ``auto``: routes when the routable part holds at least ``route_min_models`` distinct
  models (default 2: one model alone runs grouped, bitwise), else groups.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from ..patching import NotRoutable, active_patch, routed_patches, set_active_patch
from ..patching.state import patch_state

STRATEGIES = ("auto", "group", "route")


class MixedBatchRunner:
    """Runs batches of ``(inputs, patch name | None)`` on ``served.model``.

    ``served`` is a :class:`~mmdelta.apis.serving.MultiPatchInferencer` (its ``model`` and
    ``collate``). Not thread-safe: one caller at a time (``PatchEngine`` has one worker).
    ``stats`` counts batches per strategy and requests.
    """

    def __init__(self, served, strategy: str = "auto", route_min_models: int = 2):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.served, self.strategy = served, strategy
        self.route_min_models = int(route_min_models)
        self.routable: dict[str, bool] = {}  # patch -> can it run routed (False: it failed)
        self.stats: Counter = Counter()

    @property
    def model(self) -> nn.Module:
        return self.served.model

    def run(self, items: list[tuple[dict, str | None]]) -> list[tuple[object, str]]:
        """``(sample, strategy)`` per item, in order: each item's image (pipeline output)
        answered by its patch (``None``: the base)."""
        answers: list = [None] * len(items)
        for routable in self._same_size_groups(items):
            if not self._route_now({items[i][1] for i in routable}, len(routable)):
                continue
            try:
                samples = self.run_routed([items[i] for i in routable])
                for i, sample in zip(routable, samples, strict=True):
                    answers[i] = (sample, "route")
            except NotRoutable:
                self.routable.update((items[i][1], False) for i in routable if items[i][1])
        rest = [i for i, answer in enumerate(answers) if answer is None]
        if rest:
            for i, sample in zip(rest, self.run_grouped([items[i] for i in rest]), strict=True):
                answers[i] = (sample, "group")
        self.stats["requests"] += len(items)
        return answers

    def _same_size_groups(self, items) -> list[list[int]]:
        """Indices of the routable items, by the size of their preprocessed image: a routed
        batch never pads one image to another's size (that would move its answer by more
        than rounding)."""
        groups: dict[tuple, list[int]] = {}
        for i, (inputs, name) in enumerate(items):
            if self.can_route(name):
                groups.setdefault(tuple(inputs["inputs"].shape), []).append(i)
        return list(groups.values())

    def can_route(self, name: str | None) -> bool:
        """Whether ``name``'s samples can share a routed forward (see the module docstring):
        :meth:`~mmdelta.patching.state.PatchState.routable`, decided once per patch (and
        ``False`` once a routed forward of it failed)."""
        if name is None:
            return True
        if name not in self.routable:
            self.routable[name] = patch_state(self.model).routable(self.model, name)
        return self.routable[name]

    def forget(self, name: str) -> None:
        """Drops what is known of patch ``name`` (it was unloaded)."""
        self.routable.pop(name, None)

    def _route_now(self, models: set, size: int) -> bool:
        if self.strategy == "group" or size < 2:
            return False
        return self.strategy == "route" or len(models) >= self.route_min_models

    @torch.no_grad()
    def run_grouped(self, items: list[tuple[dict, str | None]]) -> list:
        """Each item alone with its patch active, grouped by patch (bitwise single-image).
        The last group's patch stays active (its folded weights stay cached for the next
        batch); callers that care restore their selection."""
        samples: list = [None] * len(items)
        active = active_patch(self.model)
        names = sorted(dict.fromkeys(name for _, name in items), key=lambda n: n != active)
        for name in names:  # the active patch first: its folded weights are cached already
            set_active_patch(self.model, name)
            for i, (inputs, asked) in enumerate(items):
                if asked == name:
                    (samples[i],) = self.model.test_step(self.served.collate([inputs]))
        self.stats["batches_grouped"] += 1
        return samples

    @torch.no_grad()
    def run_routed(self, items: list[tuple[dict, str | None]]) -> list:
        """One forward, sample ``i`` with patch ``items[i][1]``; ``NotRoutable`` if not."""
        with routed_patches(self.model, [name for _, name in items]):
            samples = self.model.test_step(self.served.collate([inputs for inputs, _ in items]))
        self.stats["batches_routed"] += 1
        return list(samples)
