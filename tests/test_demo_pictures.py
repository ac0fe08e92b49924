"""The demo's pictures: predictions side by side (det, seg) and training curves."""

import json

import cv2
import numpy as np
import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData, PixelData
from mmseg.structures import SegDataSample

from mmdelta.visualization import GAP, TITLE_HEIGHT, plot_curves, side_by_side

BASE_META = {"classes": ("square", "disc", "bar")}
PATCH_META = {"classes": ("triangle", "ring", "cross"), "palette": []}  # empty palette
SIZE = 128  # upscaled x3 to 384


def shapes_image() -> np.ndarray:
    rng = np.random.RandomState(0)
    image = np.full((SIZE, SIZE, 3), 90, np.uint8) + rng.randint(0, 20, (SIZE, SIZE, 3), np.uint8)
    cv2.rectangle(image, (10, 10), (50, 50), (220, 40, 40), -1)
    cv2.circle(image, (90, 30), 20, (40, 220, 40), -1)
    cv2.rectangle(image, (20, 80), (110, 100), (40, 40, 220), -1)
    return image


def det_sample(scores=(0.9, 0.8, 0.7)) -> DetDataSample:
    sample = DetDataSample()
    sample.pred_instances = InstanceData(
        bboxes=torch.tensor([[10, 10, 50, 50], [70, 10, 110, 50], [20, 80, 110, 100]]).float(),
        scores=torch.tensor(scores),
        labels=torch.tensor([0, 1, 2]),
    )
    return sample


def seg_sample() -> SegDataSample:
    seg = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    seg[0, 10:50, 10:50] = 1
    seg[0, 80:100, 20:110] = 2
    seg[0, :4, :4] = 255  # ignore index: not drawn
    sample = SegDataSample()
    sample.pred_sem_seg = PixelData(data=seg)
    return sample


def panels_of(png: np.ndarray, n: int) -> list[np.ndarray]:
    width = (png.shape[1] - GAP * (n - 1)) // n
    return [png[TITLE_HEIGHT:, i * (width + GAP) : i * (width + GAP) + width] for i in range(n)]


def check_picture(path: str, image: np.ndarray, n: int) -> list[np.ndarray]:
    png = cv2.imread(path)
    assert png is not None, f"{path} is not a readable image"
    png = cv2.cvtColor(png, cv2.COLOR_BGR2RGB)
    factor = 384 // SIZE
    assert png.shape[0] == TITLE_HEIGHT + SIZE * factor
    assert png.shape[1] == n * SIZE * factor + (n - 1) * GAP
    assert (png[: TITLE_HEIGHT // 4] == 255).all()  # white title strip...
    assert (png[:TITLE_HEIGHT] < 128).any()  # ...with black text in it
    raw = cv2.resize(image, (SIZE * factor,) * 2, interpolation=cv2.INTER_NEAREST)
    panels = panels_of(png, n)
    for panel in panels:
        assert panel.std() > 0
        assert np.abs(panel.astype(int) - raw.astype(int)).mean() > 1  # something drawn
    return panels


def test_side_by_side_det(tmp_path):
    image = shapes_image()
    out = tmp_path / "sub" / "det.png"
    panels = [
        ("base (3 classes)", det_sample(), BASE_META),
        ("patch (3 classes)", det_sample(), PATCH_META),
    ]
    assert side_by_side(image, panels, out, task="det") == str(out)
    base, patch = check_picture(str(out), image, 2)
    # same boxes, other class names: the panels differ only where the labels are written
    assert not np.array_equal(base, patch)
    assert not list(out.parent.glob("*.tmp"))


def test_side_by_side_det_from_file_and_threshold(tmp_path):
    image = shapes_image()
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    out = tmp_path / "det.png"
    panels = [
        ("all boxes", det_sample(), BASE_META),
        ("below threshold", det_sample(scores=(0.1, 0.1, 0.1)), {"classes": ["a"]}),
    ]
    side_by_side(str(path), panels, out, task="det", score_thr=0.3)
    png = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    drawn, empty = panels_of(png, 2)
    raw = cv2.resize(image, (384, 384), interpolation=cv2.INTER_NEAREST)
    assert np.abs(drawn.astype(int) - raw.astype(int)).mean() > 1
    assert np.abs(empty.astype(int) - raw.astype(int)).max() <= 2  # nothing above the threshold


def test_side_by_side_seg(tmp_path):
    image = shapes_image()
    out = tmp_path / "seg.png"
    panels = [
        ("base", seg_sample(), {"classes": ["background", "square", "bar"]}),
        ("patch", seg_sample(), {"classes": ["bg", "x"], "palette": [[0, 0, 0], [255, 0, 0]]}),
    ]
    side_by_side(image, panels, out, task="seg")
    base, patch = check_picture(str(out), image, 2)
    assert not np.array_equal(base, patch)


def test_side_by_side_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="task"):
        side_by_side(shapes_image(), [("x", det_sample(), BASE_META)], tmp_path / "a.png", task="x")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.png"):
        side_by_side(
            tmp_path / "nowhere.png",
            [("x", det_sample(), BASE_META)],
            tmp_path / "b.png",
            task="det",
        )


def write_scalars(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_plot_curves(tmp_path):
    det = [
        {"loss": 2.0 - i / 10, "lr": 0.01, "loss_cls": 1.0, "iter": i, "step": i}
        for i in range(10, 110, 10)
    ]
    det.insert(5, {"pascal_voc/mAP": 0.2, "pascal_voc/AP50": 0.4, "step": 0})  # step=epoch (0)
    det.append({"pascal_voc/mAP": 0.4, "pascal_voc/AP50": 0.6, "step": 100})
    patch = [{"loss": 1.5 - i / 20, "iter": i, "step": i} for i in range(10, 60, 10)]
    patch.append({"mIoU": 40.0, "aAcc": 80.0, "base/mIoU": 55.0, "step": 50})
    runs = {
        "base": write_scalars(tmp_path / "a.json", det),
        "patch": write_scalars(tmp_path / "b.json", patch),
    }
    with (tmp_path / "b.json").open("a") as f:
        f.write('{"loss": 0.5, "st')  # a line still being written
    out = tmp_path / "plots" / "curves.png"
    assert plot_curves(runs, out, title="demo") == str(out)
    png = cv2.imread(str(out))
    assert png is not None and png.shape[0] > 100 and png.shape[1] > 200 and png.std() > 0


def test_plot_curves_errors(tmp_path):
    missing = tmp_path / "nope" / "scalars.json"
    with pytest.raises(FileNotFoundError, match="nope") as err:
        plot_curves({"run1": missing}, tmp_path / "c.png")
    assert str(missing) in str(err.value) and "run1" in str(err.value)
    empty = write_scalars(tmp_path / "empty.json", [])
    with pytest.raises(ValueError, match=r"empty\.json"):
        plot_curves({"run1": empty}, tmp_path / "c.png")
    # a run with training lines only still plots
    train = write_scalars(tmp_path / "t.json", [{"loss": 1.0, "step": 1}, {"loss": 0.9, "step": 2}])
    plot_curves({"run1": train, "run2": empty}, tmp_path / "c.png")
    assert cv2.imread(str(tmp_path / "c.png")) is not None
