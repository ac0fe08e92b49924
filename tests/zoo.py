"""The zoo walk: a deterministic sample of the installed mmdet / mmseg model zoo, checked
with the default Δ patch (``tests/test_zoo.py``).

Sampling (at collection time, no model is built): config files whose name mentions a
ResNet / ResNeXt / ConvNeXt backbone (``r18``, ``r50``, ``r101``, ``x101``, ``convnext``)
are split into pools by a filename hint, each pool is sorted by the sha1 of
``<package>/<relative path>`` and its first ``PARSE_PER_POOL`` configs are loaded. The
family is then decided from the loaded ``model.backbone`` (type, depth, groups), and each
family's quota is filled in sha1 order: first one config per required feature (caffe style,
DCN, plugins), then one per new model kind (detector type / decode head), then one per new
(kind, architecture), then anything.

:func:`check` runs the real architecture, randomly initialised. Only settings that are not
part of the architecture are changed (:func:`model_cfg`): every ``Pretrained`` init and
``pretrained=<path>`` is dropped (nothing is downloaded; a checkpoint load raises), SyncBN is
reverted to BN after the build (as mmengine's runner does on CPU), proposal / detection
counts and RoI sampler sizes are capped at ``PROPOSAL_CAP``, training-time batch
augmentations (resizes / pads to 1024 px and more) are dropped, and mmseg's training pad to
the crop size becomes a pad to a multiple of 32. Inputs are two images of the first size in
``SIZES`` the unpatched model runs at; outputs are ``mode='tensor'`` ones, or every tensor
of ``mode='predict'`` where the unpatched ``mode='tensor'`` is broken upstream.
"""

import copy
import hashlib
import importlib.util
import itertools
import logging
import re
import time
import traceback
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: test image sides (two images per batch): the first one the unpatched model runs at is
#: used (mmcv's CPU deformable conv needs 3x3 maps at stride 32, i.e. more than 64 pixels)
SIZES = (64, 128)
PROPOSAL_CAP = 8  # proposals / detections per image and sampled RoIs (not structural)
#: torch threads while checking: on the shared 2-core machine one thread is several times
#: faster than two (OpenMP threads spin-wait for each other when the cores are busy)
THREADS = 1
NAME_FILTER = re.compile(r"r18|r50|r101|x101|convnext")
SCOPES = ("mmdet", "mmseg")

#: family -> (sample quota, features of which at least one sampled config must have)
FAMILIES = {
    "mmdet-ResNet": (10, ("caffe", "dcn", "plugins")),
    "mmdet-ResNeXt": (7, ()),
    "mmdet-ConvNeXt": (5, ()),
    "mmseg-ResNetV1c": (8, ()),
    "mmseg-ResNet": (6, ()),
    "mmseg-ConvNeXt": (5, ()),
}
#: configs loaded per filename-hint pool (``None``: all of them)
PARSE_PER_POOL = {
    "mmdet-ResNet": 12,
    "mmdet-ResNet:dcn": 3,
    "mmdet-ResNet:plugins": 3,
    "mmdet-ResNet:caffe": 3,
    "mmdet-ResNeXt": 12,
    "mmdet-ConvNeXt": None,
    "mmseg-ResNetV1c": 12,
    "mmseg-ResNet": 10,
    "mmseg-ConvNeXt": None,
}


def config_root(scope: str) -> Path:
    """``<package>/.mim/configs`` of the installed wheel (found without importing it)."""
    return Path(importlib.util.find_spec(scope).origin).parent / ".mim" / "configs"


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass(frozen=True)
class ZooConfig:
    scope: str  # the package whose registry builds it: mmdet or mmseg
    rel: str  # path relative to the package's configs folder
    family: str
    kind: str  # detector type, or decode head type(s) for segmenters
    arch: str  # backbone depth / groups / ConvNeXt arch
    features: tuple[str, ...] = ()  # caffe, dcn, plugins

    @property
    def id(self) -> str:
        return f"{self.scope}/{self.rel}"

    @property
    def path(self) -> Path:
        return config_root(self.scope) / self.rel

    @property
    def key(self) -> str:
        return sha1(self.id)


