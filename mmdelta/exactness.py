"""Bitwise comparison of OpenMMLab model outputs (the check behind "patch off == base"),
and of the keys two state dicts hold."""

from collections.abc import Iterable

import torch
from torch import nn


def flat_tensors(out) -> list[torch.Tensor]:
    """Every tensor in a nested tuple / list / dict of model outputs, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in flat_tensors(item)]
    return []


@torch.no_grad()
def tensor_outputs(model: nn.Module, batch: dict) -> list[torch.Tensor]:
    """``model(..., mode='tensor')`` on a raw OpenMMLab batch, in eval mode, flattened."""
    model.eval()
    return flat_tensors(model(**model.data_preprocessor(batch, False), mode="tensor"))


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Same number of tensors, each with the same shape and bitwise the same values."""
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True)
    )


def key_mismatch(expected: Iterable[str], found: Iterable[str], shown: int = 5) -> str | None:
    """``None`` when ``found`` holds exactly the ``expected`` keys, else a message part:
    ``"missing N [first keys], unexpected M [first keys]"`` (sorted, ``shown`` of each)."""
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if not missing and not unexpected:
        return None
    return (
        f"missing {len(missing)} {missing[:shown]}, unexpected {len(unexpected)} "
        f"{unexpected[:shown]}"
    )
