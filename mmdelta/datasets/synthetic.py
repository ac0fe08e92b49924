"""Small generated datasets in the real on-disk formats, for tests and demos.

Two writers, both deterministic (same arguments → byte-identical files on the same
platform) and cached:

* :func:`write_voc_dataset` writes a PASCAL VOC tree as mmdet's ``VOCDataset`` reads it::

      root/VOC2007/JPEGImages/<id>.jpg
      root/VOC2007/Annotations/<id>.xml      size + one <object> per instance, bndbox
                                             xmin..ymax 1-based and inclusive (VOC)
      root/VOC2007/ImageSets/Main/trainval.txt, test.txt   one <id> per line

  Use it with ``data_root=root``, ``ann_file='VOC2007/ImageSets/Main/trainval.txt'``,
  ``data_prefix=dict(sub_data_root='VOC2007/')`` and ``metainfo=dict(classes=classes)``.

* :func:`write_seg_dataset` writes mmseg's folder layout for ``BaseSegDataset``::

      root/img_dir/{train,val}/<id>.jpg
      root/ann_dir/{train,val}/<id>.png      uint8 label map, same size as the image:
                                             0 = background, k = classes[k-1], 255 = ignore

  Use it with ``img_suffix='.jpg'``, ``seg_map_suffix='.png'``, ``reduce_zero_label=False``
  and ``metainfo=seg_metainfo(classes)`` (``classes`` there starts with ``'background'``).

Images show several objects (``objects_per_image``, sizes and overlaps varied, every object
fully inside the image); each class draws one shape kind (:data:`SHAPE_KINDS`, see
:func:`class_shapes`), so new classes are new shapes. ``style`` sets the appearance only
(:data:`STYLES`): ``'base'`` dark shapes on light backgrounds; ``'shifted'`` light shapes on
coloured, textured, cluttered backgrounds with noise and blur (a base model sees nothing);
``'noisy'`` the base look at low contrast with heavy noise and blur (a milder shift);
``'fog'`` the very scenes of ``'base'`` (same seed: same image before degradation) seen
through haze: mixed with a grey-white airlight (transmission 0.25-0.38, varying across the
image), a slight colour cast, blur and sensor noise (a realistic, label-free-adaptable
shift, as Cityscapes -> Foggy Cityscapes). The
object layout of an image depends on the seed and the classes, not on the style, so two
styles with one seed show the same scenes.

Generation writes into a temporary folder next to ``root`` and renames it into place; the
parameters go to ``root/.mmdelta-dataset.json``. A later call with the same parameters
returns at once; a ``root`` holding anything else (other parameters, or files without the
marker) raises :class:`DatasetExistsError` and is left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import escape

import cv2
import numpy as np

__all__ = [
    "MARKER",
    "SHAPE_KINDS",
    "STYLES",
    "DatasetExistsError",
    "class_shapes",
    "dataset_info",
    "seg_metainfo",
    "voc_xml",
    "write_seg_dataset",
    "write_voc_dataset",
]

MARKER = ".mmdelta-dataset.json"
GENERATOR_VERSION = 1
JPEG_QUALITY = 95

# Shape kinds that stay distinct under the generator's small rotations (±15°) and scaling.
SHAPE_KINDS = (
    "square",
    "disc",
    "triangle",
    "bar",
    "ring",
    "cross",
    "diamond",
    "star",
    "frame",
    "hourglass",
)
STYLES = ("base", "shifted", "noisy", "fog")
# Degradations of the 'base' look: the same clean scene as 'base' for the same seed (the
# scene's colours come from the 'base' stream), then degraded with a stream of its own.
_DEGRADED = {"fog": "base"}
# fog: transmission t (fraction of the scene that reaches the camera), the grey-white
# airlight it is mixed with, a slight colour cast, blur and sensor noise
FOG = dict(
    t=(0.25, 0.38), t_slope=0.12, airlight=(170.0, 205.0), cast=10.0, blur=(0.8, 1.4), noise=7.0
)

# Distinct colours for seg palettes (index 0 is the background).
_PALETTE = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
)
_SS = 4  # supersampling factor of the shape rasteriser


class DatasetExistsError(FileExistsError):
    """``root`` exists and is not this generator's output for the same parameters."""


