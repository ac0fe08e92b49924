"""Stand-in data and base checkpoints shared by every pytest-xdist worker of one run.

Written once per run into a folder beside the workers' own temporary folders (the writers
are atomic and reuse what is there, so two workers asking at once cost at most one extra
write, never a half-written file)."""

from pathlib import Path

from mmdelta.apps.rehearsal import rehearsal, write_base_checkpoint
from mmdelta.datasets import rehearsal_data

ROOT = Path(__file__).resolve().parents[1]


def shared_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if base.name.startswith("popen-gw") else base) / "rehearsal"
    folder.mkdir(exist_ok=True)
    return folder


def data_roots(tmp_path_factory) -> dict[str, str]:
    return rehearsal_data(shared_dir(tmp_path_factory) / "data")


def base_checkpoint(tmp_path_factory, config: str) -> Path:
    """The stand-in base of ``config``: for a rehearsed real config, its official
    checkpoint's config's model; otherwise the config's own model."""
    try:
        source = rehearsal(config).base_config
    except KeyError:
        source = str(ROOT / config)
    name = Path(source.split("::")[-1]).stem
    return write_base_checkpoint(source, shared_dir(tmp_path_factory) / f"{name}.pth")
