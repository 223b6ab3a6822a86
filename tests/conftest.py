"""Shared fixtures: where the shared data lives, and a fresh-interpreter runner.

The shared data (real DFN3 weights, speech samples) lives at ``../shared`` from the repo root;
``DF_MPS_SHARED`` overrides that. Tests that need it skip, saying why, where it is absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DF_MPS_SHARED", REPO.parent / "shared"))

# The suite runs on the CPU, also on a machine with a GPU: the emulation stands the CPU in for a
# device without complex support, and the equivalence bounds are CPU bounds. DF_MPS_TEST_DEVICE
# picks another device for the tests that honour it (the `mps` hardware tests pick MPS).
TEST_DEVICE = os.environ.get("DF_MPS_TEST_DEVICE", "cpu")
os.environ["DF_MPS_DEVICE"] = TEST_DEVICE
os.environ["DEVICE"] = TEST_DEVICE  # upstream's own get_device, for the unpatched comparisons


def _torch_threads() -> None:
    # One thread: on a 2-core machine a busy neighbour slowed 2-thread inference 250x.
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("DF_MPS_TEST_THREADS", "1")))
    except ImportError:
        pass


_torch_threads()


def pytest_collection_modifyitems(config, items):
    import platform

    on_mac_gpu = sys.platform == "darwin" and platform.machine() == "arm64"
    if on_mac_gpu:
        try:
            import torch

            on_mac_gpu = torch.backends.mps.is_available()
        except ImportError:
            on_mac_gpu = False
    if on_mac_gpu:
        return
    skip = pytest.mark.skip(reason="needs real Apple-Silicon MPS hardware (macOS, arm64, MPS)")
    for item in items:
        if "mps" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set DF_MPS_SHARED to its path)")
    return SHARED


@pytest.fixture(scope="session")
def dfn3_model_dir(shared_dir) -> Path:
    path = shared_dir / "models" / "DeepFilterNet3"
    if not (path / "config.ini").is_file():
        pytest.skip(f"DFN3 model dir not found at {path}")
    return path


@pytest.fixture(scope="session")
def audio_dir(shared_dir) -> Path:
    path = shared_dir / "audio"
    if not (path / "noisy_white.wav").is_file():
        pytest.skip(f"shared audio not found at {path}")
    return path


def run_python(
    code: str, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (import order matters there). Raises on failure."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DF_MPS_")}
    full_env["DF_MPS_SHARED"] = str(SHARED)
    full_env["DF_MPS_DEVICE"] = full_env["DEVICE"] = TEST_DEVICE
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"child failed with {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def python_child():
    return run_python


@pytest.fixture(scope="module")
def dfn3(dfn3_model_dir):
    """Upstream's DFN3 (model in eval mode, df_state) from the shared weights, per module."""
    from df.enhance import init_df

    model, df_state, _ = init_df(str(dfn3_model_dir), log_file=None, log_level="ERROR")
    return model.eval(), df_state


@pytest.fixture(scope="module")
def enhancer(dfn3_model_dir):
    """The default ``df_mps.api.Enhancer`` on the shared DFN3, per module (modules that need
    other options define their own)."""
    from df_mps.api import Enhancer

    return Enhancer(dfn3_model_dir)