# --------------------------------------------------------------------------- classes


def class_shapes(classes: Sequence[str], shapes: Mapping[str, str] | None = None) -> dict[str, str]:
    """The shape kind each class draws: ``{class name: kind from SHAPE_KINDS}``.

    ``shapes`` fixes kinds explicitly; a class named like a kind draws that kind; any other
    name takes the first free kind, in ``SHAPE_KINDS`` order, starting from a hash of the
    name. The result depends only on ``classes`` and ``shapes`` (deterministic); no two
    classes of one dataset share a kind.
    """
    classes = _check_classes(classes)
    shapes = dict(shapes or {})
    unknown = set(shapes) - set(classes)
    if unknown:
        raise ValueError(f"shapes names classes not in `classes`: {sorted(unknown)}")
    for name, kind in shapes.items():
        if kind not in SHAPE_KINDS:
            raise ValueError(f"unknown shape kind {kind!r} for {name!r}; kinds: {SHAPE_KINDS}")
    if len(classes) > len(SHAPE_KINDS):
        raise ValueError(f"at most {len(SHAPE_KINDS)} classes (one shape kind each)")
    out: dict[str, str] = {}
    for name in classes:
        if name in shapes:
            out[name] = shapes[name]
        elif name in SHAPE_KINDS:
            out[name] = name
    taken = list(out.values())
    if len(set(taken)) != len(taken):
        raise ValueError(f"two classes share a shape kind: {out}")
    for name in classes:
        if name in out:
            continue
        start = int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(SHAPE_KINDS)
        for k in range(len(SHAPE_KINDS)):
            kind = SHAPE_KINDS[(start + k) % len(SHAPE_KINDS)]
            if kind not in taken:
                out[name] = kind
                taken.append(kind)
                break
    return {name: out[name] for name in classes}


def seg_metainfo(classes: Sequence[str]) -> dict:
    """``metainfo`` for ``BaseSegDataset`` on :func:`write_seg_dataset`'s output."""
    classes = _check_classes(classes)
    if len(classes) + 1 > len(_PALETTE):
        raise ValueError(f"at most {len(_PALETTE) - 1} classes")
    return dict(
        classes=("background", *classes),
        palette=[list(c) for c in _PALETTE[: len(classes) + 1]],
    )


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(classes, str):
        raise TypeError("classes must be a sequence of names, not one string")
    classes = tuple(classes)
    if not classes:
        raise ValueError("classes is empty")
    for name in classes:
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"bad class name {name!r}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"duplicate class names in {classes}")
    return classes


# --------------------------------------------------------------------------- shapes


def _circle(r: float, n: int = 48) -> np.ndarray:
    t = np.arange(n) * (2 * np.pi / n)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _star(n: int = 5, inner: float = 0.42) -> np.ndarray:
    t = np.arange(2 * n) * (np.pi / n) - np.pi / 2
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


_W = 0.3  # half-width of a cross arm
# Each kind: [(polygon in roughly [-1, 1]², fill value)]; later polygons paint over earlier.
_SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "square": [(np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], float), 1)],
    "disc": [(_circle(1.0), 1)],
    "triangle": [(np.array([(0, -1), (0.866, 0.5), (-0.866, 0.5)], float), 1)],
    "bar": [(np.array([(-1, -0.28), (1, -0.28), (1, 0.28), (-1, 0.28)], float), 1)],
    "ring": [(_circle(1.0), 1), (_circle(0.55), 0)],
    "cross": [
        (
            np.array(
                [
                    (-_W, -1),
                    (_W, -1),
                    (_W, -_W),
                    (1, -_W),
                    (1, _W),
                    (_W, _W),
                    (_W, 1),
                    (-_W, 1),
                    (-_W, _W),
                    (-1, _W),
                    (-1, -_W),
                    (-_W, -_W),
                ],
                float,
            ),
            1,
        )
    ],
    "diamond": [(np.array([(0, -1), (1, 0), (0, 1), (-1, 0)], float), 1)],
    "star": [(_star(), 1)],
    "frame": [
        (np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], float), 1),
        (np.array([(-0.55, -0.55), (0.55, -0.55), (0.55, 0.55), (-0.55, 0.55)], float), 0),
    ],
    "hourglass": [
        (
            np.array([(-0.9, -1), (0.9, -1), (0.15, 0), (0.9, 1), (-0.9, 1), (-0.15, 0)], float),
            1,
        )
    ],
}
assert set(_SHAPES) == set(SHAPE_KINDS)


