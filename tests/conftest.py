"""Suite-wide rules: no network, every test starts from the same random state, and no test may
leave torch's process-wide settings changed (the suite runs in a shuffled order, see "How the
suite runs" in docs/install.md; a test that depended on what ran before it would fail at random)."""

import os
import random

import numpy as np
import pytest
import torch

# no test may reach the network: OpenMMLab would try to fetch checkpoints on init
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: torch threads per test process. Under pytest-xdist two workers share the 2 cores: one
#: thread each (OpenMP threads spin-wait for each other on a busy machine), and the tools the
#: tests start in subprocesses inherit the same through OMP_NUM_THREADS.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end runs (the README's test command runs them too)"
    )
    if config.pluginmanager.hasplugin("randomly"):
        # pytest-randomly shuffles the order (its seed is printed in the header; rerun an
        # order with -p randomly --randomly-seed=N); the per-test seeds are ours, fixed
        config.option.randomly_reset_seed = False


def torch_settings() -> dict:
    """Process-wide torch settings a test could change and a later test would inherit."""
    return {
        "num_threads": torch.get_num_threads(),
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "mkldnn": torch.backends.mkldnn.enabled,
        "anomaly": torch.is_anomaly_enabled(),
    }


def seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Seeds the global generators (torch, numpy, random) before the test's fixtures are set
    up, and again before its body runs (:func:`pytest_runtest_call`): code that draws from
    them, such as a branch's initialisation or ``demo_mm_inputs``' semantic maps, gets the
    same numbers whatever ran before, and whether or not this test was the one that set up a
    module-scoped fixture."""
    seed_everything()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    seed_everything()


@pytest.fixture(autouse=True)
def no_leaked_torch_settings():
    """Fails a test that leaves a process-wide torch setting changed."""
    before = torch_settings()
    yield
    after = torch_settings()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"the test left torch settings changed (before, after): {changed}"


def pytest_terminal_summary(terminalreporter):
    """Prints the zoo walk's table (``tests/test_zoo.py``) when the walk ran."""
    sample, records = None, {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            for key, value in getattr(report, "user_properties", ()):
                if key == "zoo_sample":
                    sample = value
                elif key == "zoo_result":
                    records[value["id"]] = value
    if sample is None:
        return
    import zoo

    configs = [zoo.ZooConfig(**{**c, "features": tuple(c["features"])}) for c in sample["configs"]]
    terminalreporter.write_line(zoo.summary_table(configs, sample["seen"], records))


def pytest_collection_modifyitems(config, items):
    """Slow tests first (a stable sort: pytest-randomly's shuffled order holds within each
    group). pytest-xdist hands the first tests out one by one, so the long end-to-end runs
    start at once on every worker and the quick tests fill in around them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
