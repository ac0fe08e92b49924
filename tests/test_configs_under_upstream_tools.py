"""Every config in ``configs/`` that carries ``delta_patch``, run by mmdet's / mmseg's own tools.

A user who has mmdet or mmseg checked out runs ``python tools/train.py CONFIG`` with
*upstream's* script, not mmdelta's. Those scripts build ``Runner.from_cfg(cfg)`` unless the
config names a ``runner_type``; a config that has ``delta_patch`` but no ``runner_type`` /
``custom_imports`` would then train every base weight (the quickcheck config did). Here the
upstream scripts themselves (from the installed wheels' ``.mim/tools/``) run each config up
to the point where training or testing would start:

* ``train.py``: the runner it builds must train only the patch: every parameter that
  requires grad lies inside a Δ slot, and there is at least one;
* mmseg's ``test.py`` (which ignores ``runner_type``): the run must stop before evaluating an
  unpatched model (``DeltaPatchHook.before_run``).
"""

import runpy
import sys
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.runner import Runner
from rehearsal_files import base_checkpoint

import mmdelta  # noqa: F401  (the configs' custom_imports; registers DeltaRunner)
from mmdelta.patching.slot import DELTA_SEGMENT
from mmdelta.runner import DeltaRunner

ROOT = Path(__file__).resolve().parents[1]
PATCHED_CONFIGS = sorted(
    str(p.relative_to(ROOT))
    for p in (ROOT / "configs").rglob("*.py")
    if Config.fromfile(str(p)).get("delta_patch") is not None  # its own or inherited
)


class _Stop(Exception):
    """Raised in place of training / testing once the runner has been built."""


def _upstream_tool(scope: str, name: str) -> Path:
    package = {"mmdet": "mmdet", "mmseg": "mmseg"}[scope]
    module = __import__(package)
    return Path(module.__file__).parent / ".mim" / "tools" / name


def _scope(config: str) -> str:
    return Config.fromfile(str(ROOT / config)).default_scope


def _run_upstream(tool: Path, argv: list[str], monkeypatch, method: str) -> Runner:
    """Run ``tool`` (an upstream script) as ``__main__`` with ``argv``; ``Runner.<method>``
    is replaced by a probe that records the runner and stops."""
    seen = {}

    def probe(self):
        seen["runner"] = self
        if method == "test":
            self.call_hook("before_run")  # what Runner.test() does first
        raise _Stop

    monkeypatch.setattr(Runner, method, probe)
    monkeypatch.setattr(DeltaRunner, method, probe)
    monkeypatch.setattr(sys, "argv", [str(tool), *argv])
    with pytest.raises(_Stop):
        runpy.run_path(str(tool), run_name="__main__")
    return seen["runner"]


def test_the_walk_finds_the_patched_configs():
    assert "configs/delta_faster_rcnn_voc.py" in PATCHED_CONFIGS
    assert "configs/demo/quickcheck_faster-rcnn_r18_fpn_tiny.py" in PATCHED_CONFIGS
    assert not any("finetune_" in c or c.endswith("_base.py") for c in PATCHED_CONFIGS)
    assert len(PATCHED_CONFIGS) == 10, PATCHED_CONFIGS


@pytest.mark.parametrize("config", PATCHED_CONFIGS)
def test_upstream_train_trains_only_the_patch(config, tmp_path, tmp_path_factory, monkeypatch):
    cfg = Config.fromfile(str(ROOT / config))
    assert cfg.get("runner_type") == "DeltaRunner", f"{config}: no runner_type='DeltaRunner'"
    assert "mmdelta" in cfg.get("custom_imports", {}).get("imports", []), config
    assert any(h.get("type") == "DeltaPatchHook" for h in cfg.get("custom_hooks", [])), config

    tool = _upstream_tool(cfg.default_scope, "train.py")
    base = base_checkpoint(tmp_path_factory, config)  # random weights, the official layout
    argv = [str(ROOT / config), "--work-dir", str(tmp_path), "--cfg-options", f"load_from={base}"]
    runner = _run_upstream(tool, argv, monkeypatch, "train")
    assert isinstance(runner, DeltaRunner)
    trainable = [n for n, p in runner.model.named_parameters() if p.requires_grad]
    assert trainable, f"{config}: nothing trains"
    frozen_base = [n for n in trainable if DELTA_SEGMENT not in n]
    assert not frozen_base, f"{config}: base parameters would train: {frozen_base[:5]}"


@pytest.mark.parametrize("config", [c for c in PATCHED_CONFIGS if _scope(c) == "mmseg"])
def test_mmseg_test_tool_stops_instead_of_testing_an_unpatched_model(config, tmp_path, monkeypatch):
    tool = _upstream_tool("mmseg", "test.py")
    checkpoint = tmp_path / "base.pth"
    checkpoint.write_bytes(b"")  # never read: the run stops first
    with pytest.raises(RuntimeError, match="ignores `runner_type`"):
        _run_upstream(
            tool,
            [str(ROOT / config), str(checkpoint), "--work-dir", str(tmp_path)],
            monkeypatch,
            "test",
        )