def _render(kind: str, size: float, rng: np.random.Generator) -> np.ndarray:
    """Coverage (float32 in [0, 1]) of one shape whose longer side is about ``size`` px."""
    angle = np.deg2rad(rng.uniform(-15, 15))
    if kind == "bar" and rng.random() < 0.5:
        angle += np.pi / 2
    jitter = 0.1 if kind in ("disc", "ring") else 0.2
    aspect = float(np.exp(rng.uniform(-jitter, jitter)))
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]]) * np.array([aspect**0.5, aspect**-0.5])[:, None]
    polys = [(p @ rot.T, v) for p, v in _SHAPES[kind]]
    pts = np.concatenate([p for p, _ in polys])
    lo, hi = pts.min(0), pts.max(0)
    scale = size / float((hi - lo).max())
    w, h = (max(2, int(np.ceil(e * scale))) for e in (hi - lo))
    canvas = np.zeros((h * _SS, w * _SS), np.uint8)
    for poly, value in polys:
        xy = (poly - lo) * scale * _SS * 16  # 4 fractional bits (shift=4)
        cv2.fillPoly(canvas, [np.round(xy).astype(np.int32)], 255 * value, cv2.LINE_8, 4)
    return cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def _layout(
    rng: np.random.Generator,
    height: int,
    width: int,
    classes: tuple[str, ...],
    kinds: dict[str, str],
    first_class: int,
    objects_per_image: tuple[int, int],
    object_size: tuple[float, float],
    max_overlap: float,
) -> list[dict]:
    """Objects of one image: class index, top-left corner, coverage and tight box."""
    n = int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))
    side = min(height, width)
    objects: list[dict] = []
    for k in range(n):
        label = first_class if k == 0 else int(rng.integers(len(classes)))
        for attempt in range(40):
            hi = object_size[1] if attempt < 20 else (object_size[0] + object_size[1]) / 2
            alpha = _render(kinds[classes[label]], rng.uniform(object_size[0], hi) * side, rng)
            ys, xs = np.nonzero(alpha >= 0.5)
            if len(xs) == 0:
                continue
            h, w = alpha.shape
            if h > height or w > width:
                continue
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            box = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max(), y0 + ys.max())  # inclusive
            if box[2] - box[0] < 2 or box[3] - box[1] < 2:
                continue
            if all(_overlap_ok(box, o["box"], max_overlap) for o in objects):
                objects.append(dict(label=label, x0=x0, y0=y0, alpha=alpha, box=box))
                break
    return objects


def _overlap_ok(a, b, max_iou: float) -> bool:
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return True
    inter = iw * ih
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    # keep occluded objects mostly visible: bounded IoU and bounded cover of the smaller one
    return inter / (area_a + area_b - inter) <= max_iou and inter <= 0.5 * min(area_a, area_b)


# --------------------------------------------------------------------------- appearance


