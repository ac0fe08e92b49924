"""ONNX export of merged (plain) mmseg segmenters and the tensor part of mmdet detectors.

What goes into the graph (``torch.onnx.export`` with ``dynamo=True``, the torch.export-based
exporter that is torch 2.14's default; no mmdeploy, no mmcv ops):

* **segmenter** (mmseg ``EncoderDecoder`` and subclasses, ``test_cfg.mode='whole'``): image
  batch ``img`` ``(N, 3, H, W)`` → ``seg_logits`` ``(N, C, H, W)`` float (the decode head's
  logits resized to the input size, as ``EncoderDecoder.inference`` computes them) and
  ``seg_labels`` ``(N, H, W)`` int64 (``argmax`` over classes; ``sigmoid > threshold`` for
  a one-channel binary head). Padding removal and the resize to the original image size
  stay in PyTorch (:func:`predict_from_onnx`), as does slide inference (refused).
* **two-stage detector** (``rpn_head``): ``img`` → the neck features ``feat_{l}`` and the
  RPN's ``rpn_cls_score_{l}``, ``rpn_bbox_pred_{l}`` for each level ``l``. Proposals and
  the RoI head run in PyTorch from these (:func:`predict_from_onnx`).
* **one-stage detector** (``bbox_head``, e.g. RetinaNet, FCOS): ``img`` → the dense head's
  outputs per level, named after ``predict_by_feat``'s arguments (``cls_score_{l}``,
  ``bbox_pred_{l}``, ``score_factor_{l}`` …). Decoding + NMS stay in PyTorch.

Input: with ``fold_preprocess=True`` (default) the model's ``data_preprocessor`` channel
swap (``bgr_to_rgb``) and normalisation ``(x - mean) / std`` are in the graph, so ``img`` is
the *raw* float batch in the channel order the data pipeline loads (BGR for OpenMMLab's
``LoadImageFromFile``), 0–255. Padding is not in the graph: give images already at the
padded size, padded with the value that normalises to the preprocessor's pad value
(:func:`onnx_inputs` does exactly that from a pipeline batch). With
``fold_preprocess=False`` ``img`` is the data preprocessor's output.

Shapes: batch, height and width are dynamic by default (``dynamic=True``); ``dynamic=False``
fixes them to ``input_shape``. The file is self-contained (weights inside, no external data
file; protobuf limits that to models under 2 GB) and carries a JSON description of its
outputs in the metadata key ``mmdelta.onnx``.

A model carrying an mmdelta patch is refused: merge it first (``mmdelta.merge_patch``), which
makes the graph a plain upstream model with the patch in its weights.

Exporter: ``dynamo=True`` (opset 20 by default) exports these models with dynamic shapes and
without custom ops. The TorchScript exporter (``dynamo=False``) also works for them and is
several times faster, but torch 2.14 deprecates it (``DeprecationWarning``), so it is not
used. Accuracy (onnxruntime CPU vs PyTorch, float32, tiny R-18 models): max abs error
~1e-6 of each output's max |value|; :func:`check_onnx` measures it for a given model.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..fileio import write_atomic
from ..patching.slot import iter_slots
from ..patching.state import active_patch, patch_names, resolve_patch_name

logger = logging.getLogger(__name__)

#: metadata key of the JSON output description stored in the ONNX file
METADATA_KEY = "mmdelta.onnx"
INPUT_NAME = "img"
#: weights at or above this size do not fit a single protobuf file (2 GiB, with a margin)
SINGLE_FILE_LIMIT = 2**31 - 2**26


class PatchedModelError(ValueError):
    """The model still carries an mmdelta patch; ONNX export needs a merged, plain model."""


def _refuse_patched(model: nn.Module) -> None:
    names = patch_names(model)
    slots = [path for path, _ in iter_slots(model)]
    if not names and not slots:
        return
    active = active_patch(model)
    try:
        which = resolve_patch_name(model, None, "export")
    except (KeyError, ValueError):  # no patch state left, or several and none active
        which = "NAME"
    raise PatchedModelError(
        f"the model still carries mmdelta patch(es) {names} (active: {active!r}, "
        f"{len(slots)} patched layers); ONNX export needs a plain model: export "
        f"mmdelta.merge_patch(model, {which!r}) instead (it folds the patch into the "
        "weights; tools/export_onnx.py does this for you). For the base model without "
        "its patch, export a model built without it (mmdelta.apis.init_base_model)"
    )


# ------------------------------------------------------------------- the exported module


def _preprocess_params(preprocessor: nn.Module) -> dict:
    """Channel swap, mean, std (``(C, 1, 1)``) and pad value of an mmengine / mmdet / mmseg
    data preprocessor."""
    swap = getattr(preprocessor, "_channel_conversion", None)
    if swap is None:
        swap = getattr(preprocessor, "channel_conversion", None)  # mmseg's name
    normalize = getattr(preprocessor, "_enable_normalize", None)
    if swap is None or normalize is None:
        raise TypeError(
            f"cannot fold {type(preprocessor).__name__} into the ONNX graph (not an mmengine "
            "ImgDataPreprocessor / mmseg SegDataPreProcessor): pass fold_preprocess=False "
            "and feed the preprocessor's output"
        )
    pad = getattr(preprocessor, "pad_value", getattr(preprocessor, "pad_val", 0))
    mean = preprocessor.mean.detach().clone() if normalize else None
    std = preprocessor.std.detach().clone() if normalize else None
    return dict(swap=bool(swap), mean=mean, std=std, pad=float(pad))


def _model_kind(model: nn.Module) -> str:
    if hasattr(model, "decode_head") and hasattr(model, "encode_decode"):
        mode = getattr(getattr(model, "test_cfg", None), "get", lambda k, d=None: d)("mode")
        if mode not in (None, "whole"):
            raise ValueError(
                f"the segmenter's test_cfg.mode is {mode!r}: only whole-image inference is "
                "exported; set model.test_cfg.mode = 'whole' to export it (predictions then "
                "differ from the sliding-window ones)"
            )
        return "segmenter"
    if getattr(model, "rpn_head", None) is not None and hasattr(model, "roi_head"):
        return "two_stage"
    if getattr(model, "bbox_head", None) is not None and hasattr(model, "extract_feat"):
        if not callable(getattr(model.bbox_head, "predict_by_feat", None)):
            raise TypeError(f"{type(model.bbox_head).__name__} has no predict_by_feat")
        return "single_stage"
    raise TypeError(
        f"cannot export {type(model).__name__}: supported are mmseg EncoderDecoder segmenters, "
        "mmdet two-stage detectors (rpn_head + roi_head) and one-stage detectors with a dense "
        "bbox_head"
    )


def _dense_head(model: nn.Module, kind: str) -> nn.Module:
    return model.rpn_head if kind == "two_stage" else model.bbox_head


class OnnxGraph(nn.Module):
    """What is exported: ``forward(img (N, 3, H, W)) -> tuple of tensors`` named by
    :meth:`output_names`. ``model`` is used, not copied (its weights are the graph's)."""

    def __init__(self, model: nn.Module, fold_preprocess: bool = True):
        super().__init__()
        self.kind = _model_kind(model)
        self.model = model
        self.fold_preprocess = fold_preprocess
        self.pre = _preprocess_params(model.data_preprocessor) if fold_preprocess else None
        if self.pre is not None and self.pre["mean"] is not None:
            self.register_buffer("mean", self.pre["mean"], persistent=False)
            self.register_buffer("std", self.pre["std"], persistent=False)
        else:
            self.mean = self.std = None

    def normalize(self, img: torch.Tensor) -> torch.Tensor:
        """The data preprocessor's channel swap and normalisation (same operations)."""
        if self.pre is None:
            return img
        if self.pre["swap"]:
            img = img[:, [2, 1, 0], ...]
        if self.mean is not None:
            img = (img - self.mean) / self.std
        return img

    def trace_structure(self, img: torch.Tensor) -> None:
        """Runs a detector once on ``img`` to learn its levels and output groups (needed
        before :meth:`groups` / :meth:`output_names`); nothing to learn for a segmenter."""
        if self.kind == "segmenter":
            return
        head = _dense_head(self.model, self.kind)
        with torch.no_grad():
            feats = self.model.extract_feat(self.normalize(img))
            outs = head(feats)
        if not isinstance(outs, tuple | list) or not all(
            isinstance(g, tuple | list) and g and all(isinstance(t, torch.Tensor) for t in g)
            for g in outs
        ):
            raise TypeError(
                f"{type(head).__name__}.forward does not return per-level lists of tensors; "
                "it cannot be exported as a dense head"
            )
        self._structure = dict(feats=len(feats), groups=[len(g) for g in outs])

    def groups(self) -> list[tuple[str, int]]:
        """Output groups ``(name, number of levels)`` in output order; a detector's groups
        are named after its head's ``predict_by_feat`` arguments (``cls_scores`` →
        ``cls_score``)."""
        if self.kind == "segmenter":
            return [("seg_logits", 1), ("seg_labels", 1)]
        if not hasattr(self, "_structure"):
            raise RuntimeError("call trace_structure(img) first")
        head = _dense_head(self.model, self.kind)
        params = [
            p.name
            for p in inspect.signature(head.predict_by_feat).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        counts = self._structure["groups"]
        if len(params) < len(counts):
            raise TypeError(
                f"{type(head).__name__}.forward returns {len(counts)} groups but "
                f"predict_by_feat takes only {params} before its keyword arguments"
            )
        groups = [(name.removesuffix("s"), n) for name, n in zip(params, counts, strict=False)]
        if self.kind == "two_stage":
            return [("feat", self._structure["feats"])] + [(f"rpn_{n}", c) for n, c in groups]
        return groups

    def output_names(self) -> list[str]:
        """``seg_logits``, ``seg_labels`` / ``{group}_{level}``."""
        if self.kind == "segmenter":
            return [name for name, _ in self.groups()]
        return [f"{name}_{i}" for name, count in self.groups() for i in range(count)]

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.normalize(img)
        model = self.model
        if self.kind == "segmenter":
            # a torch.Size img_shape: decode_head.predict resizes to the (dynamic) input size
            # (only the first image's meta is read; one entry keeps the batch axis symbolic)
            logits = model.encode_decode(x, [dict(img_shape=x.shape[2:])])
            if logits.shape[1] > 1:
                labels = logits.argmax(dim=1)
            else:
                threshold = model.decode_head.threshold
                labels = (logits.sigmoid() > threshold).squeeze(1).to(torch.int64)
            return logits, labels
        feats = model.extract_feat(x)
        outs = _dense_head(model, self.kind)(feats)
        flat = [t for group in outs for t in group]
        return (*feats, *flat) if self.kind == "two_stage" else tuple(flat)


# ------------------------------------------------------------------------------- export


def export_onnx(
    model: nn.Module,
    out_path: str | os.PathLike,
    input_shape: Sequence[int] = (1, 3, 512, 512),
    *,
    opset: int | None = None,
    dynamic: bool = True,
    fold_preprocess: bool = True,
    overwrite: bool = False,
    metadata: dict | None = None,
) -> Path:
    """Exports a plain (merged) segmenter / detector to one self-contained ONNX file.

    Args:
        model: an mmseg segmenter or mmdet detector without any mmdelta patch (merge it
            first: ``mmdelta.merge_patch``). Put in eval mode for the export, then restored.
        out_path: the ``.onnx`` file, written atomically (temporary file + rename).
        input_shape: ``(N, 3, H, W)`` of the example input the graph is traced with.
        opset: ONNX opset (``None``: the exporter's default, 20 in torch 2.14).
        dynamic: batch, height and width dynamic (else fixed to ``input_shape``).
        fold_preprocess: channel swap + normalisation in the graph (input: raw images).
        overwrite: replace an existing file.
        metadata: extra JSON-serialisable values stored under ``mmdelta.onnx``.

    Returns the path. Raises :class:`PatchedModelError` for a patched model,
    ``FileExistsError`` without ``overwrite``, ``TypeError`` / ``ValueError`` for models it
    cannot export (named in the message).
    """
    _refuse_patched(model)
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass overwrite=True (--force) to replace it")
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if weight_bytes >= SINGLE_FILE_LIMIT:
        raise ValueError(
            f"the model's weights take {weight_bytes / 2**30:.2f} GiB: a single-file ONNX "
            "(protobuf) holds under 2 GiB; export it with torch.onnx.export(..., "
            "external_data=True) instead"
        )
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (N, 3, H, W), got {tuple(input_shape)}")
    graph = OnnxGraph(model, fold_preprocess).eval()
    device = next(model.parameters()).device
    shape = tuple(input_shape)
    example = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
    if fold_preprocess:
        example = example * 255
    was_training = model.training
    model.eval()
    try:
        graph.trace_structure(example)
        names = graph.output_names()
        kwargs = {}
        if dynamic:
            dim = torch.export.Dim.DYNAMIC
            kwargs["dynamic_shapes"] = ({0: dim, 2: dim, 3: dim},)
        with torch.no_grad():
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=names,
                opset_version=opset,
                external_data=False,
                verbose=False,
                **kwargs,
            )
    finally:
        model.train(was_training)
    dims = list(program.model.graph.inputs[0].shape)
    axes = {"batch": dims[0], "height": dims[2], "width": dims[3]}
    static = [axis for axis, d in axes.items() if isinstance(d, int)]
    if dynamic and static:
        logger.warning("ONNX export: torch.export fixed the %s axes of the input", static)
    pre = graph.pre or {}
    info = dict(
        kind=graph.kind,
        input=INPUT_NAME,
        input_shape=list(input_shape),
        dynamic_axes=[axis for axis in axes if axis not in static],
        fold_preprocess=fold_preprocess,
        channel_swap=bool(pre.get("swap")),
        mean=None if pre.get("mean") is None else pre["mean"].flatten().tolist(),
        std=None if pre.get("std") is None else pre["std"].flatten().tolist(),
        pad_value=pre.get("pad"),
        groups=graph.groups(),
        outputs=names,
        **(metadata or {}),
    )
    program.model.metadata_props[METADATA_KEY] = json.dumps(info)
    return write_atomic(out_path, lambda tmp: program.save(tmp, external_data=False))


# ------------------------------------------------------------------------------ runtime


def onnx_info(path: str | os.PathLike) -> dict:
    """The ``mmdelta.onnx`` metadata of an exported file (kind, outputs, preprocessing)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{path} was not written by mmdelta.deploy.export_onnx (no metadata)")
    return json.loads(props[METADATA_KEY])


def onnx_session(path: str | os.PathLike):
    """An onnxruntime ``InferenceSession`` on the CPU (``CPUExecutionProvider``)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(session_or_path, img: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
    """Runs the exported graph on ``img`` ``(N, 3, H, W)`` float32; output name -> tensor,
    in the graph's output order."""
    session = (
        onnx_session(session_or_path)
        if isinstance(session_or_path, str | Path)
        else session_or_path
    )
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().numpy()
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {INPUT_NAME: np.ascontiguousarray(img, dtype=np.float32)})
    return {n: torch.from_numpy(v) for n, v in zip(names, values, strict=True)}


def onnx_inputs(
    model: nn.Module, batch: dict, fold_preprocess: bool = True
) -> tuple[torch.Tensor, list]:
    """The ONNX input for a pipeline batch (``dict(inputs=[(3, H, W) …], data_samples=…)``)
    and the data samples (metainfo set by the model's data preprocessor).

    ``fold_preprocess=True``: raw float images, channel order as loaded, stacked at the
    preprocessor's padded size; the padding holds ``mean + pad_value · std`` (raw), which
    the graph normalises to the preprocessor's pad value. Else: the preprocessor's output.
    """
    with torch.no_grad():
        data = model.data_preprocessor(batch, False)
    samples = data["data_samples"]
    if not fold_preprocess:
        return data["inputs"], samples
    pre = _preprocess_params(model.data_preprocessor)
    n, c, h, w = data["inputs"].shape
    fill = torch.full((c,), pre["pad"])
    if pre["mean"] is not None:
        fill = pre["mean"].flatten().cpu() + pre["pad"] * pre["std"].flatten().cpu()
    if pre["swap"]:
        fill = fill[[2, 1, 0]]
    img = fill.view(1, c, 1, 1).expand(n, c, h, w).clone()
    for i, raw in enumerate(batch["inputs"]):
        img[i, :, : raw.shape[-2], : raw.shape[-1]] = raw.float()
    return img, samples


def _regroup(outputs: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    groups: dict[str, list[torch.Tensor]] = {}
    for name, value in outputs.items():
        stem, _, level = name.rpartition("_")
        if not level.isdigit():
            raise ValueError(f"unexpected ONNX output name {name!r} (want NAME_LEVEL)")
        groups.setdefault(stem, []).append(value)
    return groups


def predict_from_onnx(
    model: nn.Module, outputs: dict[str, torch.Tensor], data_samples: list, rescale: bool = True
) -> list:
    """The model's ``predict()`` result computed from the ONNX outputs (:func:`run_onnx`):
    the exported tensors replace backbone, neck and dense head; the rest (mmseg's crop and
    resize, the detector's box decoding, NMS, RoI head) is the model's own PyTorch code.

    ``data_samples``: as from :func:`onnx_inputs` (metainfo of the preprocessed batch);
    like ``predict()``, the predictions are written into them and they are returned.
    """
    kind = _model_kind(model)
    device = next(model.parameters()).device
    outputs = {k: v.to(device) for k, v in outputs.items()}
    with torch.no_grad():
        if kind == "segmenter":
            return model.postprocess_result(outputs["seg_logits"], data_samples)
        groups = _regroup(outputs)
        metas = [s.metainfo for s in data_samples]
        if kind == "single_stage":
            results = model.bbox_head.predict_by_feat(
                *groups.values(), batch_img_metas=metas, rescale=rescale
            )
        else:
            feats = tuple(groups.pop("feat"))
            proposals = model.rpn_head.predict_by_feat(
                *groups.values(), batch_img_metas=metas, rescale=False
            )
            results = model.roi_head.predict(feats, proposals, data_samples, rescale=rescale)
        return model.add_pred_to_datasample(data_samples, results)


def check_onnx(
    model: nn.Module, path: str | os.PathLike, inputs: torch.Tensor
) -> dict[str, dict[str, float]]:
    """Runs the file with onnxruntime (CPU) and the same graph in PyTorch on ``inputs``.

    Returns output name -> ``max_abs`` (max |ONNX − PyTorch|), ``rel`` (``max_abs`` over the
    PyTorch tensor's max |value|) and, for integer outputs (label maps), ``mismatched``
    (fraction of differing elements). ``model``: the exported (plain) model.
    """
    info = onnx_info(path)
    graph = OnnxGraph(model, info["fold_preprocess"])
    was_training = model.training
    graph.eval()
    try:
        with torch.no_grad():
            expected = graph(inputs.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
    got = run_onnx(path, inputs)
    if len(got) != len(expected):
        raise ValueError(f"{path} has {len(got)} outputs, the model computes {len(expected)}")
    errors = {}
    for (name, g), e in zip(got.items(), expected, strict=True):
        e = e.detach().cpu()
        if g.shape != e.shape:
            raise ValueError(f"{path}: output {name} {tuple(g.shape)} vs {tuple(e.shape)}")
        diff = (g.double() - e.double()).abs()
        scale = e.double().abs().max().item()
        max_abs = diff.max().item()
        rel = max_abs / scale if scale else (0.0 if max_abs == 0 else float("inf"))
        err = dict(max_abs=max_abs, rel=rel)
        if not e.is_floating_point():
            err["mismatched"] = (g != e).double().mean().item()
        errors[name] = err
    return errors
