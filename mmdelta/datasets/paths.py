"""Checks, before any dataset is built, that the files a config's datasets read exist.

A missing dataset otherwise surfaces as a traceback from deep inside a dataset class, often
only after the model is built and its checkpoint loaded. :func:`check_dataset_paths` walks
the dataloader configs (through dataset wrappers), resolves every local path the datasets
will read the way MMEngine's ``BaseDataset`` does, and raises one :class:`DatasetPathError`
that lists every missing path with its config key and says how to obtain and lay out the
dataset. It reads nothing but the config and the file system: no dataset class is
instantiated, nothing is downloaded.
"""

import importlib.util
import os
import os.path as osp
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")
DEFAULT_EVALUATORS = ("val_evaluator", "test_evaluator")
#: wrapper keys holding one inner dataset / a list of them
_INNER_KEYS = ("dataset", "datasets")
#: evaluator options that name files or folders the evaluator reads
_EVALUATOR_PATH_KEYS = ("ann_file", "seg_prefix")
#: mmdet XML-style datasets read these folders under ``data_prefix['sub_data_root']``
_XML_DATASETS = ("VOCDataset", "WIDERFaceDataset", "XMLDataset")


class DatasetPathError(FileNotFoundError):
    """Files or folders a config's datasets read are missing.

    ``missing`` holds one :class:`MissingPath` per missing path.
    """

    def __init__(self, message: str, missing: list["MissingPath"]):
        super().__init__(message)
        self.missing = missing


@dataclass
class MissingPath:
    """A path a dataset (or evaluator) will read that does not exist."""

    path: str  # as the dataset resolves it (data_root joined)
    keys: list[str]  # config keys that lead to it, e.g. 'train_dataloader.dataset.ann_file'
    dataset_type: str
    kind: str  # 'file' or 'folder'
    family: str = "generic"  # which dataset's instructions apply
    scope: str | None = None
    details: list[str] = field(default_factory=list)


def check_dataset_paths(
    cfg,
    loaders: Sequence[str] = DEFAULT_LOADERS,
    evaluators: Sequence[str] = DEFAULT_EVALUATORS,
) -> None:
    """Raises :class:`DatasetPathError` listing every missing local dataset path of ``cfg``.

    Checks ``data_root``, ``ann_file`` and every ``data_prefix`` value (joined to
    ``data_root`` unless absolute) of the datasets under ``loaders``, through
    ``RepeatDataset`` / ``ConcatDataset`` / ``ClassBalancedDataset`` /
    ``MultiImageMixDataset`` wrappers and lists, plus the ``ann_file`` / ``seg_prefix``
    files the ``evaluators`` read. URLs and datasets on a remote file backend are skipped.
    """
    scope = _get(cfg, "default_scope")
    found: dict[str, MissingPath] = {}
    families: dict[str, tuple[str, str | None]] = {}
    for loader_key in loaders:
        loader = _get(cfg, loader_key)
        if not isinstance(loader, Mapping) or loader.get("dataset") is None:
            continue
        for key, dataset in _leaf_datasets(loader["dataset"], f"{loader_key}.dataset"):
            missing, family = _check_dataset(dataset, key, scope)
            families.setdefault(loader_key.split("_")[0], family)  # 'val' for val_evaluator
            for m in missing:
                _add(found, m)
    for evaluator_key in evaluators:
        family = families.get(evaluator_key.split("_")[0], ("generic", scope))
        for missing in _check_evaluator(_get(cfg, evaluator_key), evaluator_key, family):
            _add(found, missing)
    if found:
        missing = list(found.values())
        raise DatasetPathError(format_missing(missing), missing)


def format_missing(missing: list[MissingPath]) -> str:
    """The error message: every missing path, then how to get each dataset involved."""
    cwd = os.getcwd()
    lines = [
        f"{len(missing)} dataset path(s) the config reads do not exist "
        f"(relative paths are relative to the current directory {cwd}):"
    ]
    for m in missing:
        shown = m.path if osp.isabs(m.path) else f"{m.path}  (= {osp.abspath(m.path)})"
        lines.append(f"  - missing {m.kind}: {shown}")
        lines.append(f"      {m.dataset_type}, config key {', '.join(m.keys)}")
        lines += [f"      {d}" for d in m.details]
    lines.append("")
    seen = set()
    for m in missing:
        hint = (m.family, m.scope) if m.family != "generic" else (m.family, m.dataset_type)
        if hint not in seen:
            seen.add(hint)
            lines += [_howto(m), ""]
    roots = [m.path for m in missing if any(k.endswith(".data_root") for k in m.keys)]
    link = f" (e.g. `ln -s /path/to/your/copy {roots[0].rstrip('/')}`)" if roots else ""
    lines.append(
        f"Put the data where the config expects it{link}, or set data_root (and any "
        "evaluator path) at the config keys listed above to where it is."
    )
    return "\n".join(lines)


# -- walking the config ----------------------------------------------------------------------


def _get(cfg, key):
    try:
        return cfg.get(key)
    except AttributeError:
        return getattr(cfg, key, None)