# ---------------------------------------------------------------- sampling (no model built)


def candidates() -> list[tuple[str, str]]:
    """``(scope, relative path)`` of every config whose file name passes ``NAME_FILTER``."""
    found = []
    for scope in SCOPES:
        root = config_root(scope)
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).as_posix()
            if rel.startswith("_base_/") or "__pycache__" in rel:
                continue
            if NAME_FILTER.search(path.name):
                found.append((scope, rel))
    return found


def hint(scope: str, rel: str) -> str:
    """The pool a config is loaded from (a guess from the file name; the family is decided
    from the loaded config)."""
    name = rel.rpartition("/")[2]
    if "convnext" in name:
        return f"{scope}-ConvNeXt"
    if scope == "mmseg":
        plain = re.search(r"r\d+b", name) or rel.startswith(("mask2former/", "maskformer/"))
        return "mmseg-ResNet" if plain else "mmseg-ResNetV1c"
    if "x101" in name:
        return "mmdet-ResNeXt"
    for feature, pattern in (("dcn", r"dconv|dcn"), ("plugins", r"gcb|attn"), ("caffe", "caffe")):
        if re.search(pattern, name):
            return f"mmdet-ResNet:{feature}"
    return "mmdet-ResNet"


def _type(cfg) -> str:
    name = str(cfg.get("type", ""))
    return name.split(".", 1)[1] if name.startswith(("mmdet.", "mmseg.")) else name


def family_of(scope: str, backbone) -> str | None:
    kind = _type(backbone)
    if kind == "mmpretrain.ConvNeXt":
        return f"{scope}-ConvNeXt"
    if scope == "mmdet":
        if kind == "ResNeXt" or (kind == "ResNet" and (backbone.get("groups") or 1) > 1):
            return "mmdet-ResNeXt"
        return "mmdet-ResNet" if kind in ("ResNet", "ResNetV1d") else None
    if kind == "ResNetV1c":
        return "mmseg-ResNetV1c"
    return "mmseg-ResNet" if kind in ("ResNet", "ResNetV1d") else None


def describe(scope: str, rel: str) -> ZooConfig | None:
    """Loads the config and says which family it belongs to (``None``: none of ours, or the
    config does not load)."""
    from mmengine.config import Config

    try:
        cfg = Config.fromfile(str(config_root(scope) / rel), import_custom_modules=False)
    except Exception:
        return None
    model = cfg.get("model") or {}
    backbone = model.get("backbone")
    family = family_of(scope, backbone) if backbone else None
    if family is None:
        return None
    if scope == "mmdet":
        kind = _type(model)
    else:
        heads = model.get("decode_head")
        heads = heads if isinstance(heads, list | tuple) else [heads]
        kind = "+".join(_type(h) for h in heads)
        if _type(model) != "EncoderDecoder":
            kind = f"{_type(model)}({kind})"
    if family.endswith("ConvNeXt"):
        arch = backbone.get("arch")
        arch = arch if isinstance(arch, str) else "custom"
    else:
        arch = f"{_type(backbone)}-{backbone.get('depth')}"
        if (backbone.get("groups") or 1) > 1:
            arch += f"-{backbone.get('groups')}x{backbone.get('base_width')}d"
    features = tuple(
        name
        for name, present in (
            ("caffe", backbone.get("style") == "caffe"),
            ("dcn", bool(backbone.get("dcn"))),
            ("plugins", bool(backbone.get("plugins"))),
        )
        if present
    )
    return ZooConfig(scope, rel, family, kind, arch, features)


