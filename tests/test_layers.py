"""The package's layering rules, checked statically (an AST walk of ``mmdelta/**/*.py``).

* The library never imports its applications: no module outside ``mmdelta/apps/`` imports
  ``mmdelta.apps`` (absolutely or relatively).
* No module imports a private name (``_x``) from another top-level part of ``mmdelta``
  (``mmdelta.patching``, ``mmdelta.apps``, ``mmdelta.fileio``, ...): what crosses a package
  boundary is public.

See ``docs/architecture.md``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from import_graph import PACKAGE, file_imports, module_name


def part(module: str) -> str | None:
    """The top-level part of mmdelta ``module`` belongs to (``mmdelta.patching.state`` ->
    ``patching``, ``mmdelta`` -> ``""``); None outside mmdelta."""
    pieces = module.split(".")
    if pieces[0] != "mmdelta":
        return None
    return pieces[1] if len(pieces) > 1 else ""


def layer_violations(package: Path = PACKAGE) -> list[str]:
    """Every breach of the two rules under ``package``, as ``file:line: what``."""
    parts = {"apps"} | {p.stem for p in package.iterdir() if p.suffix == ".py" or p.is_dir()}
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        mine = part(module_name(path, package))
        for line, module, names in file_imports(path, package):
            target = part(module)
            if target is None:
                continue
            # ``from mmdelta import apps`` / ``from .. import apps`` import a part itself
            targets = [(n, n) for n in names if target == "" and n in parts]
            if not targets:
                targets = [(target, n) for n in names] or [(target, "")]
            for target, name in targets:
                if target == "apps" and mine != "apps":
                    what = module if part(module) == "apps" else f"{module}.{name}"
                    found.append(f"{rel}:{line}: the library imports {what} (an application)")
                elif target != mine and name.startswith("_") and not name.startswith("__"):
                    found.append(f"{rel}:{line}: imports private {name} from {module}")
    return found


def test_the_library_never_imports_its_applications_nor_private_names_across_packages():
    violations = layer_violations()
    assert not violations, "layering rules broken (see docs/architecture.md):\n" + "\n".join(
        violations
    )


@pytest.mark.parametrize(
    "where, source, expected",
    [
        ("apis/x.py", "from ..apps.demo import stories\n", "the library imports mmdelta.apps.demo"),
        ("apis/x.py", "import mmdelta.apps.benchmark\n", "the library imports mmdelta.apps.bench"),
        ("apis/x.py", "from .. import apps\n", "the library imports mmdelta.apps"),
        ("deploy/x.py", "from ..apis.inference import _build\n", "imports private _build"),
        ("apps/x.py", "from ..patching.state import _slots\n", "imports private _slots"),
    ],
)
def test_the_check_catches_a_violation(tmp_path, where, source, expected):
    package = tmp_path / "mmdelta"
    (package / Path(where).parent).mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / Path(where).parent / "__init__.py").write_text("")
    (package / where).write_text(source)
    violations = layer_violations(package)
    assert len(violations) == 1 and expected in violations[0], violations
    assert violations[0].startswith(f"mmdelta/{where}:1:"), violations


def test_the_check_allows_what_the_rules_allow(tmp_path):
    package = tmp_path / "mmdelta"
    (package / "apps" / "demo").mkdir(parents=True)
    for init in ("__init__.py", "apps/__init__.py", "apps/demo/__init__.py"):
        (package / init).write_text("")
    (package / "apps" / "demo" / "job.py").write_text(
        "from ...apis import init_base_model\nfrom .stories import _private\n"
        "from ..benchmark import run\nfrom __future__ import annotations\n"
    )
    assert layer_violations(package) == []
