"""PAINT-style weight interpolation (Ilharco et al., 2022) between the base and a fine-tuned
model: ``θ(α) = (1 − α)·θ_base + α·θ_ft``. α = 0 is the base, α = 1 the fine-tuned model."""

from __future__ import annotations

from collections.abc import Mapping

import torch

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def interpolate(
    base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """The state dict at ``alpha``: floating tensors (weights and BatchNorm statistics)
    interpolated; integer buffers (``num_batches_tracked``) taken from the nearer end.
    Both state dicts must have the same keys and shapes (the fine-tuned model shares the
    base's architecture, heads included)."""
    if base.keys() != finetuned.keys():
        missing = sorted(set(base) ^ set(finetuned))[:5]
        raise ValueError(f"PAINT needs the same state dict keys on both ends; differ: {missing}")
    out = {}
    for key, b in base.items():
        f = finetuned[key]
        if b.shape != f.shape:
            raise ValueError(f"PAINT: {key} has shape {tuple(b.shape)} vs {tuple(f.shape)}")
        if alpha == 0:
            out[key] = b.clone()
        elif alpha == 1:
            out[key] = f.clone()
        elif b.is_floating_point():
            out[key] = torch.lerp(b, f.to(b.dtype), alpha)
        else:
            out[key] = (f if alpha >= 0.5 else b).clone()
    return out