def pick(configs: list[ZooConfig], quota: int, required: tuple[str, ...]) -> list[ZooConfig]:
    """Fills ``quota`` from ``configs`` (already in sha1 order), deterministically."""
    chosen: list[ZooConfig] = []
    for feature in required:
        if not any(feature in c.features for c in chosen):
            chosen += [c for c in configs if feature in c.features and c not in chosen][:1]
    rules = (
        lambda c: c.kind not in {x.kind for x in chosen},
        lambda c: (c.kind, c.arch) not in {(x.kind, x.arch) for x in chosen},
        lambda c: True,
    )
    for new in rules:
        for c in configs:
            if len(chosen) < quota and c not in chosen and new(c):
                chosen.append(c)
    return sorted(chosen, key=lambda c: c.key)


def sample() -> tuple[list[ZooConfig], dict[str, int]]:
    """The sampled configs (grouped by family, sha1 order inside a family) and, per family,
    how many of the loaded configs belong to it."""
    pools = defaultdict(list)
    for scope, rel in candidates():
        pools[hint(scope, rel)].append((scope, rel))
    loaded = []
    for pool in sorted(pools):
        items = sorted(pools[pool], key=lambda item: sha1(f"{item[0]}/{item[1]}"))
        for scope, rel in items[: PARSE_PER_POOL.get(pool, 0)]:
            zc = describe(scope, rel)
            if zc is not None:
                loaded.append(zc)
    loaded.sort(key=lambda c: c.key)
    chosen, seen = [], {}
    for family, (quota, required) in FAMILIES.items():
        members = [c for c in loaded if c.family == family]
        seen[family] = len(members)
        chosen += pick(members, quota, required)
    return chosen, seen


# ---------------------------------------------------------------- building and running


def _registry(scope: str):
    if scope == "mmdet":
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    else:
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    return MODELS


def _without_pretrained(init_cfg):
    if isinstance(init_cfg, dict):
        return None if init_cfg.get("type") == "Pretrained" else init_cfg
    if isinstance(init_cfg, list | tuple):
        kept = [c for c in init_cfg if not (isinstance(c, dict) and c.get("type") == "Pretrained")]
        return kept or None
    return init_cfg


def strip_pretrained(node) -> None:
    """Drops every ``Pretrained`` init and ``pretrained=<path>``, recursively, in place."""
    if isinstance(node, dict):
        for key, value in list(node.items()):
            if key == "init_cfg":
                node[key] = _without_pretrained(value)
            elif key == "pretrained" and isinstance(value, str):
                node[key] = None
            else:
                strip_pretrained(value)
    elif isinstance(node, list | tuple):
        for item in node:
            strip_pretrained(item)


def cap_proposals(node, key: str = "") -> None:
    """Caps proposal / detection counts and RoI sampler sizes in ``train_cfg`` / ``test_cfg``
    (in place): a Mask R-CNN otherwise runs its mask head on 1000 RoIs per image."""
    if isinstance(node, dict):
        for k, v in node.items():
            inside = key or (k if k in ("train_cfg", "test_cfg") else "")
            cap = k in ("nms_pre", "max_per_img") or (k == "num" and key.endswith("sampler"))
            if inside and cap and isinstance(v, int) and not isinstance(v, bool):
                node[k] = min(v, PROPOSAL_CAP)
            else:
                cap_proposals(v, f"{inside}.{k}" if inside else "")
    elif isinstance(node, list | tuple):
        for item in node:
            cap_proposals(item, key)