def _hsv_colour(rng: np.random.Generator, s: tuple, v: tuple) -> np.ndarray:
    hsv = np.array(
        [[[rng.uniform(0, 180), rng.uniform(*s) * 255, rng.uniform(*v) * 255]]], np.float32
    )
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _gradient(rng: np.random.Generator, h: int, w: int, amp: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = rng.uniform(0, 2 * np.pi)
    g = (np.cos(t) * (xx / w - 0.5) + np.sin(t) * (yy / h - 0.5)) * 2 * amp
    return g[..., None]


def _background(rng: np.random.Generator, style: str, h: int, w: int) -> np.ndarray:
    if style in ("base", "noisy"):
        grey = rng.uniform(205, 240)
        img = np.empty((h, w, 3), np.float32)
        img[:] = grey + rng.uniform(-10, 10, 3)
        return img + _gradient(rng, h, w, 12)
    # shifted: saturated mid-tone colour, texture, clutter
    img = np.empty((h, w, 3), np.float32)
    img[:] = _hsv_colour(rng, (0.45, 0.9), (0.35, 0.7))
    img += _gradient(rng, h, w, 25)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.random() < 0.5:  # stripes
        t, period = rng.uniform(0, np.pi), rng.uniform(5, 14)
        tex = np.sin((np.cos(t) * xx + np.sin(t) * yy) * (2 * np.pi / period))
    else:  # checker
        cell = rng.uniform(4, 10)
        tex = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2) * 2 - 1
    img += tex[..., None] * rng.uniform(15, 35) * (0.5 + rng.random(3)).astype(np.float32)
    for _ in range(int(rng.integers(6, 14))):  # clutter: lines and scribbles
        n = int(rng.integers(2, 5))
        pts = np.stack([rng.uniform(-0.1 * w, 1.1 * w, n), rng.uniform(-0.1 * h, 1.1 * h, n)], 1)
        colour = _hsv_colour(rng, (0.0, 0.8), (0.2, 1.0)).tolist()
        cv2.polylines(
            img,
            [np.round(pts).astype(np.int32)],
            False,
            colour,
            int(rng.integers(1, 4)),
            cv2.LINE_8,
        )
    return img


def _object_colour(rng: np.random.Generator, style: str) -> np.ndarray:
    if style == "base":
        return _hsv_colour(rng, (0.0, 0.9), (0.05, 0.4))
    if style == "noisy":
        return _hsv_colour(rng, (0.0, 0.6), (0.35, 0.6))
    return _hsv_colour(rng, (0.0, 0.35), (0.8, 1.0))  # shifted: light shapes


