"""No import cycles in ``mmdelta``: in the source, and when any one module is imported alone.

Static: the import graph of every module (function-level imports included, so a cycle
cannot hide inside a function) has no strongly connected component. At run time: each
module is imported as the first ``mmdelta`` import of a fresh interpreter (a fork of one
that has imported only the third-party libraries, so a hundred imports cost seconds).
"""

import subprocess
import sys
import textwrap

from import_graph import ROOT, cycles, imports, modules


def test_the_import_graph_has_no_cycle():
    edges: dict[str, set[str]] = {}
    for imp in imports():
        if imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
    found = cycles(edges)
    lines = {
        (imp.source, imp.target): f"{imp.source}:{imp.line} -> {imp.target}" for imp in imports()
    }
    detail = [[lines[(a, b)] for a in cycle for b in cycle if (a, b) in lines] for cycle in found]
    assert not found, f"import cycles: {detail}"


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


#: imports the third-party stack once, then forks a child per module that imports it alone
_SCRIPT = textwrap.dedent(
    """
    import importlib, os, sys, traceback
    import torch, mmengine, mmcv, mmdet, mmseg, mmpretrain, safetensors  # noqa: F401
    import mmengine.runner, mmdet.models, mmseg.models, mmpretrain.models  # noqa: F401
    failed = []
    for name in sys.argv[1:]:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                importlib.import_module(name)
                code = 0
            except BaseException:
                os.write(write, traceback.format_exc().encode()[-2000:])
                code = 1
            os._exit(code)
        os.close(write)
        message = os.read(read, 4000).decode()
        os.close(read)
        _, status = os.waitpid(pid, 0)
        if status:
            failed.append(f"{name}: {message or status}")
    print("\\n".join(failed))
    sys.exit(1 if failed else 0)
    """
)


def test_every_module_imports_alone():
    names = sorted(modules())
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *names],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, (
        f"modules that do not import alone:\n{run.stdout}{run.stderr[-3000:]}"
    )
