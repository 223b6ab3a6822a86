"""``df-mps-run CMD [ARGS...]``: run a program with df_mps active, without editing it.

    df-mps-run python my_script.py       # my_script imports df; df_mps patches it first
    df-mps-run deepFilter noisy.wav      # upstream's own command, patched
    python -m df_mps.run python -m my_package

In the style of ddtrace-run and opentelemetry-instrument: the directory of df_mps's bootstrap
``sitecustomize`` is put first on PYTHONPATH and CMD replaces this process (``os.execvpe``).
Every Python interpreter started under it, CMD's own children included, imports df_mps at
start-up and then the ``sitecustomize`` it would have loaded anyway. Environment variables
work as usual (``DF_MPS_DISABLE=1`` turns every patch off). A Python started with ``-I``, ``-E``
or ``-S`` ignores PYTHONPATH or site, and so runs unpatched.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Dict, List, Optional, Sequence

PROG = "df-mps-run"
BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap")

USAGE = f"""usage: {PROG} COMMAND [ARGS...]

Run COMMAND with df_mps active in every Python process it starts: df_mps's bootstrap
sitecustomize ({BOOTSTRAP_DIR}) is put first on PYTHONPATH; it imports df_mps, then any
sitecustomize you already have. Set DF_MPS_DISABLE=1 to run with no patches.

examples:
  {PROG} python my_script.py
  {PROG} deepFilter noisy.wav
"""


# The first line of every df-mps bootstrap sitecustomize, this install's or another's.
BOOTSTRAP_MARK = '"""Bootstrap for ``df-mps-run``'


def is_bootstrap_dir(entry: str) -> bool:
    """Whether the PYTHONPATH entry ``entry`` is a df-mps bootstrap directory: this one by its
    real path (a symlink such as macOS's /var -> /private/var included), or another install's."""
    if not entry:  # the current directory: it holds a bootstrap only where one was copied
        entry = os.curdir
    try:
        if os.path.realpath(entry) == os.path.realpath(BOOTSTRAP_DIR):
            return True
        with open(os.path.join(entry, "sitecustomize.py"), encoding="utf-8") as f:
            return f.read(len(BOOTSTRAP_MARK)) == BOOTSTRAP_MARK
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def bootstrap_env(environ: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """A copy of ``environ`` with the bootstrap directory first on PYTHONPATH (once).

    Every other df-mps bootstrap directory is dropped; every other entry is kept as it was, an
    empty one too (it means the current directory).
    """
    env = dict(os.environ if environ is None else environ)
    current = env.get("PYTHONPATH", "")
    parts = current.split(os.pathsep) if current else []
    parts = [p for p in parts if not (p and is_bootstrap_dir(p))]
    env["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP_DIR, *parts])
    return env


def resolve_command(command: str, env: Dict[str, str]) -> str:
    """The executable ``command`` names: a path as given, else looked up on env's PATH.

    Raises ``FileNotFoundError`` or ``PermissionError`` with a one-line message.
    """
    if os.sep in command or (os.altsep and os.altsep in command):
        if not os.path.exists(command):
            raise FileNotFoundError(f"{command}: no such file")
        if os.path.isdir(command) or not os.access(command, os.X_OK):
            raise PermissionError(f"{command}: not an executable file")
        return command
    found = shutil.which(command, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(f"{command}: command not found on PATH")
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        sys.stderr.write(USAGE)
        return 2
    if args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    if not os.path.isfile(os.path.join(BOOTSTRAP_DIR, "sitecustomize.py")):
        sys.stderr.write(f"{PROG}: error: df_mps's bootstrap is missing from {BOOTSTRAP_DIR}\n")
        return 1
    env = bootstrap_env()
    try:
        executable = resolve_command(args[0], env)
    except FileNotFoundError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 127  # as a shell says for a command it can't find
    except PermissionError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 126
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(executable, args, env)  # argv[0] stays as the user typed it
    except OSError as exc:
        sys.stderr.write(f"{PROG}: error: can't run {args[0]}: {exc.strerror or exc}\n")
        return 126
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
