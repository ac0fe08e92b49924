"""The HTTP server (mmdelta.apis.server) on a PatchEngine: every answer equals the
single-image answer of its model (bit for bit, strategy ``group``), under concurrent
clients too; patches loaded and unloaded at run time; every error a 4xx that changes
nothing. Tiny Faster R-CNN / segmenter, random weights and Δs, generated images."""

import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from serving_fixtures import (
    CLASSES,
    NEW,
    REPO,
    SEG_OWN,
    det_fixture,
    seg_fixture,
    single_image_answer,
)

from mmdelta.apis.engine import PatchEngine, decode_image
from mmdelta.apis.server import create_app, label_map_png, named_patches
from mmdelta.apis.serving import MultiPatchInferencer

SCORE_THR = 0.05


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    fx = det_fixture(tmp_path_factory.mktemp("server"), n_images=3)
    fx["bodies"] = [p.read_bytes() for p in sorted(fx["images"].iterdir())]
    patches = {"shift": fx["shift"], "newcls": fx["new"]}
    # the reference: one MultiPatchInferencer, each answer on a batch of one
    ref = MultiPatchInferencer(fx["config"], fx["base"], patches)
    fx["expected"] = {
        (i, patch): expected_json(ref, decode_image(body), patch)
        for i, body in enumerate(fx["bodies"])
        for patch in (None, "shift", "newcls")
    }
    engine = PatchEngine(
        fx["config"], fx["base"], patches, strategy="group", max_wait_ms=20, score_thr=SCORE_THR
    )
    with TestClient(create_app(engine)) as client:
        fx["client"], fx["engine"] = client, engine
        yield fx
    engine.close()


def expected_json(served, image, patch):
    """What ``POST /predict`` must answer, from the single-image reference (less the
    strategy and batch, which depend on the traffic)."""
    key = "base" if patch is None else patch
    sample = single_image_answer(served, image, patch)
    classes = served.metas[key]["classes"]
    summary = served.summary(sample, key, SCORE_THR)
    return {"patch": patch, "classes": list(classes), **json.loads(json.dumps(summary))}


def post_image(client, body, patch=None, **params):
    if patch is not None:
        params["patch"] = patch
    return client.post(
        "/predict", content=body, params=params, headers={"Content-Type": "image/jpeg"}
    )


def answer(response):
    assert response.status_code == 200, response.text
    got = response.json()
    assert got.pop("strategy") == "group" and 1 <= got.pop("batch") <= 8
    return got


def test_predict_base_and_each_patch_is_the_single_image_answer(det):
    client = det["client"]
    for i, body in enumerate(det["bodies"]):
        for patch in (None, "shift", "newcls"):
            got = answer(post_image(client, body, patch))
            assert got == det["expected"][(i, patch)], (i, patch)
    # the patches differ from the base; the new-class patch names its own classes
    assert det["expected"][(0, "shift")]["scores"] != det["expected"][(0, None)]["scores"]
    got = answer(post_image(client, det["bodies"][0], "newcls"))
    assert got["classes"] == list(NEW) and got["label_names"]
    assert set(got["label_names"]) <= set(NEW) and max(got["labels"]) < len(NEW)
    assert answer(post_image(client, det["bodies"][0]))["classes"] == list(CLASSES)
    # octet-stream is accepted as well
    response = client.post(
        "/predict", content=det["bodies"][1], headers={"Content-Type": "application/octet-stream"}
    )
    assert answer(response) == det["expected"][(1, None)]


def test_concurrent_clients_random_patches_zero_mismatches(det):
    client, rng = det["client"], random.Random(0)
    jobs = [
        (rng.randrange(len(det["bodies"])), rng.choice([None, "shift", "newcls"]))
        for _ in range(48)
    ]

    def one(job):
        i, patch = job
        response = post_image(client, det["bodies"][i], patch)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, jobs))
    mismatches = 0
    for (i, patch), got in zip(jobs, results, strict=True):
        batch = got.pop("batch")
        assert got.pop("strategy") == "group" and 1 <= batch <= 8
        mismatches += got != det["expected"][(i, patch)]
    assert mismatches == 0
    assert det["engine"].health()["batches_grouped"] >= 1


