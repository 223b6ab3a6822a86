"""Patch machinery: import order, idempotence, exact unpatch, tolerance of missing targets.

Import order matters, so each scenario runs in a fresh interpreter (``run_python``).
"""

import os
from pathlib import Path

import pytest

import df_mps
from conftest import run_python
from df_mps.registry import REGISTRY, submodule_names

pytestmark = pytest.mark.subprocess


def _has_deepfilterlib() -> bool:
    import importlib.util
    import sys

    loaded = sys.modules.get("libdf")
    if loaded is not None:
        return not getattr(loaded, "__df_mps_shim__", False)
    try:
        return importlib.util.find_spec("libdf") is not None
    except (ImportError, ValueError):
        return False


# Scenarios that import df without df_mps need the real DeepFilterLib (CPython <= 3.11).
needs_deepfilterlib = pytest.mark.skipif(
    not _has_deepfilterlib(),
    reason="imports df without df_mps: needs DeepFilterLib (Python <= 3.11)",
)

TESTS = str(Path(__file__).resolve().parent)
# The child side of the harness, and the stand-ins the scenarios need (see patch_harness.py).
HARNESS = f"import sys\nsys.path.insert(0, {TESTS!r})\nimport patch_harness\n"

df_mps._load_patches()  # registered, also where DF_MPS_DISABLE kept `import df_mps` from it
PATCHES = [patch.name for patch in REGISTRY.patches]
DF_MODULES = submodule_names("df")  # every module of the installed df, found on disk


def test_the_harness_covers_every_patch_module():
    from df_mps.patches import PATCH_MODULES

    assert PATCHES and set(PATCH_MODULES) <= set(PATCHES)


# The harness, after ddtrace's PatchTestCase: every registered patch is checked in both import
# orders for being applied to every binding, not double-wrapped by a second patch(), and undone
# to the very original objects by unpatch() (and again after a repatch). A new patch is covered
# by registering it.
@pytest.mark.parametrize("name", PATCHES)
def test_patch_before_import(name):
    run_python(HARNESS + f"patch_harness.check_import_before({name!r}, {DF_MODULES!r})")


@needs_deepfilterlib
@pytest.mark.parametrize("name", PATCHES)
def test_patch_after_import(name):
    # With an older torchaudio, df imports on its own; df_mps then patches what is loaded.
    run_python(HARNESS + f"patch_harness.check_import_after({name!r}, {DF_MODULES!r})")


def test_every_get_device_binding_is_one_wrapper_answering_the_chosen_device():
    proc = run_python(
        HARNESS
        + f"""
patch_harness.install_optional_deps()
import df_mps, torch, wrapt
patch_harness.import_all({DF_MODULES!r})
wrapper = sys.modules["df.utils"].get_device
assert isinstance(wrapper, wrapt.FunctionWrapper), type(wrapper)
assert patch_harness.bindings_of(wrapper.__wrapped__) == []
assert wrapper() == torch.device("cpu")
print(len(patch_harness.bindings_of(wrapper)))
"""
    )
    # df.utils and the ten modules that copy it by name in deepfilternet 0.5.6.
    assert int(proc.stdout.split()[-1]) >= 11


def test_a_binding_in_a_module_no_hook_names_is_patched_and_restored(tmp_path):
    # Stands for a module that a later upstream release adds: df_mps was not told about it.
    (tmp_path / "later_binding.py").write_text(
        "from df.utils import get_device\nfrom df.io import load_audio as read\n"
    )
    run_python(
        HARNESS
        + f"""
import df_mps, df.utils, df.io
original, read = df.utils.get_device.__wrapped__, df.io.load_audio.__wrapped__
sys.modules["df"].__path__.append({str(tmp_path)!r})
import df.later_binding as later
assert later.get_device is df.utils.get_device and later.read is df.io.load_audio
df_mps.unpatch()
assert later.get_device is original and later.read is read
assert df.utils.get_device is original
df_mps.patch()
assert later.get_device is df.utils.get_device and df_mps.REGISTRY.is_wrapper(later.get_device)
df_mps.unpatch()
assert later.get_device is original
"""
    )


@needs_deepfilterlib
def test_plain_df_import_fails_without_df_mps_on_this_torchaudio():
    # The reason the torchaudio patch exists: on torchaudio >= 2.9 `import df` fails alone.
    import torchaudio

    major, minor = (int(x) for x in torchaudio.__version__.split(".")[:2])
    if (major, minor) < (2, 9):
        pytest.skip(f"torchaudio {torchaudio.__version__} still has torchaudio.backend")
    proc = run_python(
        "try:\n    import df.enhance\nexcept ImportError as e:\n    print('ImportError', e)\n"
    )
    assert "torchaudio.backend" in proc.stdout


