"""The real-data configs, run end to end as a user would, on stand-ins of their data and bases.

For each config of ``configs/`` with real data (mmdelta.apps.rehearsal.REHEARSALS): the
project's ``tools/train.py CONFIG`` with ``--cfg-options`` that only point the data roots and
``load_from`` at the stand-ins and shrink image scale and schedule (one epoch of the tiny
data, or two iterations), then ``--resume`` for one more epoch / two more iterations, then
``tools/test.py CONFIG BASE --patch PATCH``, then the fine-tuning twin (one epoch / one
iteration). Dataset wrappers, pipelines, metrics, evaluators, class maps and hooks run as
written. Checked: the runs succeed; the patch file loads onto an independently built base
of the *official checkpoint's own config*; with the patch switched off that base scores the
base task's stand-in test set (COCO / ADE20K) exactly as without the patch, prediction by
prediction; the resumed run continued where the first stopped; the metrics have the keys the
benchmark reads.
"""

import json
import re
import time
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from preloaded_tools import run_tool
from rehearsal_files import base_checkpoint, data_roots

from mmdelta.apis.inference import init_base_model
from mmdelta.apps.benchmark.run import KNOWN_METRICS
from mmdelta.apps.rehearsal import REHEARSALS, keep_every_box, plan, rehearsal_options
from mmdelta.evaluation import evaluate, first_difference
from mmdelta.patching import base_state_dict, delta_disabled, load_patch, read_patch_file
from mmdelta.runner.cli import config_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], cwd: Path, step: str) -> str:
    """The tool of ``command`` in a fresh process (tests/preloaded_tools.py)."""
    start = time.perf_counter()
    code, output = run_tool(command, cwd)
    print(f"{step}: {time.perf_counter() - start:.1f} s")  # (pytest -s shows the split)
    if code != 0:
        raise AssertionError(f"{step} failed ({code}):\n{output[-5000:]}")
    return output


def _base_task_evaluations(r, roots, checkpoint, patch_file):
    """The base task's test set scored by the base (official config, stand-in checkpoint),
    then by the same model with the patch loaded and switched off."""
    cfg = Config.fromfile(config_file(r.base_config))
    options = rehearsal_options(
        cfg, roots[r.base_data], loaders=("test_dataloader",), evaluators=("test_evaluator",)
    )
    options.update(keep_every_box(cfg))  # a random base: there are predictions to compare
    cfg.merge_from_dict(options)
    model = init_base_model(config_file(r.base_config), str(checkpoint), cfg_options=options)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = evaluate(model, cfg)
    name = load_patch(model, str(patch_file))
    with delta_disabled(model):
        off = evaluate(model, cfg)
    after = base_state_dict(model)
    return plain, off, name, before, after


@pytest.mark.parametrize("r", REHEARSALS, ids=lambda r: r.name)
def test_real_config_rehearsal(r, tmp_path, tmp_path_factory):
    roots = data_roots(tmp_path_factory)
    checkpoint = base_checkpoint(tmp_path_factory, r.config)
    p = plan(r, roots, checkpoint, tmp_path)

    # train: the patch file is written, and it is a patch of this base
    log = _run(p.commands["train"], tmp_path, "train")
    assert "mmdelta patch summary" in log
    assert p.patch_file.is_file(), sorted(p.patch_file.parent.iterdir())
    metadata, tensors = read_patch_file(str(p.patch_file))
    assert metadata and tensors
    first_checkpoint = (tmp_path / "delta" / "last_checkpoint").read_text().strip()

    # resume: continues from the first run's last checkpoint to the extended schedule
    log = _run(p.commands["resume"], tmp_path, "resume")
    assert re.search(r"resumed epoch: \d+, iter: \d+", log), log[-3000:]
    resumed_to = (tmp_path / "delta" / "last_checkpoint").read_text().strip()
    assert resumed_to != first_checkpoint
    assert re.search(r"(epoch_2|iter_4)\.pth$", resumed_to), resumed_to

    # test with the patch: the metrics the benchmark reads
    _run(p.commands["test"], tmp_path, "test")
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert any(k in metrics for k in KNOWN_METRICS), metrics

    # the fine-tuning twin trains (upstream behaviour) from the same base
    log = _run(p.commands["twin"], tmp_path, "twin")
    assert re.search(r"Epoch\(train\) \[1\]|Iter\(train\) \[1/1\]", log), log[-3000:]
    twin_imports = (Config.fromfile(str(ROOT / r.twin)).get("custom_imports") or {}).get("imports")
    assert "mmdelta" not in (twin_imports or [])  # plain upstream behaviour

    # the base task, patch off, is the base's own evaluation, prediction by prediction
    plain, off, name, before, after = _base_task_evaluations(r, roots, checkpoint, p.patch_file)
    assert name
    assert first_difference(plain.predictions, off.predictions) is None
    assert plain.metrics == off.metrics
    assert any(k in plain.metrics for k in KNOWN_METRICS), plain.metrics
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
