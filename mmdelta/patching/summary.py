"""What a patch adds to a model, in numbers (returned and logged by ``apply_delta_patch``)."""

from collections import OrderedDict
from dataclasses import asdict, dataclass, field

from torch import nn

from .targets import base_modules, stage_of


@dataclass
class PatchedLayer:
    path: str
    stage: str
    layer_type: str
    form: str
    rank: int  # LowRankDelta rank, BlockDelta width, 0 for other types
    base_params: int  # parameters of the frozen layer (weight and bias)
    delta_params: int


@dataclass
class PatchSummary:
    """Numbers of one patch on one model.

    * ``delta_fraction`` = Δ parameters / base parameters of the patched layers;
    * ``patch_fraction`` = everything the patch trains or owns / all base parameters.
    """

    name: str
    branch: dict
    layers: list[PatchedLayer]
    base_params: int  # all parameters of the base model
    owned: list[PatchedLayer] = field(default_factory=list)  # patch-owned layers
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # (path, layer type)
    classes: list[str] | None = None  # the patch's own class names, if it has them

    @property
    def owned_params(self) -> int:
        """Parameters of the patch's own copies of layers (heads, task norms)."""
        return sum(layer.delta_params for layer in self.owned)

    @property
    def delta_params(self) -> int:
        return sum(layer.delta_params for layer in self.layers)

    @property
    def targeted_params(self) -> int:
        return sum(layer.base_params for layer in self.layers)

    @property
    def delta_fraction(self) -> float:
        return self.delta_params / max(self.targeted_params, 1)

    @property
    def patch_fraction(self) -> float:
        return (self.delta_params + self.owned_params) / max(self.base_params, 1)

    def stages(self) -> "OrderedDict[str, dict]":
        """Per stage: ``layers`` patched, their ``base_params`` and ``delta_params``."""
        stages: OrderedDict[str, dict] = OrderedDict()
        for layer in self.layers:
            row = stages.setdefault(layer.stage, dict(layers=0, base_params=0, delta_params=0))
            row["layers"] += 1
            row["base_params"] += layer.base_params
            row["delta_params"] += layer.delta_params
        return stages

    def line(self) -> str:
        """One ``print_trainable_parameters``-style line."""
        owned = (
            f" | owned {len(self.owned)} layers, {self.owned_params:,} params" if self.owned else ""
        )
        classes = f" | {len(self.classes)} classes" if self.classes else ""
        return (
            f"mmdelta patch {self.name!r}: {len(self.layers)} layers | "
            f"Δ params {self.delta_params:,} | Δ fraction {100 * self.delta_fraction:.2f}% "
            f"(of {self.targeted_params:,} in patched layers){owned}{classes} | patch fraction "
            f"{100 * self.patch_fraction:.2f}% (of {self.base_params:,} base params)"
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            owned_params=self.owned_params,
            delta_params=self.delta_params,
            targeted_params=self.targeted_params,
            delta_fraction=self.delta_fraction,
            patch_fraction=self.patch_fraction,
            stages=dict(self.stages()),
        )
        return out

    def __str__(self) -> str:
        rows = [f"{'stage':<34}{'layers':>7}{'base params':>14}{'Δ params':>12}{'Δ %':>8}"]
        for stage, row in self.stages().items():
            pct = 100 * row["delta_params"] / max(row["base_params"], 1)
            rows.append(
                f"{stage:<34}{row['layers']:>7}{row['base_params']:>14,}"
                f"{row['delta_params']:>12,}{pct:>7.2f}%"
            )
        for layer in self.owned:
            rows.append(f"owned {layer.path} ({layer.layer_type}): {layer.delta_params:,} params")
        for path, reason in self.skipped:
            rows.append(f"skipped {path}: {reason}")
        for path, layer_type in self.unsupported:
            rows.append(f"not patched {path}: no Δ branch type supports {layer_type}")
        rows.append(self.line())
        return "\n".join(rows)


def count_base_params(model: nn.Module) -> int:
    return sum(p.numel() for _, m in base_modules(model) for p in m.parameters(recurse=False))


def describe_layer(model: nn.Module, path: str, layer: nn.Module, branch: nn.Module):
    return PatchedLayer(
        path=path,
        stage=stage_of(model, path),
        layer_type=type(layer).__name__,
        form=getattr(branch, "form", type(branch).__name__),
        rank=getattr(branch, "rank", getattr(branch, "width", 0)),
        base_params=count_base_params(layer),
        delta_params=sum(p.numel() for p in branch.parameters()),
    )
