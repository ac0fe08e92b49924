"""The import graph of the ``mmdelta`` package, read from its source (nothing is imported).

Every ``import`` / ``from … import`` statement of every module counts, at any depth (a
function-level import is an edge too: it only hides a cycle, it does not remove it).
``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``.
"""

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mmdelta"


@dataclass(frozen=True)
class Import:
    """One import statement: the importing module, its line, the imported module and the
    names taken from it (``()`` for ``import x``)."""

    source: str
    line: int
    target: str
    names: tuple[str, ...]


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``pkg`` for
    ``pkg/__init__.py``)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports(root: Path = ROOT) -> list[Import]:
    """Every import of a package module, resolved to absolute names."""
    known = modules(root)
    found = []
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        found.append(Import(module, node.lineno, alias.name, ()))
            elif isinstance(node, ast.ImportFrom):
                target = (
                    _absolute(module, is_package, node.level, node.module)
                    if node.level
                    else node.module or ""
                )
                if target.split(".")[0] != PACKAGE:
                    continue
                names = tuple(alias.name for alias in node.names)
                submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
                for sub in submodules:
                    found.append(Import(module, node.lineno, sub, ()))
                rest = tuple(n for n in names if f"{target}.{n}" not in known)
                if rest or not submodules:
                    found.append(Import(module, node.lineno, target, rest))
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
