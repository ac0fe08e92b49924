"""PatchEngine: concurrent requests, each with its own patch, never see another's patch.

Every answer is checked against the single-image answer of the requested model: bit for
bit when the batch ran grouped (the same kernels run), within float32 batching tolerance
when it ran routed (one forward, each sample with its own Δ). Plus per-sample routing on a
real mmseg model, and patches loaded and unloaded while the engine serves.
"""

import random
import threading

import cv2
import pytest
import torch
from mm_models import build_model, make_batch, tensor_outputs
from serving_fixtures import det_fixture, single_image_answer

from mmdelta import NotRoutable, PatchFileError, apply_delta_patch, routed_patches, set_active_patch
from mmdelta.apis.engine import PatchEngine, UnknownPatchError
from mmdelta.apis.serving import ServingError
from mmdelta.patching.slot import iter_slots

MODELS_SERVED = [None, "shift", "newcls"]
#: routed answers: boxes (pixels) and scores may differ by float32 batching, nothing else
BOX_TOL, SCORE_TOL = 1e-3, 1e-4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    fixture = det_fixture(tmp_path_factory.mktemp("engine"), n_images=5)
    fixture["arrays"] = [cv2.imread(str(p)) for p in sorted(fixture["images"].iterdir())]
    return fixture


def engine_for(world, **options) -> PatchEngine:
    options.setdefault("max_wait_ms", 30)
    return PatchEngine(world["config"], world["base"], [world["shift"], world["new"]], **options)


def references(engine: PatchEngine, arrays) -> dict:
    """Single-image answers of every served model (computed while the worker is idle)."""
    return {
        name: [single_image_answer(engine.served, a, name) for a in arrays]
        for name in MODELS_SERVED
    }


