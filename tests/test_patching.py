"""Patch machinery: import order, idempotence, exact unpatch, tolerance of missing targets.

Import order matters, so each scenario runs in a fresh interpreter (``run_python``).
"""

import pytest

from conftest import run_python

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

# Training/evaluation dependencies of df.train and df.evaluation_utils that are not on this
# stack (libdfdata, pystoi, pesq, librosa, pandas, scipy). Empty stand-ins are importable only
# so those two modules load and their get_device bindings can be checked; nothing of theirs runs.
OPTIONAL_DEPS = """
import sys, types, importlib.abc, importlib.machinery
STANDINS = {"libdfdata", "pystoi", "pesq", "librosa", "pandas", "scipy"}
class _Any(types.ModuleType):
    __path__ = []
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return object
class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in STANDINS:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        return _Any(spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, _StandIns())
"""

# What an older torchaudio (< 2.9) provides, so df imports without df_mps.
OLD_TORCHAUDIO = """
import sys, types, dataclasses
@dataclasses.dataclass
class AudioMetaData:
    sample_rate: int
    num_frames: int
    num_channels: int
    bits_per_sample: int = 0
    encoding: str = "PCM_S"
backend = types.ModuleType("torchaudio.backend")
common = types.ModuleType("torchaudio.backend.common")
common.AudioMetaData = AudioMetaData
backend.common = common
sys.modules["torchaudio.backend"] = backend
sys.modules["torchaudio.backend.common"] = common
"""

# Spelled out (not imported from df_mps, which would patch as a side effect).
BINDING_MODULES = (
    "df.utils",
    "df.modules",
    "df.enhance",
    "df.deepfilternet",
    "df.deepfilternet2",
    "df.deepfilternet3",
    "df.deepfilternetmf",
    "df.logger",
    "df.loss",
    "df.train",
    "df.evaluation_utils",
)

BINDINGS = (
    "import importlib, sys\n"
    f"MODS = [importlib.import_module(m) for m in {BINDING_MODULES!r}]\n"
    + """
def bindings():
    return {m.__name__: m.get_device for m in MODS}
"""
)

CHECK_PATCHED = """
import wrapt, df_mps
b = bindings()
assert df_mps.is_patched()
wrapper = sys.modules["df.utils"].get_device
assert isinstance(wrapper, wrapt.FunctionWrapper), type(wrapper)
assert all(v is wrapper for v in b.values()), {k: type(v) for k, v in b.items()}
import df.multiframe, df.modules, df.stoi
assert isinstance(df.multiframe.DF.__dict__["forward"], wrapt.FunctionWrapper)
assert isinstance(df.modules.DfOp.__dict__["set_forward"], wrapt.FunctionWrapper)
import torch
assert wrapper() == torch.device("cpu")
"""


def test_binding_list_matches_the_device_patch():
    from df_mps.patches.device import BINDING_MODULES as patched

    assert tuple(patched) == BINDING_MODULES


def test_df_mps_first_then_df():
    run_python(
        OPTIONAL_DEPS
        + "import df_mps\nimport df.enhance\n"
        + BINDINGS
        + CHECK_PATCHED
        + "print('ok')"
    )


@needs_deepfilterlib
def test_df_first_then_df_mps():
    # With an older torchaudio, df imports on its own; df_mps then patches what is loaded.
    run_python(
        OPTIONAL_DEPS
        + OLD_TORCHAUDIO
        + "import df.enhance\n"
        + BINDINGS
        + "import wrapt\n"
        + "assert not any(isinstance(v, wrapt.FunctionWrapper) for v in bindings().values())\n"
        + "import df_mps\n"
        + CHECK_PATCHED
        + "assert sys.modules['torchaudio.backend.common'].AudioMetaData is AudioMetaData\n"
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


def test_patch_twice_does_not_wrap_twice():
    run_python(
        OPTIONAL_DEPS
        + "import df_mps, df.enhance\n"
        + BINDINGS
        + """
before = bindings()
installed = df_mps.REGISTRY.installed()
df_mps.patch(); df_mps.patch()
assert bindings() == before and all(bindings()[k] is before[k] for k in before)
assert df_mps.REGISTRY.installed() == installed
w = sys.modules["df.utils"].get_device
assert not hasattr(w.__wrapped__, "__wrapped__"), "wrapper wraps a wrapper"
"""
    )


@needs_deepfilterlib
def test_unpatch_restores_identity_everywhere_and_repatch_works():
    run_python(
        OPTIONAL_DEPS
        + OLD_TORCHAUDIO
        + "import df.enhance\n"
        + BINDINGS
        + """
import df.multiframe, df.modules, df.stoi, df.loss, df.deepfilternet3
originals = bindings()
orig_df = df.multiframe.DF.__dict__["forward"]
orig_setf = df.modules.DfOp.__dict__["set_forward"]
orig_cs = df.modules.DfOp.__dict__["forward_complex_strided"]
orig_net = df.deepfilternet3.DfNet.__dict__["forward"]
orig_stoi = df.stoi.stoi
assert df.loss.stoi is orig_stoi
import df_mps
assert sys.modules["df.utils"].get_device is not originals["df.utils"]
df_mps.unpatch()
assert not df_mps.is_patched()
after = bindings()
changed = [k for k in originals if after[k] is not originals[k]]
assert not changed, changed
assert df.multiframe.DF.__dict__["forward"] is orig_df
assert df.modules.DfOp.__dict__["set_forward"] is orig_setf
assert df.modules.DfOp.__dict__["forward_complex_strided"] is orig_cs
assert df.deepfilternet3.DfNet.__dict__["forward"] is orig_net
assert df.stoi.stoi is orig_stoi and df.loss.stoi is orig_stoi
assert df_mps.REGISTRY.installed() == []
df_mps.unpatch()  # twice is fine
df_mps.patch()
"""
        + CHECK_PATCHED
        + """
df_mps.unpatch()
assert all(bindings()[k] is originals[k] for k in originals)
"""
    )


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
        OLD_TORCHAUDIO
        + """
import sys, df_mps, df.enhance, wrapt
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