def test_unpatch_removes_the_torchaudio_stand_in():
    run_python(
        """
import sys, df_mps, torchaudio
import df.io
assert "torchaudio.backend.common" in sys.modules
df_mps.unpatch()
assert "torchaudio.backend.common" not in sys.modules
assert not hasattr(torchaudio, "backend")
df_mps.patch()
from torchaudio.backend.common import AudioMetaData
assert AudioMetaData is df.io.AudioMetaData
"""
    )


def test_modules_imported_after_unpatch_stay_unpatched():
    run_python(
        """
import sys, df_mps
import df.utils
df_mps.unpatch()
import df.multiframe
assert "forward" in df.multiframe.DF.__dict__
import wrapt
assert not isinstance(df.multiframe.DF.__dict__["forward"], wrapt.FunctionWrapper)
df_mps.patch()
assert isinstance(df.multiframe.DF.__dict__["forward"], wrapt.FunctionWrapper)
"""
    )


@needs_deepfilterlib
def test_disable_env_patches_nothing():
    run_python(
        HARNESS
        + """
patch_harness.install_old_torchaudio()
import df_mps, df.enhance, wrapt
assert not df_mps.is_patched()
assert not isinstance(sys.modules["df.utils"].get_device, wrapt.FunctionWrapper)
""",
        env={"DF_MPS_DISABLE": "1"},
    )


def test_missing_target_is_skipped_with_one_warning():
    proc = run_python(
        """
import df.multiframe  # loads fine once df_mps is in: imported below first
""".replace("import df.multiframe  # loads fine once df_mps is in: imported below first", "")
        + """
import sys, df_mps
from df_mps.registry import Patch, Target, REGISTRY
def w(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs)
REGISTRY.add(Patch(name="ghost", targets=[
    Target("df.multiframe", "NoSuchClass.forward", w),
    Target("df.multiframe", "DF.no_such_method", w),
]))
df_mps.patch()
import df.multiframe
df_mps.patch()
print("import ok")
"""
    )
    assert "import ok" in proc.stdout
    assert proc.stderr.count("NoSuchClass.forward is missing") == 1
    assert proc.stderr.count("DF.no_such_method is missing") == 1
    assert "deepfilternet 0.5.x" in proc.stderr


def test_failing_patch_never_breaks_import_df():
    proc = run_python(
        """
import df_mps
from df_mps.registry import Patch, REGISTRY
def boom(module):
    raise RuntimeError("kaboom")
REGISTRY.add(Patch(name="broken", installers={"df.multiframe": boom}))
df_mps.patch()
import df.enhance, df.multiframe
print("import ok")
"""
    )
    assert "import ok" in proc.stdout
    assert "patch 'broken' could not be applied" in proc.stderr and "kaboom" in proc.stderr


def test_failing_wrapper_install_is_logged_not_raised():
    proc = run_python(
        """
import df_mps, df.multiframe
from df_mps.registry import Patch, Target, REGISTRY
class Frozen:
    __slots__ = ()
import types
REGISTRY.add(Patch(name="odd", targets=[Target("df.multiframe", "as_windowed", None)]))
import df_mps.registry as r
orig = r.Registry._make_wrapper
def bad(self, original, wrapper):
    if wrapper is None:
        raise TypeError("cannot wrap")
    return orig(self, original, wrapper)
r.Registry._make_wrapper = bad
df_mps.patch()
print("ok")
"""
    )
    assert "ok" in proc.stdout and "cannot wrap" in proc.stderr


def test_a_failing_binding_scan_is_logged_and_import_df_still_works():
    proc = run_python(
        """
import df_mps.registry as registry
def broken_scan(self, module):
    raise RuntimeError("scan broke")
registry.Registry._bind = broken_scan
import df.enhance, df.utils
assert registry.REGISTRY.is_wrapper(df.utils.get_device)  # the target itself is patched
print("import ok")
"""
    )
    assert "import ok" in proc.stdout
    assert "df_mps: patching df.utils failed" in proc.stderr and "scan broke" in proc.stderr


def test_mps_fallback_is_set_before_torch_on_macos_only():
    from df_mps import _set_mps_fallback

    env = {}
    assert _set_mps_fallback("darwin", env, torch_imported=False) == "set"
    assert env == {"PYTORCH_ENABLE_MPS_FALLBACK": "1"}
    env = {"PYTORCH_ENABLE_MPS_FALLBACK": "0"}  # the user's value is kept
    assert _set_mps_fallback("darwin", env, torch_imported=False) == "nothing"
    assert env == {"PYTORCH_ENABLE_MPS_FALLBACK": "0"}
    env = {}
    assert _set_mps_fallback("linux", env, torch_imported=False) == "nothing"
    assert env == {}