def _finish(rng: np.random.Generator, style: str, img: np.ndarray) -> np.ndarray:
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if style != "base":
        sigma = rng.uniform(0.7, 1.3) if style == "shifted" else rng.uniform(1.0, 1.6)
        img = cv2.GaussianBlur(img, (5, 5), sigma)
    noise = {"base": 3.0, "shifted": 12.0, "noisy": 22.0}[style]
    out = img.astype(np.float32) + rng.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _fog(rng: np.random.Generator, clean: np.ndarray, fog: Mapping) -> np.ndarray:
    """``clean`` (BGR uint8) through haze (``fog``: :data:`FOG`): ``I = J t + A (1 - t)``."""
    h, w = clean.shape[:2]
    t = rng.uniform(*fog["t"]) + _gradient(rng, h, w, fog["t_slope"])
    airlight = rng.uniform(*fog["airlight"]) + rng.uniform(-fog["cast"], fog["cast"], 3)
    img = clean.astype(np.float32) * t + airlight.astype(np.float32) * (1 - t)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    img = cv2.GaussianBlur(img, (5, 5), rng.uniform(*fog["blur"]))
    out = img.astype(np.float32) + rng.normal(0, fog["noise"], img.shape).astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _scene(
    params: dict,
    kinds: dict[str, str],
    split: str,
    index: int,
    background: np.ndarray | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """One image (BGR uint8) and its objects; RNG streams keyed by (seed, split, index).

    ``background`` (float32 ``(h, w, 3)`` BGR) replaces the style's own background.
    """
    h, w = params["image_size"]
    classes = tuple(params["object_classes"])
    split_code = zlib.crc32(split.encode())
    geo = np.random.default_rng([params["seed"], split_code, index, 0])
    style = _DEGRADED.get(params["style"], params["style"])
    look = np.random.default_rng([params["seed"], split_code, index, 1, zlib.crc32(style.encode())])
    objects = _layout(
        geo,
        h,
        w,
        classes,
        kinds,
        index % len(classes),
        tuple(params["objects_per_image"]),
        tuple(params["object_size"]),
        params["max_overlap"],
    )
    if background is None:
        img = _background(look, style, h, w)
    else:
        img = np.array(background, np.float32, copy=True)
    for obj in objects:
        a = obj["alpha"]
        y, x = obj["y0"], obj["x0"]
        region = img[y : y + a.shape[0], x : x + a.shape[1]]
        colour = _object_colour(look, style)
        region *= 1 - a[..., None]
        region += a[..., None] * colour
    if style != params["style"]:
        clean = _finish(look, style, img)
        weather = np.random.default_rng(
            [params["seed"], split_code, index, 2, zlib.crc32(params["style"].encode())]
        )
        return _fog(weather, clean, params["degradation"]), objects
    return _finish(look, style, img), objects


def _encode(ext: str, img: np.ndarray) -> bytes:
    flags = {
        ".jpg": [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY],
        ".png": [cv2.IMWRITE_PNG_COMPRESSION, 3],
    }[ext]
    ok, buf = cv2.imencode(ext, img, flags)
    if not ok:
        raise RuntimeError(f"cv2 could not encode {ext}")
    return buf.tobytes()


# --------------------------------------------------------------------------- writers


def _common_params(
    fmt: str,
    classes: Sequence[str],
    num_train: int,
    num_test: int,
    image_size: Sequence[int],
    seed: int,
    style: str,
    objects_per_image: Sequence[int],
    object_size: Sequence[float],
    max_overlap: float,
    shapes: Mapping[str, str] | None,
) -> dict:
    classes = _check_classes(classes)
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; styles: {STYLES}")
    if int(num_train) < 0 or int(num_test) < 0 or int(num_train) + int(num_test) == 0:
        raise ValueError("num_train and num_test must be ≥ 0, not both 0")
    h, w = (int(v) for v in image_size)
    if min(h, w) < 16:
        raise ValueError(f"image_size {image_size} is below 16 px")
    lo, hi = (int(v) for v in objects_per_image)
    if not 1 <= lo <= hi:
        raise ValueError(f"objects_per_image {objects_per_image} must be 1 ≤ min ≤ max")
    smin, smax = (float(v) for v in object_size)
    if not 0 < smin <= smax <= 1:
        raise ValueError(f"object_size {object_size} must be fractions 0 < min ≤ max ≤ 1")
    params = dict(
        generator="mmdelta.datasets.synthetic",
        version=GENERATOR_VERSION,
        format=fmt,
        object_classes=list(classes),
        shapes=class_shapes(classes, shapes),
        num_train=int(num_train),
        num_test=int(num_test),
        image_size=[h, w],
        seed=int(seed),
        style=style,
        objects_per_image=[lo, hi],
        object_size=[smin, smax],
        max_overlap=float(max_overlap),
    )
    if style in _DEGRADED:  # the degradation's parameters are part of the data's identity
        params["degradation"] = {k: list(v) if isinstance(v, tuple) else v for k, v in FOG.items()}
    return params


def write_voc_dataset(
    root: str | os.PathLike,
    classes: Sequence[str],
    num_train: int,
    num_test: int,
    image_size: Sequence[int] = (128, 128),
    seed: int = 0,
    style: str = "base",
    *,
    objects_per_image: Sequence[int] = (2, 5),
    object_size: Sequence[float] = (0.15, 0.45),
    max_overlap: float = 0.3,
    shapes: Mapping[str, str] | None = None,
    folder: str = "VOC2007",
) -> str:
    """Write (or find cached) a PASCAL VOC 2007 tree under ``root``; returns ``str(root)``.

    Ids are ``000001…`` (``num_train`` in ``trainval.txt``, then ``num_test`` in
    ``test.txt``). Every box lies inside its image, is at least 3 px wide and high, and is
    the tight box of the drawn shape; ``difficult`` is 0. Image ``i`` of a split contains
    class ``classes[i % len(classes)]`` (so every class appears once a split has
    ``len(classes)`` images) plus random others. ``image_size`` is ``(h, w)``;
    ``object_size`` is the range of an object's longer side as a fraction of
    ``min(h, w)``; see the module docstring for styles and caching. ``folder`` names the
    tree's sub-root (``data_prefix.sub_data_root``): mmdet's ``VOCDataset`` and ``VOCMetric``
    treat a sub-root containing ``VOC2007`` as the real VOC and print VOC's class names in
    the metric table, so a dataset of other classes reads better under another name.
    """
    if not folder or "/" in folder or folder in (".", ".."):
        raise ValueError(f"folder {folder!r} must be one plain folder name")
    params = _common_params(
        "voc",
        classes,
        num_train,
        num_test,
        image_size,
        seed,
        style,
        objects_per_image,
        object_size,
        max_overlap,
        shapes,
    )
    params["classes"] = list(params["object_classes"])
    if folder != "VOC2007":  # (older caches have no entry: the default)
        params["folder"] = folder

    def write(tmp: Path) -> None:
        voc = tmp / folder
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (voc / sub).mkdir(parents=True)
        h, w = params["image_size"]
        k = 0
        for split, count, list_name in (
            ("train", params["num_train"], "trainval"),
            ("test", params["num_test"], "test"),
        ):
            ids = []
            for i in range(count):
                k += 1
                img_id = f"{k:06d}"
                ids.append(img_id)
                img, objects = _scene(params, params["shapes"], split, i)
                (voc / "JPEGImages" / f"{img_id}.jpg").write_bytes(_encode(".jpg", img))
                (voc / "Annotations" / f"{img_id}.xml").write_text(
                    voc_xml(
                        img_id,
                        w,
                        h,
                        [(params["classes"][o["label"]], o["box"]) for o in objects],
                        folder,
                    ),
                    encoding="utf-8",
                )
            (voc / "ImageSets" / "Main" / f"{list_name}.txt").write_text(
                "".join(f"{i}\n" for i in ids)
            )

    return _generate(Path(root), params, write)


def voc_xml(img_id: str, width: int, height: int, objects: list[tuple], folder: str) -> str:
    """VOC annotation XML; ``objects``: ``(name, inclusive box[, difficult])`` tuples."""
    lines = [
        "<annotation>",
        f"\t<folder>{escape(folder)}</folder>",
        f"\t<filename>{img_id}.jpg</filename>",
        "\t<source>",
        "\t\t<database>mmdelta synthetic shapes</database>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for name, (x0, y0, x1, y1), *rest in objects:
        difficult = int(rest[0]) if rest else 0
        lines += [
            "\t<object>",
            f"\t\t<name>{escape(name)}</name>",
            "\t\t<pose>Unspecified</pose>",
            "\t\t<truncated>0</truncated>",
            f"\t\t<difficult>{difficult}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{x0 + 1}</xmin>",
            f"\t\t\t<ymin>{y0 + 1}</ymin>",
            f"\t\t\t<xmax>{x1 + 1}</xmax>",
            f"\t\t\t<ymax>{y1 + 1}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


_voc_xml = voc_xml  # the name mmdelta.datasets.real_formats imports


def write_seg_dataset(
    root: str | os.PathLike,
    classes: Sequence[str],
    num_train: int,
    num_test: int,
    image_size: Sequence[int] = (128, 128),
    seed: int = 0,
    style: str = "base",
    *,
    objects_per_image: Sequence[int] = (2, 5),
    object_size: Sequence[float] = (0.15, 0.45),
    max_overlap: float = 0.3,
    ignore_border: int = 0,
    shapes: Mapping[str, str] | None = None,
) -> str:
    """Write (or find cached) an mmseg ``img_dir``/``ann_dir`` tree; returns ``str(root)``.

    ``classes`` are the object classes; the label map uses 0 for the background and ``k``
    for ``classes[k-1]`` (:func:`seg_metainfo` gives the matching ``metainfo``). A pixel is
    labelled with the topmost object whose coverage is ≥ 0.5 there. ``ignore_border > 0``
    marks a band of that many pixels around each object's outline as 255. Splits:
    ``train`` (``num_train`` images) and ``val`` (``num_test``). Same layouts as
    :func:`write_voc_dataset` for the same seed and classes.
    """
    classes = _check_classes(classes)
    if "background" in classes:
        raise ValueError("'background' is label 0 already; pass the object classes only")
    params = _common_params(
        "mmseg",
        classes,
        num_train,
        num_test,
        image_size,
        seed,
        style,
        objects_per_image,
        object_size,
        max_overlap,
        shapes,
    )
    meta = seg_metainfo(classes)
    params.update(
        classes=list(meta["classes"]),
        palette=meta["palette"],
        ignore_border=int(ignore_border),
        img_suffix=".jpg",
        seg_map_suffix=".png",
    )

    def write(tmp: Path) -> None:
        h, w = params["image_size"]
        for split, count in (("train", params["num_train"]), ("val", params["num_test"])):
            img_dir, ann_dir = tmp / "img_dir" / split, tmp / "ann_dir" / split
            img_dir.mkdir(parents=True)
            ann_dir.mkdir(parents=True)
            for i in range(count):
                img, objects = _scene(params, params["shapes"], split, i)
                label = np.zeros((h, w), np.uint8)
                for obj in objects:
                    a = obj["alpha"] >= 0.5
                    y, x = obj["y0"], obj["x0"]
                    region = label[y : y + a.shape[0], x : x + a.shape[1]]
                    region[a] = obj["label"] + 1
                if params["ignore_border"] > 0:
                    label = _ignore_borders(label, params["ignore_border"])
                name = f"{i + 1:06d}"
                (img_dir / f"{name}.jpg").write_bytes(_encode(".jpg", img))
                (ann_dir / f"{name}.png").write_bytes(_encode(".png", label))

    return _generate(Path(root), params, write)


def _ignore_borders(label: np.ndarray, width: int) -> np.ndarray:
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    edge = cv2.dilate(label, kernel) != cv2.erode(label, kernel)
    out = label.copy()
    out[edge] = 255
    return out


# --------------------------------------------------------------------------- caching


def dataset_info(root: str | os.PathLike) -> dict | None:
    """The generation parameters stored in ``root``'s marker, or None if it has none."""
    marker = Path(root) / MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def _is_current(root: Path, params: dict) -> bool:
    """True if ``root`` holds this generation; False if absent or empty; else raise."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise DatasetExistsError(f"{root} exists and is not a directory; not overwriting it")
    info = dataset_info(root)
    if info is None:
        if not any(root.iterdir()):
            return False
        raise DatasetExistsError(
            f"{root} exists and was not written by mmdelta's generator (no {MARKER}); "
            "not overwriting it: pick another root"
        )
    if info != params:
        diff = sorted(k for k in set(info) | set(params) if info.get(k) != params.get(k))
        detail = ", ".join(f"{k}: {info.get(k)!r} there, {params.get(k)!r} asked" for k in diff)
        raise DatasetExistsError(
            f"{root} holds a generated dataset with other parameters ({detail}); "
            "delete it or pick another root"
        )
    return True


def _generate(root: Path, params: dict, write: Callable[[Path], None]) -> str:
    params = json.loads(json.dumps(params))  # the form it takes in the marker
    if _is_current(root, params):
        return str(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        write(tmp)
        (tmp / MARKER).write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(tmp, root)  # replaces an empty directory, fails on a non-empty one
        except OSError:
            if _is_current(root, params):  # a concurrent call finished first
                return str(root)
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return str(root)
