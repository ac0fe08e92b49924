"""Serving many patches from one base: :class:`MultiPatchInferencer`.

The base model is built and loaded once; every patch file is loaded onto it under its own
name (:func:`~mmdelta.patching.load_patch`, inactive). Each image is preprocessed once with
the upstream Inferencer's pipeline (mmdet ``DetInferencer`` / mmseg ``MMSegInferencer``:
``LoadImageFromFile`` → ``InferencerLoader``, annotations dropped) and run through the base
(no patch active: the base bit for bit) and through every patch in turn
(``set_active_patch``), batch size 1, as ``Inferencer.forward`` does (``model.test_step``
under ``torch.no_grad``). Predictions therefore equal those of an upstream Inferencer on
:func:`~mmdelta.apis.init_base_model` (base) / :func:`~mmdelta.apis.init_patched_model`
(each patch), bitwise.

With ``out_dir`` it writes, atomically (``mmdelta.fileio``) and only under ``out_dir``:

* ``vis/<image stem>.png``: the image under the base's and each patch's predictions side
  by side, each panel titled with the model's name and drawn with its own class names
  (:func:`mmdelta.visualization.side_by_side`);
* ``results.json``: per image, per model, the predictions (detection: boxes, scores,
  labels and class names above ``score_thr``; segmentation: per-class pixel counts and
  the path of the label map);
* segmentation only: ``label_maps/<image stem>/base.png`` and ``patch_<name>.png``, the
  predicted class ids as a lossless 8-bit (16-bit when > 255 classes) PNG, original size.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import torch
from mmengine.config import Config

from ..datasets.images import list_images
from ..fileio import write_bytes_atomic, write_text_atomic
from ..patching import active_patch, load_patch, patch_classes, remove_patch, set_active_patch
from ..patching.files import read_patch_file
from ..visualization import side_by_side  # the one drawing routine, shared with the demo
from .batching import MixedBatchRunner
from .inference import inferencer_class, init_base_model

BASE = "base"  # the base model's key in results (patches are under "patches")


class ServingError(ValueError):
    """Inputs :class:`MultiPatchInferencer` refuses: duplicate patch names, outputs that
    would overwrite an input (no images: ``mmdelta.datasets.images.NoImagesError``)."""


def _named_patches(patches) -> list[tuple[str, Path]]:
    """``[(name, file)]`` from a list of files (each named as it was saved) and/or
    ``(name, file)`` pairs, or a ``{name: file}`` mapping; every file exists, no two names
    are equal."""
    if isinstance(patches, str | os.PathLike):
        patches = [patches]
    if isinstance(patches, Mapping):
        pairs = [(str(name), Path(path)) for name, path in patches.items()]
    else:  # a file, or a (name, file) pair
        pairs = [
            (str(p[0]), Path(p[1])) if isinstance(p, tuple) else (None, Path(p)) for p in patches
        ]
    named = []
    for name, path in pairs:
        if not path.is_file():
            raise FileNotFoundError(f"patch file {str(path)!r} does not exist")
        if name is None:
            metadata, _ = read_patch_file(path)  # PatchFileError for a file that is no patch
            cfg = json.loads(metadata["mmdelta.cfg"])
            name = metadata.get("mmdelta.name", cfg.get("name"))
        named.append((name, path))
    seen: dict[str, Path] = {}
    for name, path in named:
        if name in seen:
            raise ServingError(
                f"two patches are named {name!r}: {seen[name]} and {path}; give them distinct "
                f"names (Python: patches={{'{name}_a': ..., '{name}_b': ...}}; tools/infer.py: "
                f"--patch {name}_a={seen[name]} --patch {name}_b={path})"
            )
        seen[name] = path
    return named


def _base_meta(model, cfg: Config) -> dict:
    """The base's class names (and palette): the checkpoint's ``dataset_meta``, else the
    config's ``delta_patch.base_classes``, else its test set's ``metainfo`` (plain
    configs only: a patch config's test set is the patch's)."""
    meta = getattr(model, "dataset_meta", None)
    if meta and meta.get("classes"):
        return dict(meta)
    patch_cfg = cfg.get("delta_patch") or {}
    if patch_cfg.get("base_classes"):
        return {"classes": tuple(patch_cfg["base_classes"])}
    if not patch_cfg:
        metainfo = cfg.get("test_dataloader", {}).get("dataset", {}).get("metainfo") or {}
        if metainfo.get("classes"):
            return dict(metainfo)
    return {"classes": None}  # unknown: labels are written as "class i"


def _class_name(classes, label: int) -> str:
    return str(classes[label]) if classes is not None and label < len(classes) else f"class {label}"


class MultiPatchInferencer:
    """One base model (loaded once) serving several patches, in the style of mmdet's
    ``DetInferencer`` / mmseg's ``MMSegInferencer``.

    Args:
        config: the mmdet / mmseg config file (or ``Config``) of the base model; a patch
            config (with ``delta_patch``) works too, its ``delta_patch`` key is ignored.
        checkpoint: the base checkpoint (every key checked, see ``init_base_model``).
        patches: patch files, each loaded under the name it was saved with, and/or
            ``(name, file)`` pairs, or ``{name: file}``. Patches may carry their own class
            sets; the same file may be loaded under two names.
        device: where the model runs.

    Attributes:
        model: the base with every patch loaded (none active between calls).
        inferencer: the upstream Inferencer around ``model`` (its pipeline is used).
        task: ``"det"`` or ``"seg"``; ``patches``: ``{name: file}`` in loading order;
        metas: ``{"base": meta, name: meta}``, each model's own ``classes`` (and palette).

    Raises:
        FileNotFoundError: config, checkpoint or a patch file missing (named).
        ServingError: two patches with the same name.
        PatchFileError: a file that is no patch, or a patch for another base.
        CheckpointError: a checkpoint that does not fit the config's model.
    """

    def __init__(self, config, checkpoint, patches, device: str = "cpu"):
        if isinstance(config, str | os.PathLike):
            if not Path(config).is_file():
                raise FileNotFoundError(f"config file {str(config)!r} does not exist")
            config = Config.fromfile(str(config))
        else:
            config = copy.deepcopy(config)
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
        named = _named_patches(patches)
        scope = config.get("default_scope", "mmdet")
        Inferencer = inferencer_class(config)
        self.task = "det" if scope == "mmdet" else "seg"
        self.config = config.filename if getattr(config, "filename", None) else None
        self.checkpoint = str(checkpoint)

        model = init_base_model(config, str(checkpoint), device="cpu")
        self.metas = {BASE: _base_meta(model, config)}
        model.dataset_meta = dict(self.metas[BASE])  # what the upstream visualiser reads
        self.model = model
        self.patches: dict[str, str] = {}
        for name, path in named:
            self.add_patch(name, path)
        set_active_patch(model, None)
        model = model.to(device).eval()

        class _Served(Inferencer):
            def _init_model(self, cfg, weights, device="cpu"):
                return model

        self.inferencer = _Served(model=config, weights=None, device=device)
        self.model = self.inferencer.model

    # ------------------------------------------------------------------ patches

    def add_patch(self, name: str, path) -> None:
        """Loads patch file ``path`` under ``name`` (inactive). On any error (a name in use,
        a file that is no patch or was built for another base) nothing changes."""
        if name == BASE or name in self.patches:
            raise ServingError(f"a patch named {name!r} is loaded already; unload it first")
        load_patch(self.model, path, name=name, activate=False)
        own = patch_classes(self.model, name)
        self.metas[name] = {"classes": tuple(own)} if own else dict(self.metas[BASE])
        self.patches[name] = str(path)

    def patch_entries(self) -> dict[str, dict]:
        """Patch name -> ``{"file", "classes", "own_classes"}`` for every loaded patch."""
        return {
            name: {
                "file": file,
                "classes": _listed(self.metas[name]["classes"]),
                "own_classes": patch_classes(self.model, name) is not None,
            }
            for name, file in dict(self.patches).items()
        }

    def remove_patch(self, name: str) -> None:
        """Unloads patch ``name`` (``KeyError`` for a name that is not loaded)."""
        if name not in self.patches:
            raise KeyError(f"no patch {name!r} is loaded; loaded: {list(self.patches)}")
        remove_patch(self.model, name)
        del self.patches[name], self.metas[name]

    # ------------------------------------------------------------------ inference

    def inputs(self, image) -> dict:
        """The Inferencer's pipeline on one image (a path or an ``HxWx3`` BGR ``uint8``
        array), without collating: what ``collate`` batches."""
        return self.inferencer.pipeline(image if isinstance(image, np.ndarray) else str(image))

    def collate(self, items: list) -> dict:
        """``{'inputs': [CHW uint8], 'data_samples': [sample]}``, what ``test_step`` takes."""
        return self.inferencer.collate_fn(list(items))

    def _batch(self, image: Path) -> dict:
        """One image through the Inferencer's pipeline and collate."""
        return self.collate([self.inputs(image)])

    def summary(self, sample, key: str, score_thr: float = 0.3) -> dict:
        """A prediction as JSON-ready values: detection boxes, scores, labels and class names
        above ``score_thr``; segmentation per-class pixel counts (``key``: ``"base"`` or a
        patch name, whose class names are used)."""
        return self._summary(sample, self.metas[key], score_thr, None)

    def predict(
        self, images, chunk: int = 8, patches=None, strategy: str = "auto"
    ) -> list[dict] | list:
        """Predictions only. Without ``patches``: per image ``{"base": sample, "patches":
        {name: sample}}`` (every model on every image). With ``patches`` (one name or
        ``None`` = the base per image): per image the sample of its own model, batches of
        ``chunk`` run by ``strategy`` (:mod:`mmdelta.apis.batching`: ``group`` answers are
        bitwise the single-image answers, ``route`` ones within float32 batching).

        Samples are ``DetDataSample`` with ``pred_instances`` in original-image pixels /
        ``SegDataSample`` with ``pred_sem_seg`` ``[1, H, W]``. Not thread-safe (one model,
        one selection): serve concurrent callers with :class:`~mmdelta.apis.PatchEngine`.
        The selection is restored afterwards."""
        paths = list_images(images) if patches is None else list(images)
        if patches is None:
            return self._predict_all(paths, chunk)
        patches = list(patches)
        if len(patches) != len(paths):
            raise ServingError(f"{len(paths)} images but {len(patches)} patch names")
        unknown = sorted({p for p in patches if p is not None and p not in self.patches})
        if unknown:
            raise ServingError(f"no patch {unknown} is loaded; loaded: {list(self.patches)}")
        runner = MixedBatchRunner(self, strategy)
        saved, out = active_patch(self.model), []
        try:
            for start in range(0, len(paths), chunk):
                part = slice(start, start + chunk)
                items = [
                    (self.inputs(p), n) for p, n in zip(paths[part], patches[part], strict=True)
                ]
                out += [sample for sample, _ in runner.run(items)]
        finally:
            set_active_patch(self.model, saved)
        return out

    @torch.no_grad()
    def _predict_all(self, paths: list, chunk: int) -> list[dict]:
        """Per image ``{"base": sample, "patches": {name: sample}}``: images ``chunk`` at a
        time, every model over a chunk before the next (a patch's folded weights are built
        once per chunk)."""
        out: list[dict] = []
        saved = active_patch(self.model)
        try:
            for start in range(0, len(paths), chunk):
                batches = [self._batch(p) for p in paths[start : start + chunk]]
                rows = [{BASE: None, "patches": {}} for _ in batches]
                for name in [None, *self.patches]:
                    set_active_patch(self.model, name)
                    for row, batch in zip(rows, batches, strict=True):
                        (sample,) = self.model.test_step(copy.deepcopy(batch))
                        if name is None:
                            row[BASE] = sample
                        else:
                            row["patches"][name] = sample
                out += rows
        finally:
            set_active_patch(self.model, saved)
        return out

    def __call__(
        self,
        images,
        out_dir: str | os.PathLike | None = None,
        score_thr: float = 0.3,
        chunk: int = 8,
    ) -> dict:
        """Runs every image through the base and each patch; with ``out_dir``, writes the
        pictures, label maps (seg) and ``results.json`` described in the module docstring.

        Returns:
            ``{"results": <the JSON content>, "predictions": [per image {"base": sample,
            "patches": {name: sample}}], "files": {"json": path | None, "pictures":
            [path per image], "label_maps": [paths]}}``.
        """
        paths = list_images(images)
        out = Path(out_dir) if out_dir is not None else None
        pictures, label_maps = self._output_paths(paths, out)
        predictions = self.predict(paths, chunk=chunk)

        records, written_maps = [], []
        for i, (path, row) in enumerate(zip(paths, predictions, strict=True)):
            record = {"image": str(path), "picture": None, BASE: None, "patches": {}}
            models = [(BASE, row[BASE]), *row["patches"].items()]
            for key, sample in models:
                map_path = label_maps[i][key] if label_maps else None
                summary = self._summary(sample, self.metas[key], score_thr, map_path)
                if map_path is not None:
                    written_maps.append(str(map_path))
                if key == BASE:
                    record[BASE] = summary
                else:
                    record["patches"][key] = summary
            if pictures:
                panels = [(self._title(key), sample, self.metas[key]) for key, sample in models]
                record["picture"] = side_by_side(
                    path, panels, pictures[i], task=self.task, score_thr=score_thr
                )
            records.append(record)

        results = {
            "task": self.task,
            "config": self.config,
            "checkpoint": self.checkpoint,
            "score_thr": score_thr if self.task == "det" else None,
            "models": {
                BASE: {"classes": _listed(self.metas[BASE]["classes"])},
                "patches": self.patch_entries(),
            },
            "images": records,
        }
        json_path = None
        if out is not None:
            json_path = str(
                write_text_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
            )
        return {
            "results": results,
            "predictions": predictions,
            "files": {
                "json": json_path,
                "pictures": [str(p) for p in pictures],
                "label_maps": written_maps,
            },
        }

    # ------------------------------------------------------------------ outputs

    def _title(self, key: str) -> str:
        classes = self.metas[key]["classes"]
        count = f" ({len(classes)} classes)" if classes else ""
        return f"base{count}" if key == BASE else f"patch {key}{count}"

    def _output_paths(self, paths: list[Path], out: Path | None):
        """Picture per image (``out/vis/<stem>.png``, ``_1``, ``_2``… for repeated stems)
        and, for seg, label-map files per image and model; none of them an input image."""
        if out is None:
            return [], []
        stems: dict[str, int] = {}
        pictures, label_maps = [], []
        for path in paths:
            count = stems.get(path.stem, 0)
            stems[path.stem] = count + 1
            stem = path.stem if count == 0 else f"{path.stem}_{count}"
            pictures.append(out / "vis" / f"{stem}.png")
            if self.task == "seg":
                folder = out / "label_maps" / stem
                maps = {BASE: folder / "base.png"}
                maps.update({name: folder / f"patch_{name}.png" for name in self.patches})
                label_maps.append(maps)
        inputs = {p.resolve() for p in paths}
        targets = [*pictures, out / "results.json", *(m for d in label_maps for m in d.values())]
        for target in targets:
            if target.resolve() in inputs:
                raise ServingError(
                    f"writing {target} would overwrite an input image; choose another out_dir"
                )
        return pictures, label_maps

    def _summary(self, sample, meta: Mapping, score_thr: float, map_path: Path | None) -> dict:
        classes = meta.get("classes")
        if self.task == "det":
            pred = sample.pred_instances
            keep = pred.scores > score_thr  # what the picture draws
            labels = [int(v) for v in pred.labels[keep]]
            return {
                "bboxes": [[float(v) for v in box] for box in pred.bboxes[keep]],
                "scores": [float(v) for v in pred.scores[keep]],
                "labels": labels,
                "label_names": [_class_name(classes, v) for v in labels],
                "below_thr": int((~keep).sum()),
            }
        seg = sample.pred_sem_seg.data.reshape(sample.pred_sem_seg.data.shape[-2:]).cpu()
        counts = torch.bincount(seg[seg != 255].reshape(-1).long())
        pixels = {_class_name(classes, i): int(n) for i, n in enumerate(counts) if n > 0}
        summary = {"shape": list(seg.shape), "pixels": pixels, "label_map": None}
        if map_path is not None:
            dtype = np.uint8 if int(seg.max()) < 256 else np.uint16
            ok, data = cv2.imencode(".png", seg.numpy().astype(dtype))
            if not ok:
                raise RuntimeError(f"could not encode the label map {map_path}")
            summary["label_map"] = str(write_bytes_atomic(map_path, data.tobytes()))
        return summary


def _listed(classes) -> list[str] | None:
    return None if classes is None else [str(c) for c in classes]