def model_cfg(zc: ZooConfig):
    """The config's ``model``, offline (see the module doc for what is changed)."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(zc.path))  # runs custom_imports (mmpretrain.models)
    model = copy.deepcopy(cfg.model)
    strip_pretrained(model)
    cap_proposals(model)
    pre = model.get("data_preprocessor") or {}
    if zc.scope == "mmseg" and pre.get("size") is not None:
        pre["size"], pre["size_divisor"] = None, 32  # training pads to the crop size otherwise
    if pre.get("batch_augments"):
        pre["batch_augments"] = None  # training-time resizes / pads to 1024 and more
    return model


@contextmanager
def no_checkpoint_loading():
    """Any checkpoint load (which would mean a download) raises instead."""
    from mmengine.runner.checkpoint import CheckpointLoader

    original = CheckpointLoader.__dict__["load_checkpoint"]

    def refuse(cls, filename, *args, **kwargs):
        raise RuntimeError(f"zoo walk: the model tried to load a checkpoint: {filename}")

    CheckpointLoader.load_checkpoint = classmethod(refuse)
    try:
        yield
    finally:
        CheckpointLoader.load_checkpoint = original


def build(zc: ZooConfig, cfg, seed: int = 0) -> torch.nn.Module:
    """The model, randomly initialised from ``seed``, SyncBN reverted, in eval mode."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope

    registry = _registry(zc.scope)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope(zc.scope), no_checkpoint_loading():
        model = registry.build(copy.deepcopy(cfg))
        model.init_weights()
    return revert_sync_batchnorm(model).eval()


def _num_classes(node) -> list[int]:
    if isinstance(node, dict):
        own = [node["num_classes"]] if isinstance(node.get("num_classes"), int) else []
        return own + [n for v in node.values() for n in _num_classes(v)]
    if isinstance(node, list | tuple):
        return [n for v in node for n in _num_classes(v)]
    return []


def make_batch(zc: ZooConfig, cfg, size: int, seed: int = 0) -> dict:
    """A fresh raw batch of two ``3×size×size`` images with ground truth (deterministic)."""
    num_classes = min(_num_classes(cfg) or [80])
    if zc.scope == "mmdet":
        import numpy as np
        from mmdet.testing import demo_mm_inputs

        torch.manual_seed(seed)
        np.random.seed(seed)  # demo_mm_inputs draws semantic maps from the global state
        batch = demo_mm_inputs(
            batch_size=2,
            image_shapes=[(3, size, size)] * 2,
            num_items=[3, 2],
            num_classes=max(num_classes, 2),  # it draws labels from [1, num_classes)
            with_mask=True,
            with_semantic="semantic_head" in str(cfg),
        )
        for sample in batch["data_samples"]:
            sample.gt_instances.labels %= num_classes
        return batch
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    gen = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8))
        shape = (size, size)
        sample = SegDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape))
        label = torch.randint(0, num_classes, (1, size, size), generator=gen)
        sample.gt_sem_seg = PixelData(data=label)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def delta_parameters(model) -> dict[str, torch.nn.Parameter]:
    from mmdelta.patching.slot import iter_slots

    return {
        f"{path}.delta.{name}.{pname}": p
        for path, slot in iter_slots(model)
        for name, branch in slot.items()
        for pname, p in branch.named_parameters()
    }


def train_pass(model, batch: dict, how: str) -> None:
    """One training-mode forward and backward: ``model.loss`` (``how='loss'``) or, where
    the loss needs ground truth the demo batch lacks, ``mode='tensor'`` (``how='tensor'``)."""
    from mmdelta.exactness import flat_tensors

    model.train()
    data = model.data_preprocessor(batch, True)
    if how == "loss":
        loss, _ = model.parse_losses(model(**data, mode="loss"))
    else:
        outs = [t for t in flat_tensors(model(**data, mode="tensor")) if t.is_floating_point()]
        loss = sum(t.float().mean() for t in outs)
    loss.backward()


def first_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[0][:200] if text else type(err).__name__


