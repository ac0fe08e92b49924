"""Pointing a config at its data somewhere else: every dataset's ``data_root``, and the paths
evaluators hold in full.

Upstream dataset configs build evaluator paths from the dataset root when the config is
read (``CocoMetric(ann_file=data_root + 'annotations/instances_val2017.json')``,
``CityScapesMetric(seg_prefix=data_root + 'gtFine/val')``), so replacing each dataset's
``data_root`` alone leaves the evaluators reading the old location.
:func:`move_data_root` moves both, in place, and says what it changed in
``--cfg-options`` form (dotted keys, list items by index).
"""

from collections.abc import Iterator, Mapping, MutableMapping

from .paths import DEFAULT_EVALUATORS, DEFAULT_LOADERS


def dotted_items(node, key: str) -> Iterator[tuple[str, object]]:
    """Every ``(dotted key, value)`` under ``node`` (``node`` itself first), list items by
    index, as ``--cfg-options`` addresses them (``a.datasets.0.data_root``)."""
    yield key, node
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from dotted_items(v, f"{key}.{k}")
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            yield from dotted_items(v, f"{key}.{i}")


def leaf_datasets(dataset: Mapping, key: str) -> Iterator[tuple[str, MutableMapping]]:
    """The datasets under ``dataset`` (through ``dataset`` / ``datasets`` wrappers) with
    their dotted keys."""
    if "datasets" in dataset:
        for i, inner in enumerate(dataset["datasets"]):
            yield from leaf_datasets(inner, f"{key}.datasets.{i}")
    elif "dataset" in dataset:
        yield from leaf_datasets(dataset["dataset"], f"{key}.dataset")
    else:
        yield key, dataset


def _moved(value: str, old_root: str, new_root: str) -> str | None:
    old = old_root.rstrip("/")
    if old and (value == old or value.startswith(old + "/")):
        return new_root.rstrip("/") + value[len(old) :]
    return None


def _set(cfg, key: str, value) -> None:
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def move_data_root(
    cfg,
    new_root: str,
    loaders: tuple[str, ...] = DEFAULT_LOADERS,
    evaluators: tuple[str, ...] = DEFAULT_EVALUATORS,
) -> dict[str, str]:
    """Points every dataset of ``loaders`` at ``new_root`` and moves every path under
    ``loaders`` and ``evaluators`` that starts with one of those datasets' old roots along
    with it; in place. Returns the changes as ``{dotted key: new value}`` (empty when no
    dataset has a ``data_root``)."""
    new_root = str(new_root)
    changes: dict[str, str] = {}
    old_roots = set()
    for loader in loaders:
        if cfg.get(loader) is None or cfg[loader].get("dataset") is None:
            continue
        for key, dataset in leaf_datasets(cfg[loader]["dataset"], f"{loader}.dataset"):
            if dataset.get("data_root") is not None:
                old_roots.add(str(dataset["data_root"]))
                changes[f"{key}.data_root"] = new_root
    for part in (*loaders, *evaluators):
        if cfg.get(part) is None or not old_roots:
            continue
        for key, value in dotted_items(cfg[part], part):
            if isinstance(value, str) and not key.endswith(".data_root"):
                for old in old_roots:
                    moved = _moved(value, old, new_root)
                    if moved is not None:
                        changes[key] = moved
    for key, value in changes.items():
        _set(cfg, key, value)
    return changes