def _leaf_datasets(dataset, key: str):
    """``(config key, dataset cfg)`` of every non-wrapper dataset under ``dataset``."""
    if isinstance(dataset, Sequence) and not isinstance(dataset, str):
        for i, item in enumerate(dataset):
            yield from _leaf_datasets(item, f"{key}[{i}]")
        return
    if not isinstance(dataset, Mapping):
        return
    inner = [k for k in _INNER_KEYS if dataset.get(k) is not None]
    if not inner:
        yield key, dataset
        return
    for k in inner:
        yield from _leaf_datasets(dataset[k], f"{key}.{k}")


def _type_name(dataset: Mapping) -> str:
    t = dataset.get("type", "?")
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def _split_scope(type_name: str, scope: str | None) -> tuple[str, str | None]:
    if "." in type_name:
        prefix, name = type_name.rsplit(".", 1)
        return name, prefix
    return type_name, scope


def _is_remote(path: str) -> bool:
    return "://" in path


def _remote_backend(dataset: Mapping) -> bool:
    backend = dataset.get("backend_args") or {}
    if not isinstance(backend, Mapping):
        return False
    return backend.get("backend", "local") not in ("local", "disk") or "path_mapping" in backend


def _join(root: str, path: str) -> str:
    if not root or osp.isabs(path) or _is_remote(path):
        return path
    return osp.join(root, path)


def _check_dataset(
    dataset: Mapping, key: str, scope: str | None
) -> tuple[list[MissingPath], tuple[str, str | None]]:
    type_name, type_scope = _split_scope(_type_name(dataset), scope)
    family = _family(type_name)
    if _remote_backend(dataset):
        return [], (family, type_scope)
    root = dataset.get("data_root") or ""
    root = root if isinstance(root, str) else ""
    checks: list[tuple[str, str, str]] = []  # (path, key, kind)
    if root:
        checks.append((root, f"{key}.data_root", "folder"))
    ann_file = dataset.get("ann_file")
    if isinstance(ann_file, str) and ann_file:
        checks.append((_join(root, ann_file), f"{key}.ann_file", "file"))
    prefixes = dataset.get("data_prefix") or {}
    if isinstance(prefixes, Mapping):
        for name, prefix in prefixes.items():
            if isinstance(prefix, str) and (prefix or root):
                path = _join(root, prefix)
                checks.append((path, f"{key}.data_prefix.{name}", "folder"))
                if name == "sub_data_root" and _is_xml_dataset(type_name, type_scope):
                    for sub, default in (
                        ("img_subdir", "JPEGImages"),
                        ("ann_subdir", "Annotations"),
                    ):
                        value = dataset.get(sub, default)  # read under sub_data_root
                        checks.append((osp.join(path, value), f"{key}.{sub}={value!r}", "folder"))
    missing = []
    for path, path_key, kind in checks:
        if _is_remote(path) or _exists(path, kind):
            continue
        details = []
        if kind == "folder" and osp.isfile(path):
            details.append("(exists, but is a file, not a folder)")
        missing.append(MissingPath(path, [path_key], type_name, kind, family, type_scope, details))
    return missing, (family, type_scope)


def _check_evaluator(evaluator, key: str, family: tuple[str, str | None]) -> list[MissingPath]:
    if isinstance(evaluator, Sequence) and not isinstance(evaluator, str):
        return [
            m for i, e in enumerate(evaluator) for m in _check_evaluator(e, f"{key}[{i}]", family)
        ]
    if not isinstance(evaluator, Mapping) or _remote_backend(evaluator):
        return []
    if evaluator.get("format_only"):
        return []
    missing = []
    for name in _EVALUATOR_PATH_KEYS:
        path = evaluator.get(name)
        if not isinstance(path, str) or not path or _is_remote(path):
            continue
        kind = "file" if name == "ann_file" else "folder"
        if not _exists(path, kind):
            missing.append(
                MissingPath(
                    path,
                    [f"{key}.{name}"],
                    f"{_type_name(evaluator)} (evaluator)",
                    kind,
                    family[0],
                    family[1],
                    ["(an evaluator path: written out in full, not joined to data_root)"],
                )
            )
    return missing


def _exists(path: str, kind: str) -> bool:
    return osp.isdir(path) if kind == "folder" else osp.exists(path)


def _add(found: dict[str, MissingPath], missing: MissingPath) -> None:
    norm = osp.normpath(missing.path)
    if norm in found:  # e.g. test_dataloader = val_dataloader
        found[norm].keys += [k for k in missing.keys if k not in found[norm].keys]
    else:
        found[norm] = missing


def _is_xml_dataset(type_name: str, scope: str | None) -> bool:
    if type_name in _XML_DATASETS:
        return True
    if scope not in (None, "mmdet"):
        return False
    try:  # a registered subclass of mmdet's XMLDataset (looked up, not instantiated)
        from mmdet.datasets import XMLDataset
        from mmdet.registry import DATASETS

        cls = DATASETS.get(type_name)
    except Exception:
        return False
    return isinstance(cls, type) and issubclass(cls, XMLDataset)