def test_mps_fallback_late_import_warns_once_with_a_fix():
    proc = run_python(
        """
from df_mps import _set_mps_fallback
env = {}
print(_set_mps_fallback("darwin", env, torch_imported=True))
print(_set_mps_fallback("darwin", env, torch_imported=True))
print("FALLBACK", env.get("PYTORCH_ENABLE_MPS_FALLBACK"))
"""
    )
    assert proc.stdout.split() == ["warned", "warned", "FALLBACK", "None"]
    assert proc.stderr.count("torch was imported before df_mps") == 1
    assert "export PYTORCH_ENABLE_MPS_FALLBACK=1" in proc.stderr


def test_import_df_mps_does_not_import_torch():
    # Otherwise the fallback variable could never be set in time.
    proc = run_python("import sys, df_mps\nprint('torch' in sys.modules)")
    assert proc.stdout.strip() == "False"


def test_warning_says_what_and_how_to_override():
    proc = run_python(
        "import df_mps\nfrom df_mps import settings\nsettings.refresh()\n",
        env={"DF_MPS_FORWARD_METHOD": "fastest"},
    )
    assert proc.stderr.count("DF_MPS_FORWARD_METHOD='fastest'") == 1
    assert "uses 'auto'" in proc.stderr


@pytest.mark.parametrize(
    "version, supported",
    [
        ("0.5.6", True),
        ("0.5.0", True),
        ("0.5.7rc1", True),
        ("0.5.6.post1", True),
        ("0.5", True),
        ("0.6.0", False),
        ("0.4.9", False),
        ("0.50.1", False),
        ("1.0.0", False),
        (None, False),
        ("", False),
    ],
)
def test_supported_deepfilternet_is_0_5_x(version, supported):
    from df_mps.registry import SUPPORTED_DEEPFILTERNET, supports_deepfilternet

    assert SUPPORTED_DEEPFILTERNET == "0.5.x"
    assert supports_deepfilternet(version) is supported


def _fake_deepfilternet(directory, version: str) -> dict:
    """An environment in which importlib.metadata reports deepfilternet ``version`` (a dist-info
    ahead of the real one on sys.path); the df package itself stays the installed 0.5.6."""
    info = directory / f"deepfilternet-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: deepfilternet\nVersion: {version}\n"
    )
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))
    }


VERSION_GATE = """
import importlib.metadata, sys
print("version", importlib.metadata.version("deepfilternet"))
import df_mps
from df_mps.registry import Patch, Target, REGISTRY
def passthrough(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs)
REGISTRY.add(Patch(name="ghost", targets=[
    Target("df.multiframe", "NoSuchClass.forward", passthrough),
    Target("df.multiframe", "DF.forward_of_another_release", passthrough),
]))
df_mps.patch()
import df.enhance, df.multiframe, df.modules, df.utils
assert REGISTRY.is_wrapper(df.utils.get_device) and df.modules.get_device is df.utils.get_device
assert REGISTRY.is_wrapper(df.multiframe.DF.__dict__["forward"])
assert not [key for key in REGISTRY.installed() if key[0] == "ghost"]
df_mps.unpatch(); df_mps.patch()
print("import ok")
"""


def test_outside_0_5_x_warns_once_naming_the_version_and_patches_what_resolves(tmp_path):
    proc = run_python(VERSION_GATE, env=_fake_deepfilternet(tmp_path, "0.6.1"))
    assert "version 0.6.1" in proc.stdout and "import ok" in proc.stdout
    assert proc.stderr.count("the installed DeepFilterNet is deepfilternet 0.6.1") == 1
    assert "supports deepfilternet 0.5.x" in proc.stderr
    # A release other than 0.5.x may well lack a target: skipped without a warning of its own.
    assert "is missing" not in proc.stderr


def test_inside_0_5_x_no_version_warning_but_each_missing_target_warns(tmp_path):
    proc = run_python(VERSION_GATE, env=_fake_deepfilternet(tmp_path, "0.5.9"))
    assert "version 0.5.9" in proc.stdout and "import ok" in proc.stdout
    assert "the installed DeepFilterNet is" not in proc.stderr
    assert proc.stderr.count("NoSuchClass.forward is missing") == 1
    assert proc.stderr.count("DF.forward_of_another_release is missing") == 1
    assert "(deepfilternet 0.5.9)" in proc.stderr
