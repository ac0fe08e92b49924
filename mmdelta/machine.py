"""A description of the machine a measurement ran on (platform, CPUs, threads, versions),
for the records the demo, the benchmark and the measuring tools write."""

from __future__ import annotations

import os
import platform

import torch


def describe_machine() -> dict:
    """``platform``, ``processor``, ``cpus`` (logical CPUs), ``torch_threads``, ``python``
    and ``torch`` versions of the running process's machine."""
    return dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
    )
