"""The benchmark: Δ-Patching against full fine-tuning, head-only, norm-only, LoRA-conv and
PAINT weight interpolation, on one task from one base (``tools/benchmark.py``)."""

from .methods import BenchmarkError, Method, comparison_methods, method_config
from .paint import ALPHAS, interpolate
from .run import Options, Setting, run_benchmark

__all__ = [
    "ALPHAS",
    "BenchmarkError",
    "Method",
    "Options",
    "Setting",
    "comparison_methods",
    "interpolate",
    "method_config",
    "run_benchmark",
]
