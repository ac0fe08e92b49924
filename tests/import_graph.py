"""The imports of the ``mmdelta`` package, read from its source (nothing is imported):
per file (``tests/test_layers.py``) and as a module graph (``tests/test_imports.py``).

Every ``import`` / ``from … import`` statement of every module counts, at any depth (a
function-level import is an edge too: it only hides a cycle, it does not remove it).
``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``.
"""

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmdelta"


@dataclass(frozen=True)
class Import:
    """One import statement: the importing module, its line, the imported module and the
    names taken from it (``()`` for ``import x``)."""

    source: str
    line: int
    target: str
    names: tuple[str, ...]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``mmdelta.x.y`` of ``package/x/y.py`` (``mmdelta.x`` of ``package/x/__init__.py``)."""
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    return {module_name(path, package): path for path in sorted(package.rglob("*.py"))}


def file_imports(path: Path, package: Path = PACKAGE):
    """``(line, imported module, imported names)`` of every import in ``path``, relative
    imports resolved to absolute module names (names are ``()`` for ``import x``)."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path, package).split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # a module's relative imports start from its package
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield node.lineno, module, tuple(alias.name for alias in node.names)


def imports(package: Path = PACKAGE) -> list[Import]:
    """Every import of a package module by another, as graph edges: ``from pkg import
    name`` points at ``pkg.name`` when that is a module, else at ``pkg``."""
    known = modules(package)
    found = []
    for module, path in known.items():
        for line, target, names in file_imports(path, package):
            if target.split(".")[0] != package.name:
                continue
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            found += [Import(module, line, sub, ()) for sub in submodules]
            rest = tuple(n for n in names if f"{target}.{n}" not in known)
            if rest or not submodules:
                found.append(Import(module, line, target, rest))
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)
