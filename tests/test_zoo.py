"""Zoo compatibility walk: the default Δ patch on a deterministic sample of the installed
mmdet 3.3.0 / mmsegmentation 1.2.2 model zoo — the real architectures, randomly initialised
(nothing is downloaded), on two small images.

Per config (:func:`zoo.check`): the unpatched model and an independently built twin (same
seed) must agree bitwise in ``mode='tensor'`` with the patch active (Δ = 0) and inside
``delta_disabled`` (with non-zero Δ); non-zero Δ must change the output; after
``model.train()`` only Δ parameters require grad; ``base_state_dict`` keeps every upstream
key and value, also after a training-mode forward and backward. A config is skipped only
when the unpatched model does not build or run on this machine.

The sample is drawn at collection time (``zoo.sample``); ``test_zoo_summary`` runs last and
prints the table (families, pass / xfail / skip counts with reasons, Δ fraction per family).
"""

import gc

import pytest
import zoo

SAMPLE, LOADED = zoo.sample()
RESULTS: dict[str, zoo.Result] = {}


@pytest.mark.slow
@pytest.mark.parametrize("zc", SAMPLE, ids=[zc.id for zc in SAMPLE])
def test_zoo_config(zc):
    try:
        result = zoo.check(zc)
    except BaseException as err:
        RESULTS[zc.id] = zoo.Result(zc, "fail", reason=zoo.first_line(err))
        raise
    finally:
        gc.collect()  # a patched model holds a reference cycle (its bound train guard)
    RESULTS[zc.id] = result
    if result.status == "skip":
        pytest.skip(result.reason)
    if result.status == "xfail":
        pytest.xfail(result.reason)


@pytest.mark.slow
def test_zoo_summary(capsys):
    with capsys.disabled():
        print(zoo.summary_table(SAMPLE, LOADED, RESULTS))
    # the sample: >= 40 configs, >= 5 per family (or all a family has), every feature
    assert len(SAMPLE) >= 40
    for family, (quota, features) in zoo.FAMILIES.items():
        members = [zc for zc in SAMPLE if zc.family == family]
        assert len(members) >= min(5, quota, LOADED[family]), family
        for feature in features:
            assert any(feature in zc.features for zc in members), (family, feature)