@contextmanager
def quiet():
    """No INFO logging (init-info dumps, the patch line) while building and patching."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass
class Result:
    config: ZooConfig
    status: str  # pass / skip / xfail / fail
    reason: str = ""
    summary: object = None  # the PatchSummary
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per step

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = now - self.__dict__.get("_last", now)
        self.__dict__["_last"] = now


class PatchedFailure(AssertionError):
    """The patched model fails where the unpatched one works: an mmdelta bug."""


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> str:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=False)):
        return "different number or shapes of outputs"
    diffs = [(x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True)]
    return f"{sum(d > 0 for d in diffs)}/{len(diffs)} outputs differ, max |diff| {max(diffs):.3g}"


def data_tensors(obj) -> list[torch.Tensor]:
    """Every tensor in ``mode='predict'`` results (data samples, nested), in a fixed order."""
    import numpy as np
    from mmengine.structures import BaseDataElement

    if isinstance(obj, BaseDataElement):
        return [t for key in sorted(obj.keys()) for t in data_tensors(obj.get(key))]
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, np.ndarray):
        return [torch.from_numpy(obj)]
    if isinstance(obj, dict):
        return [t for key in sorted(obj) for t in data_tensors(obj[key])]
    if isinstance(obj, list | tuple):
        return [t for item in obj for t in data_tensors(item)]
    return []


def outputs(model, batch: dict, mode: str = "tensor") -> list[torch.Tensor]:
    """The model's outputs on ``batch`` in eval mode: ``mode='tensor'`` (flattened by
    :func:`mmdelta.exactness.tensor_outputs`) or, where a model's ``mode='tensor'`` is
    broken upstream, every tensor of its ``mode='predict'`` results."""
    from mmdelta.exactness import tensor_outputs

    if mode == "tensor":
        return tensor_outputs(model, batch)
    model.eval()
    with torch.no_grad():
        return data_tensors(model(**model.data_preprocessor(batch, False), mode="predict"))


def frozen_outputs(base, batch: dict, mode: str) -> list[torch.Tensor]:
    """The base's outputs with every parameter's ``requires_grad`` off (then restored)."""
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    base.requires_grad_(False)
    try:
        return outputs(base, batch, mode)
    finally:
        for n, p in base.named_parameters():
            p.requires_grad_(flags[n])


def check(zc: ZooConfig) -> Result:
    """:func:`check_config` with ``THREADS`` torch threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return check_config(zc)
    finally:
        torch.set_num_threads(threads)


