"""Zoo compatibility walk: the default Δ patch on a deterministic sample of the installed
mmdet 3.3.0 / mmsegmentation 1.2.2 model zoo — the real architectures, randomly initialised
(nothing is downloaded), on two small images.

Per config (:func:`zoo.check`): the unpatched model and a deep copy of it (the twin that is
patched) must agree bitwise in ``mode='tensor'`` with the patch active (Δ = 0) and inside
``delta_disabled`` (with non-zero Δ); non-zero Δ must change the output; after
``model.train()`` only Δ parameters require grad; ``base_state_dict`` keeps every upstream
key and value, also after a training-mode forward and backward. A config is skipped only
when the unpatched model does not build or run on this machine.

The sample is drawn at collection time (``zoo.sample``). The end of the run prints the table
(families, pass / xfail / skip counts with reasons, Δ fraction per family) from what each
test records (``conftest.py``; under pytest-xdist the records travel with the reports).
"""

import dataclasses
import gc

import pytest
import zoo

SAMPLE, LOADED = zoo.sample()


@pytest.mark.slow
@pytest.mark.parametrize("zc", SAMPLE, ids=[zc.id for zc in SAMPLE])
def test_zoo_config(zc, record_property):
    try:
        result = zoo.check(zc)
    except BaseException as err:
        record_property(
            "zoo_result", zoo.record(zoo.Result(zc, "fail", reason=zoo.first_line(err)))
        )
        raise
    finally:
        gc.collect()  # a patched model holds a reference cycle (its bound train guard)
    record_property("zoo_result", zoo.record(result))
    if result.status == "skip":
        pytest.skip(result.reason)
    if result.status == "xfail":
        pytest.xfail(result.reason)


@pytest.mark.slow
def test_zoo_summary(record_property):
    # the sample: >= 40 configs, >= 5 per family (or all a family has), every feature
    assert len(SAMPLE) >= 40
    for family, (quota, features) in zoo.FAMILIES.items():
        members = [zc for zc in SAMPLE if zc.family == family]
        assert len(members) >= min(5, quota, LOADED[family]), family
        for feature in features:
            assert any(feature in zc.features for zc in members), (family, feature)
    # the table is printed at the end of the run (conftest.py), from every worker's results
    record_property(
        "zoo_sample", dict(configs=[dataclasses.asdict(zc) for zc in SAMPLE], seen=LOADED)
    )
