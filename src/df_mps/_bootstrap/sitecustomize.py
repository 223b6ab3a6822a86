"""Bootstrap for ``df-mps-run``: imports df_mps before the program runs, then the user's own
sitecustomize.

``df-mps-run`` puts this file's directory first on PYTHONPATH, so Python's ``site`` imports this
module as ``sitecustomize`` at start-up (as ddtrace-run and opentelemetry-instrument do).
df_mps is imported first, before anything can import torch, so that it can still set
PYTORCH_ENABLE_MPS_FALLBACK; ``DF_MPS_DISABLE=1`` makes that import patch nothing. Then the next
``sitecustomize`` on sys.path (the one Python would have loaded without us) is loaded, so a
user's or a distribution's start-up code still runs. Nothing here may stop the program: every
failure is reported in one line on stderr.
"""

import contextlib
import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))
# The first line of this file, and of every df-mps bootstrap sitecustomize (df_mps.run's
# BOOTSTRAP_MARK): how another install's bootstrap directory on sys.path is recognised.
_MARK = '"""Bootstrap for ``df-mps-run``'


def _warn(message):
    with contextlib.suppress(Exception):
        sys.stderr.write(f"df-mps-run: {message}\n")


def _import_df_mps():
    try:
        import df_mps  # noqa: F401  (importing it patches, unless DF_MPS_DISABLE=1)
    except Exception as exc:
        _warn(
            f"could not import df_mps in {sys.executable} ({type(exc).__name__}: {exc}); "
            "the program runs unpatched"
        )


def _is_bootstrap_dir(entry):
    # Real paths: the same directory reached through a symlink is still ours. Any other df-mps
    # bootstrap would chain back to this one, and so on: skip them all.
    try:
        entry = entry or os.curdir
        if os.path.realpath(entry) == _HERE:
            return True
        with open(os.path.join(entry, "sitecustomize.py"), encoding="utf-8") as f:
            return f.read(len(_MARK)) == _MARK
    except Exception:
        return False


def _chain_to_next_sitecustomize():
    import importlib.machinery
    import importlib.util

    search = [p for p in sys.path if not _is_bootstrap_dir(p)]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", search)
    if spec is None or spec.loader is None:
        return
    ours = sys.modules.get("sitecustomize")
    module = importlib.util.module_from_spec(spec)
    # It runs under its usual name, as if Python had imported it directly.
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        # Python itself reports a failing sitecustomize and carries on; so do we.
        _warn(f"the next sitecustomize ({spec.origin}) failed: {type(exc).__name__}: {exc}")
        if ours is not None:
            sys.modules["sitecustomize"] = ours


_import_df_mps()
_chain_to_next_sitecustomize()
