"""Running the project's tools as fresh processes forked from one preloaded interpreter.

Each run is its own process, as a user's ``python tools/train.py …`` is: a child forked
from a multiprocessing *forkserver* that has imported torch, mmengine and the OpenMMLab
stack once and done nothing else (no model, no runner, no test has run in it), then runs
the script as ``__main__`` with the given ``argv`` in the given folder, its stdout and stderr
going to a file. What it saves is the interpreter start and the imports, about 7 s per run
on the project's 2-core machine; tests/test_rehearsal.py runs twenty tools.
"""

import multiprocessing
import os
import runpy
import sys
import tempfile
import traceback
from pathlib import Path

PRELOAD = ["mmdelta", "mmdet.models", "mmseg.models", "mmpretrain.models"]
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _main(script: str, argv: list[str], cwd: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(cwd)
    sys.argv = [script, *argv]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if isinstance(exit_.code, int):
            code = exit_.code
        elif exit_.code is not None:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_tool(command: list[str], cwd: Path, timeout: float = 900) -> tuple[int, str]:
    """Runs ``command`` (``[python, script, *argv]``) in a fresh forked process in ``cwd``;
    returns its exit code and its output (stdout and stderr together)."""
    script, argv = command[1], [str(a) for a in command[2:]]
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        process = _forkserver().Process(target=_main, args=(script, argv, str(cwd), log.name))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise TimeoutError(f"{' '.join(command)} ran past {timeout} s")
        return process.exitcode, Path(log.name).read_text(errors="replace")