def concurrent_requests(engine, arrays, threads=6, per_thread=8, seed=0):
    """``threads`` callers, each submitting ``per_thread`` random (image, model) requests at
    once; returns ``[(image index, model, prediction)]``."""
    results, lock = [], threading.Lock()

    def caller(k):
        rng = random.Random(seed * 100 + k)
        asks = [(rng.randrange(len(arrays)), rng.choice(MODELS_SERVED)) for _ in range(per_thread)]
        futures = [(i, m, engine.submit(arrays[i], m)) for i, m in asks]
        answers = [(i, m, f.result(timeout=300)) for i, m, f in futures]
        with lock:
            results.extend(answers)

    workers = [threading.Thread(target=caller, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return results


def mismatch(expected, got, exact: bool) -> str | None:
    e, g = expected.pred_instances, got.pred_instances
    if e.bboxes.shape != g.bboxes.shape or not torch.equal(e.labels, g.labels):
        return f"{len(e.bboxes)} vs {len(g.bboxes)} boxes / labels differ"
    if exact:
        same = torch.equal(e.bboxes, g.bboxes) and torch.equal(e.scores, g.scores)
        return None if same else "not bitwise"
    box = (e.bboxes - g.bboxes).abs().max().item() if len(e.bboxes) else 0.0
    score = (e.scores - g.scores).abs().max().item() if len(e.scores) else 0.0
    return None if box <= BOX_TOL and score <= SCORE_TOL else f"box {box:g}, score {score:g}"


def test_grouped_answers_are_the_single_image_answers_bit_for_bit(world):
    with engine_for(world, strategy="group") as engine:
        expected = references(engine, world["arrays"])
        results = concurrent_requests(engine, world["arrays"])
        assert engine.health()["requests"] == len(results) == 48
        assert engine.health().get("batches_grouped", 0) < 48  # requests were batched
    bad = [
        (i, m, why)
        for i, m, p in results
        if (why := mismatch(expected[m][i], p.sample, exact=True)) is not None
    ]
    assert not bad, f"{len(bad)} mismatches: {bad[:5]}"
    for _, m, p in results:
        assert p.patch == m and p.strategy == "group"
        assert p.classes == (("triangle", "ring", "cross", "star") if m == "newcls" else p.classes)
        assert list(p.summary["label_names"]) == [p.classes[k] for k in p.summary["labels"]]


def test_routed_answers_match_within_batching_tolerance(world):
    with engine_for(world, strategy="route") as engine:
        expected = references(engine, world["arrays"])
        results = concurrent_requests(engine, world["arrays"], seed=1)
        stats = engine.health()
    assert stats.get("batches_routed", 0) > 0, stats
    strategies = {m: {p.strategy for _, mm, p in results if mm == m} for m in MODELS_SERVED}
    assert strategies["newcls"] == {"group"}  # its own classes: its own head, never routed
    bad = [
        (i, m, p.strategy, why)
        for i, m, p in results
        if (why := mismatch(expected[m][i], p.sample, exact=p.strategy == "group")) is not None
    ]
    assert not bad, f"{len(bad)} mismatches: {bad[:5]}"


def test_routing_gives_each_sample_its_own_patch():
    """One forward of a real mmseg model over a batch, sample i with routes[i]: each row is
    that patch's output for the sample alone (float32 batching tolerance)."""
    model = build_model("deeplabv3_r18_v1c")
    for name in ("a", "b"):
        apply_delta_patch(model, dict(name=name))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, slot in iter_slots(model):
            for part in slot.values():
                for p in part.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
    batch = make_batch("deeplabv3_r18_v1c", size=32)
    routes = ["b", None]
    with routed_patches(model, routes):
        (routed,) = tensor_outputs(model, batch)
    for i, name in enumerate(routes):
        set_active_patch(model, name)
        (alone,) = tensor_outputs(model, {k: [v[i]] for k, v in batch.items()})
        scale = alone.abs().max().item()
        assert (routed[i] - alone[0]).abs().max().item() <= 1e-5 * scale, name
    set_active_patch(model, "a")
    assert not torch.allclose(tensor_outputs(model, batch)[0][0], routed[0])  # b is not a


def test_what_cannot_be_routed_says_so():
    model = build_model("faster_rcnn_r50_fpn")
    model.rpn_head.test_cfg.max_per_img = 16
    apply_delta_patch(model, dict(name="heads", targets=["roi_head"]))  # RoIs, not images
    apply_delta_patch(model, dict(name="own", classes=["x", "y"], base_classes=None))
    batch = make_batch("faster_rcnn_r50_fpn", size=32)
    with pytest.raises(NotRoutable, match="dim 0 is not the batch of 2 images"):
        with routed_patches(model, ["heads", None]):
            tensor_outputs(model, batch)
    with pytest.raises(NotRoutable, match="its own class set"):
        with routed_patches(model, ["own", None]):
            pass
    assert all(slot.routes is None for _, slot in iter_slots(model))  # restored on error


def test_patches_load_and_unload_while_serving(world, tmp_path):
    with PatchEngine(world["config"], world["base"], [world["shift"]], max_wait_ms=5) as engine:
        image = world["arrays"][0]
        with pytest.raises(UnknownPatchError, match="no patch 'newcls' is loaded"):
            engine.submit(image, "newcls")
        entry = engine.load_patch("newcls", world["new"])
        assert entry["own_classes"] and entry["classes"] == ["triangle", "ring", "cross", "star"]
        assert engine.submit(image, "newcls").result().classes == tuple(entry["classes"])

        before = engine.patches()
        corrupt = tmp_path / "corrupt.safetensors"
        corrupt.write_bytes(world["shift"].read_bytes()[:100])
        for path, error in ((corrupt, PatchFileError), (world["foreign"], PatchFileError)):
            with pytest.raises(error):
                engine.load_patch("bad", path)
        with pytest.raises(ServingError, match="loaded already"):
            engine.load_patch("shift", world["new"])
        assert engine.patches() == before
        assert engine.submit(image, "shift").result().patch == "shift"  # still serving

        engine.unload_patch("newcls")
        with pytest.raises(UnknownPatchError):
            engine.unload_patch("newcls")
        assert sorted(engine.patches()) == ["shift"]
        with pytest.raises(UnknownPatchError):
            engine.submit(image, "newcls")


def test_multi_patch_inferencer_predicts_each_image_with_its_own_patch(world):
    from mmdelta.apis import MultiPatchInferencer

    served = MultiPatchInferencer(world["config"], world["base"], [world["shift"], world["new"]])
    paths = sorted(world["images"].iterdir())
    asked = ["newcls", None, "shift", "shift", None]
    expected = [single_image_answer(served, p, m) for p, m in zip(paths, asked, strict=True)]
    for strategy in ("group", "auto"):
        got = served.predict(paths, patches=asked, strategy=strategy)
        exact = strategy == "group"
        bad = [
            (i, why)
            for i, (e, g) in enumerate(zip(expected, got, strict=True))
            if (why := mismatch(e, g, exact=exact or asked[i] == "newcls")) is not None
        ]
        assert not bad, (strategy, bad)
    with pytest.raises(ServingError, match="no patch \\['night'\\] is loaded"):
        served.predict(paths[:1], patches=["night"])


def test_routed_batches_never_pad_an_image_to_another_size(world):
    """Images of two sizes in one batch: each size routes on its own (a routed batch of one
    size needs no padding), so every answer stays within the batching tolerance."""
    small = world["arrays"][:3]
    large = [cv2.resize(a, (160, 128)) for a in world["arrays"][:3]]
    arrays = small + large
    asked = ["shift", None, "shift", None, "shift", None]
    with engine_for(world, strategy="route", max_batch=6, max_wait_ms=5000) as engine:
        expected = [
            single_image_answer(engine.served, a, m) for a, m in zip(arrays, asked, strict=True)
        ]
        runner = engine.runner
        items = [(engine.served.inputs(a), m) for a, m in zip(arrays, asked, strict=True)]
        assert sorted(map(len, runner._same_size_groups(items))) == [3, 3]
        got = engine.predict(arrays, asked)
    assert {p.strategy for p in got} == {"route"}
    bad = [
        (i, why)
        for i, (e, p) in enumerate(zip(expected, got, strict=True))
        if (why := mismatch(e, p.sample, exact=False)) is not None
    ]
    assert not bad, bad