def test_concurrent_clients_auto_strategy_within_tolerance(det):
    """``auto``: batches of several models are routed (one forward, the shift patch's Δ per
    sample; the new-class patch runs grouped): every answer within the load test's
    tolerance of the single-image answer."""
    from mmdelta.apps.serving_load import matches

    patches = {"shift": det["shift"], "newcls": det["new"]}
    engine = PatchEngine(
        det["config"], det["base"], patches, strategy="auto", max_wait_ms=50, score_thr=SCORE_THR
    )
    rng = random.Random(1)
    jobs = [(rng.randrange(3), rng.choice([None, "shift", "newcls"])) for _ in range(32)]
    with engine, TestClient(create_app(engine)) as client:

        def one(job):
            response = post_image(client, det["bodies"][job[0]], job[1])
            assert response.status_code == 200, response.text
            return response.json()

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, jobs))
        health = client.get("/health").json()
    bad = [job for job, got in zip(jobs, results, strict=True)
           if not matches(got, det["expected"][job], exact=False)]  # fmt: skip
    assert bad == []
    assert health["batches_routed"] >= 1
    assert {r["strategy"] for r in results if r["patch"] == "newcls"} == {"group"}


def test_patches_listing_and_runtime_load_unload(det):
    client, engine = det["client"], det["engine"]
    listing = client.get("/patches").json()
    assert listing["base"] == {"fingerprint": engine.base_fingerprint, "classes": list(CLASSES)}
    assert set(listing["patches"]) == {"shift", "newcls"}
    assert listing["patches"]["newcls"]["classes"] == list(NEW)
    assert listing["patches"]["newcls"]["own_classes"] is True
    assert listing["patches"]["shift"]["own_classes"] is False

    upload = det["shift"].read_bytes()
    response = client.post("/patches/extra", content=upload)
    assert response.status_code == 201, response.text
    entry = response.json()
    assert entry["name"] == "extra" and entry["classes"] == list(CLASSES)
    uploaded = Path(entry["file"])
    assert uploaded.is_file() and uploaded.parent != det["shift"].parent  # a private copy
    assert det["shift"].read_bytes() == upload  # the user's file untouched
    # the uploaded copy of "shift" answers exactly as "shift" does
    got = answer(post_image(client, det["bodies"][0], "extra"))
    assert got == {**det["expected"][(0, "shift")], "patch": "extra"}
    assert set(client.get("/patches").json()["patches"]) == {"shift", "newcls", "extra"}
    assert "extra" in client.get("/health").json()["patches"]

    # a name in use: 409, nothing changes
    response = client.post("/patches/shift", content=upload)
    assert response.status_code == 409 and "loaded already" in response.json()["detail"]
    assert client.get("/patches").json()["patches"]["shift"]["file"] == str(det["shift"])

    assert client.delete("/patches/extra").status_code == 204
    assert not uploaded.exists()
    assert set(client.get("/patches").json()["patches"]) == {"shift", "newcls"}
    response = post_image(client, det["bodies"][0], "extra")
    assert response.status_code == 404
    response = client.delete("/patches/extra")
    assert response.status_code == 404 and "no patch 'extra'" in response.json()["detail"]