def check_config(zc: ZooConfig) -> Result:
    """Builds the config once, patches a deep copy with the default patch and
    checks exactness, live branches, the frozen base and the preserved state dict.

    Returns ``status='skip'`` only when the *unpatched* model does not build or run.
    ``status='xfail'`` means the only defect found is that the patched model matches the
    base bitwise once the base's parameters are frozen too, but not the base as built
    (``Result.reason`` says by how much); every other check passed. Anything else that
    fails raises.
    """
    from mmdelta import apply_delta_patch, base_state_dict, delta_disabled
    from mmdelta.exactness import identical

    start = time.perf_counter()
    result = Result(zc, "pass")
    result.lap("start")

    def done(status: str = "pass", reason: str = "") -> Result:
        result.status, result.reason = status, reason
        result.seconds = time.perf_counter() - start
        return result

    cfg = model_cfg(zc)
    result.lap("cfg")

    # 0. the unpatched model must build and run, or the config is skipped
    try:
        with quiet():
            base = build(zc, cfg)
    except Exception as err:
        return done("skip", f"unpatched build fails: {first_line(err)}")
    result.lap("build")
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    # mode='tensor' on the smallest input it runs on; mode='predict' where 'tensor' is broken
    failures = []
    for size, mode in itertools.product(SIZES, ("tensor", "predict")):
        try:
            expected = outputs(base, make_batch(zc, cfg, size), mode)
            assert expected, "it returns no tensor"
            break
        except Exception as err:
            failures.append(f"mode={mode!r} at {size} px: {first_line(err)}")
    else:
        return done("skip", "unpatched forward fails: " + "; ".join(failures))
    if failures:
        result.notes.append(
            f"checked with mode={mode!r} at {size} px; unpatched fails with {'; '.join(failures)}"
        )
    batch = lambda: make_batch(zc, cfg, size)  # noqa: E731 - a fresh batch for every call
    result.lap("fwd base")

    model = copy.deepcopy(base)  # the twin to patch (a copy costs less than a second build)
    result.lap("copy twin")
    with quiet():
        result.summary = summary = apply_delta_patch(model, {})
    deltas = delta_parameters(model)
    assert summary.layers and summary.delta_params > 0, "the default patch patched nothing"
    assert sum(p.numel() for p in deltas.values()) == summary.delta_params

    def assert_base_state(when: str) -> None:
        state = base_state_dict(model)
        assert list(state) == list(reference), f"{when}: base state-dict keys differ"
        changed = [k for k, v in state.items() if not torch.equal(v, reference[k])]
        assert not changed, f"{when}: base tensors changed: {changed[:10]}"

    assert_base_state("after patching")
    result.lap("patch")

    # (1) exactness with the zero-initialised Δ active
    known_defect = ""
    patched = outputs(model, batch(), mode)
    if not identical(patched, expected):
        frozen = frozen_outputs(base, batch(), mode)
        assert identical(patched, frozen), (
            f"patched (Δ = 0) output differs from the base: {_max_diff(patched, expected)}; "
            f"from the base with frozen parameters: {_max_diff(patched, frozen)}"
        )
        mha = [n for n, m in base.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
        known_defect = (
            f"patched model == base with requires_grad=False bitwise, but != the base as built "
            f"({_max_diff(patched, expected)}): the patch sets requires_grad=False on every "
            f"base parameter, and torch's at::matmul picks its kernel by requires_grad even "
            f"under no_grad (a transposed 3-D input times a weight that requires grad is "
            f"copied and folded into one mm, otherwise it runs as bmm); "
            f"{len(mha)} nn.MultiheadAttention in the model (e.g. {mha[:1]})"
        )
        expected = frozen
    result.lap("fwd patched")

    # (2) live branches: non-zero Δ changes the output; switched off it is the base again
    gen = torch.Generator().manual_seed(0)
    saved = {k: p.detach().clone() for k, p in deltas.items()}
    with torch.no_grad():
        for p in deltas.values():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    perturbed = outputs(model, batch(), mode)
    result.lap("fwd perturbed")
    assert all(torch.isfinite(t).all() for t in perturbed if t.is_floating_point())
    assert not identical(perturbed, expected), "non-zero Δ weights do not change the output"
    with delta_disabled(model):
        assert identical(outputs(model, batch(), mode), expected), (
            "with delta_disabled (non-zero Δ) the output differs from the base"
        )
    result.lap("fwd disabled")
    with torch.no_grad():
        for k, p in deltas.items():
            p.copy_(saved[k])

    # (3) frozen base: after model.train() only Δ parameters require grad
    model.train()
    delta_ids = {id(p) for p in deltas.values()}
    trainable_base = [
        n for n, p in model.named_parameters() if p.requires_grad and id(p) not in delta_ids
    ]
    assert not trainable_base, f"base parameters require grad: {trainable_base[:10]}"
    assert all(p.requires_grad for p in deltas.values()), "Δ parameters do not require grad"

    # (4) preserved keys and values, also after a training-mode forward and backward
    trained = None
    for how in ("tensor", "loss"):
        try:
            train_pass(model, batch(), how)
            trained = how
            break
        except Exception as err:
            patched_error = traceback.format_exc()
            model.zero_grad(set_to_none=True)
            try:
                train_pass(base, batch(), how)
            except Exception as base_err:
                result.notes.append(
                    f"no train-mode {how}: unpatched fails too: {first_line(base_err)}"
                )
                continue
            raise PatchedFailure(
                f"{zc.id}: training-mode {how} fails only when patched:\n{patched_error}"
            ) from err
    if trained:
        base_grads = [
            n for n, p in model.named_parameters() if id(p) not in delta_ids and p.grad is not None
        ]
        assert not base_grads, f"base parameters got gradients: {base_grads[:10]}"
        live = [k for k, p in deltas.items() if p.grad is not None and p.grad.abs().sum() > 0]
        assert live, "no Δ parameter got a non-zero gradient"
        result.notes.append(
            f"train-mode {trained}: {len(live)}/{len(deltas)} Δ tensors got gradient"
        )
    result.lap("train")
    assert_base_state("after a training-mode step" if trained else "after model.train()")
    model.eval()
    return done("xfail", known_defect) if known_defect else done()


# ---------------------------------------------------------------- report


def record(result: Result) -> dict:
    """What the summary table needs of a result, as plain data: it travels from a pytest-xdist
    worker to the controller in the test report's ``user_properties``."""
    out = dict(id=result.config.id, status=result.status, reason=result.reason)
    out["notes"] = list(result.notes)
    out["seconds"] = round(result.seconds, 1)
    s = result.summary
    if s is not None:
        out["summary"] = dict(
            layers=len(s.layers),
            delta_params=s.delta_params,
            targeted_params=s.targeted_params,
            delta_fraction=s.delta_fraction,
            patch_fraction=s.patch_fraction,
            unsupported=len(s.unsupported),
            skipped=len(s.skipped),
        )
    return out


def summary_table(configs: list[ZooConfig], seen: dict[str, int], records: dict) -> str:
    """The walk's table: per family and per config, from :func:`record` dicts keyed by id."""
    rows = [
        "",
        "=" * 100,
        f"zoo walk: {len(configs)} configs sampled from the installed mmdet / mmseg zoo "
        f"(2 images of {SIZES[0]}x{SIZES[0]} px unless noted, default Δ patch: LowRankDelta "
        "rank 8; Δ fraction = Δ params / params of the patched layers, patch fraction = "
        "(Δ + owned) params / all base params)",
        f"{'family':<17}{'parsed':>7}{'sampled':>8}{'pass':>6}{'xfail':>6}{'skip':>6}{'fail':>6}"
        f"{'not run':>8}  {'Δ fraction (pooled; min-max)':<32}{'patch fraction':>14}",
    ]
    for family in FAMILIES:
        members = [c for c in configs if c.family == family]
        res = [records[c.id] for c in members if c.id in records]
        count = {s: sum(r["status"] == s for r in res) for s in ("pass", "xfail", "skip", "fail")}
        sums = [r["summary"] for r in res if "summary" in r]
        if sums:
            pooled = sum(s["delta_params"] for s in sums) / sum(s["targeted_params"] for s in sums)
            fracs = [s["delta_fraction"] for s in sums]
            delta = f"{100 * pooled:.2f}% ({100 * min(fracs):.2f}-{100 * max(fracs):.2f}%)"
            patch = f"{100 * sum(s['patch_fraction'] for s in sums) / len(sums):.2f}%"
        else:
            delta = patch = "-"
        rows.append(
            f"{family:<17}{seen.get(family, 0):>7}{len(members):>8}{count['pass']:>6}{count['xfail']:>6}"
            f"{count['skip']:>6}{count['fail']:>6}{len(members) - len(res):>8}  "
            f"{delta:<32}{patch:>14}"
        )
    rows.append("-" * 100)
    for c in configs:
        r = records.get(c.id)
        status = r["status"] if r else "not run"
        info = ""
        if r is not None and "summary" in r:
            s = r["summary"]
            info = (
                f" | {s['layers']} layers, Δ {s['delta_params']:,} = "
                f"{100 * s['delta_fraction']:.2f}% of {s['targeted_params']:,}"
                + (f", {s['unsupported']} unsupported" if s["unsupported"] else "")
                + (f", {s['skipped']} too small" if s["skipped"] else "")
            )
        timing = f" | {r['seconds']:.1f}s" if r else ""
        feats = f" [{','.join(c.features)}]" if c.features else ""
        rows.append(f"{status:<5} {c.family:<16} {c.id}")
        rows.append(f"      {c.kind} / {c.arch}{feats}{info}{timing}")
        if r is not None and r["reason"]:
            rows.append(f"      reason: {r['reason']}")
        for note in r["notes"] if r else []:
            rows.append(f"      note: {note}")
    rows.append("=" * 100)
    return "\n".join(rows)
