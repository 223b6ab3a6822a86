"""The child side of the patch-test harness in test_patching.py (after ddtrace's PatchTestCase).

test_patching runs ``check_import_before`` or ``check_import_after`` for one registered patch in
a fresh interpreter, since import order matters. Nothing here imports df_mps or df at module
level: the order is the scenario's.

The state compared is a snapshot of ``sys.modules`` and of every attribute of every loaded df
module and of every class defined there, by identity: so "unpatch restores the original in every
binding" is checked without a list of bindings.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import inspect
import sys
import types

# Training/evaluation dependencies of df.train, df.evaluation_utils and some df.scripts that are
# not on this stack. Empty stand-ins are importable only so those modules load and their bindings
# can be checked; nothing of theirs runs.
STANDINS = {"libdfdata", "pystoi", "pesq", "librosa", "pandas", "scipy"}
SHIM_ATTR = "__df_mps_shim__"
# The packages df_mps patches or stands in for: their sys.modules entries are compared.
WATCHED = ("df", "libdf", "torchaudio")


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
        return None

    def create_module(self, spec):
        return _Any(spec.name)

    def exec_module(self, module):
        pass


def install_optional_deps() -> None:
    sys.meta_path.insert(0, _StandIns())


def install_old_torchaudio() -> None:
    """What torchaudio < 2.9 provides, so that df imports without df_mps."""
    import dataclasses

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


def import_all(names) -> list:
    """Import each module that imports here (some df.scripts need h5py, icecream, ...; with
    h5py, df.scripts.list_attrs_in_hdf5 parses sys.argv at import and exits)."""
    loaded = []
    for name in names:
        try:
            importlib.import_module(name)
        except (Exception, SystemExit):
            continue
        loaded.append(name)
    return loaded


def _in_df(name: str) -> bool:
    return name == "df" or name.startswith("df.")


def snapshot() -> dict:
    state = {}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in WATCHED or _is_shim(module):
            state[("sys.modules", name)] = module
        if module is None or not _in_df(name):
            continue
        for attr, value in list(vars(module).items()):
            state[(name, attr)] = value
            if isinstance(value, type) and value.__module__ == name:
                for class_attr, class_value in list(vars(value).items()):
                    state[(name, f"{attr}.{class_attr}")] = class_value
    return state


def _is_shim(value) -> bool:
    # From __dict__: a getattr would ask a module's __getattr__ (torch.ops answers any name).
    return bool(getattr(value, "__dict__", {}).get(SHIM_ATTR, False))


def differences(expected: dict, got: dict) -> list:
    """Keys of ``expected`` whose object changed or is gone, and df attributes ``got`` added."""
    changed = [k for k, v in expected.items() if got.get(k, _GONE) is not v]
    added = [
        k
        for k, v in got.items()
        if k not in expected
        and (k[0] != "sys.modules" or _is_shim(v))
        and k[0] in _modules(expected)
    ]
    return changed + added


_GONE = object()


def _modules(state: dict) -> set:
    return {"sys.modules"} | {k[1] for k in state if k[0] == "sys.modules"}


def bindings_of(obj) -> list:
    """(module, attr) of every loaded df module attribute that is ``obj``."""
    return sorted(
        (name, attr)
        for name, module in list(sys.modules.items())
        if module is not None and _in_df(name)
        for attr, value in list(vars(module).items())
        if value is obj
    )


def _patch(name: str):
    from df_mps.registry import REGISTRY

    patch = next((p for p in REGISTRY.patches if p.name == name), None)
    assert patch is not None, f"patch {name!r} is not registered"
    return REGISTRY, patch


def assert_patched(name: str) -> None:
    import wrapt

    import df_mps

    registry, patch = _patch(name)
    assert df_mps.is_patched()
    installed = registry.installed()
    for target in patch.targets:
        importlib.import_module(target.module)
        owner, attr, value = wrapt.resolve_path(sys.modules[target.module], target.attr)
        what = f"{target.module}.{target.attr}"
        assert registry.is_wrapper(value), f"{what} is not wrapped: {value!r}"
        assert not registry.is_wrapper(value.__wrapped__), f"{what}: a wrapper wraps a wrapper"
        assert (name, target.module, target.attr) in installed, what
        if inspect.ismodule(owner):
            # Every binding by name holds the one wrapper, and unpatch knows each of them.
            assert bindings_of(value.__wrapped__) == [], (what, bindings_of(value.__wrapped__))
            for module, binding in bindings_of(value):
                assert (name, module, binding) in installed, (what, module, binding)


def assert_not_double_patched(name: str) -> None:
    import df_mps

    registry, _ = _patch(name)
    state, installed = snapshot(), registry.installed()
    df_mps.patch()
    df_mps.patch()
    assert differences(state, snapshot()) == [], differences(state, snapshot())
    assert registry.installed() == installed
    assert_patched(name)


def assert_unpatched_to(state: dict) -> None:
    """After unpatch: every binding in ``state`` holds what it held before patching."""
    import df_mps
    from df_mps.registry import REGISTRY

    assert not df_mps.is_patched()
    assert REGISTRY.installed() == []
    wrappers = [
        k for k, v in snapshot().items() if k[0] != "sys.modules" and REGISTRY.is_wrapper(v)
    ]
    assert wrappers == [], wrappers
    assert differences(state, snapshot()) == [], differences(state, snapshot())


def unpatched_state(patched: dict) -> dict:
    """What unpatch must give back, from a snapshot taken while patched: each wrapper's original
    (and no stand-in module)."""
    from df_mps.registry import REGISTRY

    state = {}
    for key, value in patched.items():
        if key[0] == "sys.modules" and _is_shim(value):
            continue
        state[key] = value.__wrapped__ if REGISTRY.is_wrapper(value) else value
    return state


def check_import_before(name: str, modules) -> None:
    """df_mps first, then df: every module imported later gets the wrappers."""
    install_optional_deps()
    import df_mps

    assert df_mps.is_patched()
    assert "df" not in sys.modules
    import_all(modules)
    assert_patched(name)
    assert_not_double_patched(name)
    patched = snapshot()
    expected = unpatched_state(patched)
    df_mps.unpatch()
    assert_unpatched_to(expected)
    df_mps.unpatch()  # twice is fine
    assert_unpatched_to(expected)
    df_mps.patch()
    assert_patched(name)
    repatched = snapshot()
    same = [
        k for k in patched if k[0] != "sys.modules" and repatched.get(k, _GONE) is not patched[k]
    ]
    assert same == [], same
    df_mps.unpatch()
    assert_unpatched_to(expected)


def check_import_after(name: str, modules) -> None:
    """df first (on an older torchaudio, with DeepFilterLib), then df_mps: it patches what is
    loaded, changes nothing else, and unpatch gives back the very objects."""
    install_optional_deps()
    install_old_torchaudio()
    import_all(modules)
    before = snapshot()
    import df_mps  # noqa: F401  (patches on import)

    assert_patched(name)
    from df_mps.registry import REGISTRY

    # Patching replaced bindings by wrappers of them and touched nothing else (the real
    # torchaudio.backend and DeepFilterLib stay).
    patched = snapshot()
    changed = [
        k
        for k in differences(before, patched)
        if not (REGISTRY.is_wrapper(patched.get(k)) and patched[k].__wrapped__ is before.get(k))
    ]
    assert changed == [], changed
    assert_not_double_patched(name)
    df_mps.unpatch()
    assert_unpatched_to(before)
    df_mps.unpatch()
    assert_unpatched_to(before)
    df_mps.patch()
    assert_patched(name)
    df_mps.unpatch()
    assert_unpatched_to(before)