@pytest.mark.parametrize(
    "kind", ["garbage", "empty", "truncated", "foreign", "bad_name", "reserved_name"]
)
def test_bad_upload_is_4xx_and_changes_nothing(det, kind):
    client = det["client"]
    before = client.get("/patches").json()
    good = det["shift"].read_bytes()
    name, body, status, says = {
        "garbage": ("junk", b"this is not a safetensors file", 422, "uploaded patch 'junk'"),
        "empty": ("junk", b"", 422, "patch"),
        "truncated": ("junk", good[: len(good) // 2], 422, "patch"),
        "foreign": ("junk", det["foreign"].read_bytes(), 422, "other base weights"),
        "bad_name": ("1st-try", good, 422, "patch name"),
        "reserved_name": ("base", good, 409, "loaded already"),
    }[kind]
    response = client.post(f"/patches/{name}", content=body)
    assert response.status_code == status, response.text
    assert says in response.json()["detail"]
    assert str(client.app.state.uploads) not in response.json()["detail"]
    assert client.get("/patches").json() == before
    assert list(client.app.state.uploads.iterdir()) == []  # the temporary file is gone
    # predictions still answer, unchanged
    assert answer(post_image(client, det["bodies"][2], "shift")) == det["expected"][(2, "shift")]
    assert answer(post_image(client, det["bodies"][2])) == det["expected"][(2, None)]


def test_unknown_patch_and_non_images_are_4xx(det):
    client = det["client"]
    response = post_image(client, det["bodies"][0], "nope")
    assert response.status_code == 404
    detail = response.json()["detail"]
    assert "'nope'" in detail and "newcls" in detail and "shift" in detail  # lists the loaded
    response = post_image(client, b"no image at all")
    assert response.status_code == 400 and "not an image" in response.json()["detail"]
    assert post_image(client, b"").status_code == 400
    response = client.post("/predict", content=b"{}", headers={"Content-Type": "application/json"})
    assert response.status_code == 415 and "Content-Type" in response.json()["detail"]
    assert post_image(client, det["bodies"][0], format="png").status_code == 400  # det
    assert post_image(client, det["bodies"][0], format="gif").status_code == 422
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["task"] == "det"
    assert health["patches"] == ["newcls", "shift"]
    assert answer(post_image(client, det["bodies"][0])) == det["expected"][(0, None)]


def test_segmentation_png_is_the_label_map(tmp_path):
    fx = seg_fixture(tmp_path)
    body = cv2.imencode(".png", cv2.imread(str(fx["image"])))[1].tobytes()
    ref = MultiPatchInferencer(fx["config"], fx["base"], {"newcls": fx["new"]})
    with PatchEngine(fx["config"], fx["base"], {"newcls": fx["new"]}, strategy="group") as engine:
        with TestClient(create_app(engine)) as client:
            for patch, classes in [(None, fx["classes"]), ("newcls", SEG_OWN)]:
                sample = single_image_answer(ref, decode_image(body), patch)
                expected = sample.pred_sem_seg.data[0].numpy()
                response = post_image(client, body, patch, format="png")
                assert response.status_code == 200, response.text
                assert response.headers["content-type"] == "image/png"
                assert response.headers["x-patch"] == (patch or "base")
                label_map = cv2.imdecode(
                    np.frombuffer(response.content, np.uint8), cv2.IMREAD_UNCHANGED
                )
                assert label_map.dtype == np.uint8 and label_map.shape == expected.shape
                assert (label_map == expected).all()
                got = post_image(client, body, patch).json()
                assert got["classes"] == list(classes) and got["shape"] == list(expected.shape)
                assert got["pixels"] == {
                    classes[c]: int((expected == c).sum()) for c in np.unique(expected)
                }


def test_label_map_png_is_16_bit_beyond_255_classes():
    import torch
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    sample = SegDataSample(pred_sem_seg=PixelData(data=torch.tensor([[[0, 3], [300, 7]]])))
    wide = cv2.imdecode(np.frombuffer(label_map_png(sample, 400), np.uint8), -1)
    assert wide.dtype == np.uint16 and wide.tolist() == [[0, 3], [300, 7]]
    sample = SegDataSample(pred_sem_seg=PixelData(data=torch.tensor([[[0, 3], [254, 7]]])))
    narrow = cv2.imdecode(np.frombuffer(label_map_png(sample, 255), np.uint8), -1)
    assert narrow.dtype == np.uint8 and narrow.tolist() == [[0, 3], [254, 7]]


def test_named_patches(tmp_path):
    existing = tmp_path / "a=b.safetensors"
    existing.write_bytes(b"")
    assert named_patches(["x=p.safetensors", "p.safetensors", str(existing), "1x=p"]) == [
        ("x", "p.safetensors"), "p.safetensors", str(existing), "1x=p",
    ]  # fmt: skip


def test_serve_tool_errors_name_what_to_fix(det, tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, str(REPO / "tools" / "serve.py"), *map(str, args)],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip

    proc = run(det["config"], det["base"], "--patch", f"x={tmp_path / 'missing.safetensors'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing.safetensors" in proc.stderr and "does not exist" in proc.stderr
    proc = run(det["config"], det["base"], "--patch", det["foreign"])
    assert proc.returncode == 2 and "other base weights" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run(det["config"], det["base"], "--strategy", "fast")
    assert proc.returncode == 2 and "--strategy" in proc.stderr


@pytest.mark.slow
def test_load_test_small(tmp_path):
    """tools/bench_serving_load.py in a small form: the server in a subprocess, 4 clients x
    10 requests over 4 patches + the base, every answer checked: 0 mismatches."""
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "tools" / "bench_serving_load.py"), "--tiny",
            "--clients", "4", "--requests", "10", "--strategy", "group", "--quick",
            "--out", str(out), "--workdir", str(tmp_path / "work"),
        ],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    (run,) = [r for r in result["runs"] if r["name"] == "mixed"]
    assert run["requests"] == 40 and run["mismatches"] == 0 and run["errors"] == 0
    assert run["throughput_rps"] > 0 and run["p99_ms"] >= run["p50_ms"] > 0
    assert run["server"]["VmHWM_mib"] >= run["server"]["VmRSS_mib"] > 50
    assert "| mixed |" in proc.stdout