# -- how to get the data ---------------------------------------------------------------------


_FAMILIES = {
    "VOCDataset": "voc",  # mmdet's detection VOC (mmseg's is PascalVOCDataset: generic)
    "CocoDataset": "coco",
    "CityscapesDataset": "cityscapes",  # mmdet (instances) and mmseg (semantic)
    "ADE20KDataset": "ade20k",
}


def _family(type_name: str) -> str:
    return _FAMILIES.get(type_name, "generic")


def _tool(package: str, relative: str) -> str:
    """The path of an OpenMMLab tool script shipped in the installed wheel, if any."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec and spec.submodule_search_locations:
        path = osp.join(next(iter(spec.submodule_search_locations)), ".mim", "tools", relative)
        if osp.isfile(path):
            return path
    return f"tools/{relative} (in the {package} repository)"


def _howto(m: MissingPath) -> str:
    if m.family == "voc":
        download = _tool("mmdet", "misc/download_dataset.py")
        return f"""How to get PASCAL VOC ({m.dataset_type}):
  Download VOCtrainval_06-Nov-2007.tar, VOCtest_06-Nov-2007.tar and
  VOCtrainval_11-May-2012.tar (http://host.robots.ox.ac.uk/pascal/VOC/, or
  `python {download} --dataset-name voc2007` and `... voc2012`) and extract all three
  into the same folder: each unpacks into VOCdevkit/. mmdet expects data_root to be that
  VOCdevkit/ folder (default data/VOCdevkit/):
    VOCdevkit/
      VOC2007/Annotations/*.xml  JPEGImages/*.jpg  ImageSets/Main/{{trainval,test}}.txt
      VOC2012/Annotations/*.xml  JPEGImages/*.jpg  ImageSets/Main/trainval.txt"""
    if m.family == "coco":
        download = _tool("mmdet", "misc/download_dataset.py")
        return f"""How to get COCO ({m.dataset_type}):
  Download train2017.zip, val2017.zip and annotations_trainval2017.zip
  (https://cocodataset.org/#download, or `python {download} --dataset-name coco2017`)
  and unzip them into data_root (default data/coco/):
    coco/
      annotations/instances_train2017.json  instances_val2017.json
      train2017/*.jpg
      val2017/*.jpg"""
    if m.family == "cityscapes":
        common = """How to get Cityscapes ({type}):
  Register at https://www.cityscapes-dataset.com/, download leftImg8bit_trainvaltest.zip
  and gtFine_trainvaltest.zip and unzip both into data_root (default data/cityscapes/):
    cityscapes/
      leftImg8bit/{{train,val,test}}/<city>/*_leftImg8bit.png
      gtFine/{{train,val,test}}/<city>/*_gtFine_{{polygons.json,labelIds.png,instanceIds.png}}"""
        common = common.format(type=m.dataset_type)
        seg_tool = _tool("mmseg", "dataset_converters/cityscapes.py")
        det_tool = _tool("mmdet", "dataset_converters/cityscapes.py")
        seg = f"""  Semantic segmentation (mmseg) reads gtFine/**/*_gtFine_labelTrainIds.png, made by
  mmseg's converter (needs `pip install cityscapesscripts`):
    python {seg_tool} <data_root> --nproc 8"""
        det = f"""  Instance segmentation / detection (mmdet) reads COCO-style annotation files,
  annotations/instancesonly_filtered_gtFine_{{train,val,test}}.json, made by mmdet's
  converter (needs `pip install cityscapesscripts`):
    python {det_tool} <data_root> --nproc 8 --out-dir <data_root>/annotations"""
        if m.scope == "mmseg":
            return f"{common}\n{seg}"
        if m.scope == "mmdet":
            return f"{common}\n{det}"
        return f"{common}\n{seg}\n{det}"
    if m.family == "ade20k":
        download = _tool("mmdet", "misc/download_dataset.py")
        return f"""How to get ADE20K ({m.dataset_type}, the SceneParsing ADEChallengeData2016 release):
  Download ADEChallengeData2016.zip
  (http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip, or
  `python {download} --dataset-name ade20k_2016`) and unzip it into data/ade/; data_root
  is the unpacked folder (default data/ade/ADEChallengeData2016):
    ADEChallengeData2016/
      images/{{training,validation}}/*.jpg
      annotations/{{training,validation}}/*.png"""
    docs = {
        "mmdet": "https://mmdetection.readthedocs.io/en/latest/user_guides/dataset_prepare.html",
        "mmseg": "https://mmsegmentation.readthedocs.io/en/latest/user_guides/2_dataset_prepare.html",
    }
    where = [docs[m.scope]] if m.scope in docs else list(docs.values())
    lines = [
        f"How to get the data for {m.dataset_type}:",
        f"  mmdelta has no instructions for {m.dataset_type}: see the class's docstring and",
        "  the dataset preparation guide of its library for where to download it and the",
        "  layout it reads:",
        *[f"    {url}" for url in where],
        f"  then make sure the {m.dataset_type} paths listed above exist.",
    ]
    return "\n".join(lines)
