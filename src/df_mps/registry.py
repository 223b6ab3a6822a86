"""Installs wrappers through wrapt post-import hooks, remembers originals, and undoes them.

A patch is a list of ``Target``s. Each target names a module, a dotted attribute inside it and a
wrapt-style wrapper ``(wrapped, instance, args, kwargs)``. When the module is imported (or at
once, if it already is), the attribute (found by ``wrapt.resolve_path``) is replaced by a
``wrapt.FunctionWrapper`` that is enabled only while the registry is active; the original object
is kept so that ``unpatch()`` puts back the very same object.

A target on a module attribute also follows the object wherever its package bound it by name
(``from df.utils import get_device``): every attribute of a loaded module of that package that
*is* the original gets the same wrapper, at patch time and whenever another module of the
package is imported. So ``df.modules.get_device is df.utils.get_device`` holds while patched,
and a binding that a new upstream release adds is caught without a list.

Like OpenTelemetry's ``instrumentation_dependencies``, the registry checks the installed
DeepFilterNet once, when the first of its modules is seen: outside ``SUPPORTED_DEEPFILTERNET`` it
warns once, naming the version, and patches only the targets that resolve (quietly skipping the
rest, which that version is expected to lack).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import re
import sys
import threading
from typing import Callable, Dict, List, Optional, Tuple

import wrapt

from ._log import logger, warn_once

Wrapper = Callable[..., object]
DISTRIBUTION = "deepfilternet"
SUPPORTED_DEEPFILTERNET = "0.5.x"


@dataclasses.dataclass(frozen=True)
class Target:
    module: str  # "df.multiframe"
    attr: str  # "DF.forward": a dotted path inside the module
    wrapper: Wrapper


def replaced_by(function: Callable[..., object]) -> Wrapper:
    """The wrapper for a function target that df_mps reimplements whole: the call goes to
    ``function``, with the same arguments, and never to the original."""

    def wrapper(wrapped, instance, args, kwargs):
        return function(*args, **kwargs)

    return wrapper


@dataclasses.dataclass
class Patch:
    """A named group of targets, plus optional custom installers for non-wrapper patches."""

    name: str
    targets: List[Target] = dataclasses.field(default_factory=list)
    # module name -> callable(module) that installs something and returns an undo callable
    # (or None when it had nothing to do).
    installers: Dict[str, Callable[[object], Optional[Callable[[], None]]]] = dataclasses.field(
        default_factory=dict
    )
    # Runs at every patch() (before any module hook), for what must be in place before a module
    # is imported at all (e.g. a stand-in for a module that can't be imported). Returns an undo
    # callable or None.
    on_patch: Optional[Callable[[], Optional[Callable[[], None]]]] = None

    def modules(self) -> List[str]:
        names = [t.module for t in self.targets] + list(self.installers)
        return list(dict.fromkeys(names))


@dataclasses.dataclass
class _Installed:
    owner: object
    name: str
    original: object
    wrapper: object
    created: bool = False  # the attribute was inherited: unpatch deletes it rather than sets it


def deepfilternet_version() -> Optional[str]:
    """The installed deepfilternet distribution's version, or None where there is none."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return None
    except Exception as exc:  # broken metadata: say so, never fail a patch on it
        logger.trace(f"df_mps: reading {DISTRIBUTION}'s version failed ({exc!r})")
        return None


def supports_deepfilternet(version: Optional[str]) -> bool:
    """Whether ``version`` is in ``SUPPORTED_DEEPFILTERNET`` ("0.5.x": any 0.5 release)."""
    match = re.match(r"(\d+)\.(\d+)(?:\.|$|[a-z])", version or "")
    wanted = SUPPORTED_DEEPFILTERNET.split(".")[:2]
    return match is not None and list(match.groups()) == wanted


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def loaded_modules(package: str) -> List[object]:
    """The imported modules of ``package`` (the package itself included)."""
    return [
        module
        for name, module in list(sys.modules.items())
        if module is not None and in_package(name, package)
    ]


def submodule_names(package: str) -> List[str]:
    """Every module of ``package`` on disk (namespace subpackages too), without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    names = [package]
    pending = [(location, package) for location in (spec and spec.submodule_search_locations or ())]
    while pending:
        location, prefix = pending.pop()
        try:
            entries = sorted(os.listdir(location))
        except OSError:
            continue
        for entry in entries:
            path = os.path.join(location, entry)
            if os.path.isdir(path):
                if entry.isidentifier() and entry != "__pycache__":
                    pending.append((path, f"{prefix}.{entry}"))
                continue
            name = inspect.getmodulename(entry)
            if name and name.isidentifier() and name != "__init__":
                names.append(f"{prefix}.{name}")
    return names


class Registry:
    def __init__(self) -> None:
        self._patches: Dict[str, Patch] = {}
        self._installed: Dict[Tuple[str, str, str], _Installed] = {}
        self._undo: Dict[Tuple[str, str], Callable[[], None]] = {}
        # One wrapper per target for the life of the process: a repatch reuses it while the
        # original is unchanged, so references kept across unpatch/patch stay the wrapper.
        self._wrappers: Dict[Tuple[str, str, str], wrapt.FunctionWrapper] = {}
        # id(original) and id(wrapper) -> (patch, original, wrapper), for module-level targets
        # now installed: what the binding scan looks for.
        self._followed: Dict[int, Tuple[str, object, object]] = {}
        self._hooked: set = set()
        self._supported: Optional[bool] = None  # decided once, when the first df module is seen
        self._lock = threading.RLock()
        self.active = False

    # -- setup -------------------------------------------------------------------------------
    def add(self, patch: Patch) -> None:
        with self._lock:
            self._patches[patch.name] = patch

    @property
    def patches(self) -> List[Patch]:
        return list(self._patches.values())

    def packages(self) -> List[str]:
        """Top-level packages of the targets: where bindings by name are looked for."""
        names = (t.module.split(".")[0] for p in self._patches.values() for t in p.targets)
        return list(dict.fromkeys(names))

    # -- patch / unpatch ---------------------------------------------------------------------
    def patch(self) -> None:
        """Activate every patch: now for imported modules, at import time for the rest."""
        with self._lock:
            self.active = True
            for patch in self._patches.values():
                key = (patch.name, "<patch>")
                if patch.on_patch is not None and key not in self._undo:
                    undo = self._guarded(patch.name, "patch()", patch.on_patch)
                    if undo is not None:
                        self._undo[key] = undo
            names = [m for patch in self._patches.values() for m in patch.modules()]
            for package in self.packages():
                # Every module of the package: one imported later may bind a target by name.
                names += submodule_names(package)
            for module_name in dict.fromkeys(names):
                if module_name not in self._hooked:
                    self._hooked.add(module_name)
                    # wrapt calls the hook at once if the module is already imported.
                    wrapt.register_post_import_hook(self._on_import, module_name)
                elif module_name in sys.modules:
                    self._on_import(sys.modules[module_name])
            self._bind_loaded()  # modules loaded before, that no hook names

    def unpatch(self) -> None:
        """Put back every original object in every binding, and undo custom installs."""
        with self._lock:
            # Modules no hook named (loaded from a path added later) may hold a wrapper they
            # bound by name: find them so that they get the original back too.
            try:
                self._bind_loaded()
            except Exception as exc:  # never let cleanup break the caller
                logger.warning(f"df_mps: looking for bindings to undo failed: {exc!r}")
            self.active = False
            for item in reversed(list(self._installed.values())):
                if not item.created:
                    setattr(item.owner, item.name, item.original)
                elif vars(item.owner).get(item.name) is item.wrapper:
                    delattr(item.owner, item.name)
            self._installed.clear()
            self._followed.clear()
            for undo in reversed(list(self._undo.values())):
                try:
                    undo()
                except Exception as exc:  # never let cleanup break the caller
                    logger.warning(f"df_mps: undoing a patch failed: {exc!r}")
            self._undo.clear()

    def installed(self) -> List[Tuple[str, str, str]]:
        """(patch, module, attr) for every binding now replaced."""
        return sorted(self._installed)

    def is_wrapper(self, obj: object) -> bool:
        return any(obj is w for w in self._wrappers.values())

    # -- hook --------------------------------------------------------------------------------
    def _on_import(self, module) -> None:
        # Runs inside someone's `import df...`: it must never raise. Each install is guarded on
        # its own; this catches what is left (the version check, the binding scan).
        try:
            self._apply(module)
        except Exception as exc:
            name = getattr(module, "__name__", repr(module))
            warn_once(
                f"hook-failed-{name}",
                f"df_mps: patching {name} failed ({exc!r}); DeepFilterNet keeps its own code "
                "there. Report this with `python -m df_mps doctor`; set DF_MPS_DISABLE=1 to turn "
                "df_mps off.",
            )

    def _apply(self, module) -> None:
        with self._lock:
            if not self.active:
                return
            name = module.__name__
            in_scope = any(in_package(name, package) for package in self.packages())
            if in_scope and self._supported is None:
                self._check_version()
            for patch in self._patches.values():
                for target in patch.targets:
                    if target.module == name:
                        self._guarded(patch.name, target.attr, self._install, patch, target, module)
                installer = patch.installers.get(name)
                key = (patch.name, name)
                if installer is not None and key not in self._undo:
                    undo = self._guarded(patch.name, name, installer, module)
                    if undo is not None:
                        self._undo[key] = undo
            if in_scope:
                self._bind(module)

    def _check_version(self) -> None:
        version = deepfilternet_version()
        self._supported = supports_deepfilternet(version)
        if not self._supported:
            warn_once(
                "deepfilternet-version",
                f"df_mps: the installed DeepFilterNet is {_named(version)}, but df_mps supports "
                f"deepfilternet {SUPPORTED_DEEPFILTERNET}; it patches only what it finds there, "
                "and skips the rest. Install deepfilternet 0.5.6, or set DF_MPS_DISABLE=1 to turn "
                "df_mps off.",
            )

    def _guarded(self, patch_name: str, what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:
            warn_once(
                f"patch-failed-{patch_name}-{what}",
                f"df_mps: patch '{patch_name}' could not be applied to {what} ({exc!r}); "
                "DeepFilterNet keeps its own code there. Report this with "
                "`python -m df_mps doctor`; set DF_MPS_DISABLE=1 to turn df_mps off.",
            )
            return None

    def _install(self, patch: Patch, target: Target, module) -> None:
        key = (patch.name, target.module, target.attr)
        if key in self._installed:
            return
        try:
            owner, name, current = wrapt.resolve_path(module, target.attr)
        except AttributeError:
            self._missing(patch, target)
            return
        created = isinstance(owner, type) and name not in vars(owner)
        original = current.__wrapped__ if self.is_wrapper(current) else current
        wrapper = self._wrappers.get(key)
        if wrapper is None or wrapper.__wrapped__ is not original:
            wrapper = self._wrappers[key] = self._make_wrapper(original, target.wrapper)
        setattr(owner, name, wrapper)
        self._installed[key] = _Installed(owner, name, original, wrapper, created)
        if inspect.ismodule(owner):
            entry = (patch.name, original, wrapper)
            self._followed[id(original)] = self._followed[id(wrapper)] = entry
            self._bind_loaded()

    def _missing(self, patch: Patch, target: Target) -> None:
        what = f"{target.module}.{target.attr}"
        if self._supported is False:  # expected outside the supported versions: said once
            logger.trace(f"df_mps: {what} is missing; patch '{patch.name}' skips it")
            return
        warn_once(
            f"missing-{what}",
            f"df_mps: {what} is missing from the installed DeepFilterNet "
            f"({_named(deepfilternet_version())}); patch '{patch.name}' skips it. "
            f"df_mps supports deepfilternet {SUPPORTED_DEEPFILTERNET}.",
        )

    def _bind_loaded(self) -> None:
        if self._followed:
            for package in self.packages():
                for module in loaded_modules(package):
                    self._bind(module)

    def _bind(self, module) -> None:
        """Give the wrapper to every attribute of ``module`` that is a followed original."""
        for name, value in list(getattr(module, "__dict__", {}).items()):
            entry = self._followed.get(id(value))
            if entry is None or (value is not entry[1] and value is not entry[2]):
                continue
            patch_name, original, wrapper = entry
            key = (patch_name, module.__name__, name)
            if key in self._installed:
                continue
            # Bound by name after the origin was patched (value is the wrapper): only remember
            # how to undo it.
            if value is original:
                self._guarded(patch_name, f"{key[1]}.{name}", setattr, module, name, wrapper)
            if getattr(module, name, None) is wrapper:
                self._installed[key] = _Installed(module, name, original, wrapper)

    def _make_wrapper(self, original, wrapper: Wrapper):
        # A wrapper can outlive unpatch() where someone kept a reference (a DfOp stores its
        # bound forward at construction): `enabled` makes it inert then.
        return wrapt.FunctionWrapper(original, wrapper, enabled=self._is_active)

    def _is_active(self) -> bool:
        return self.active


def _named(version: Optional[str]) -> str:
    return f"deepfilternet {version}" if version else "of an unknown version"


REGISTRY = Registry()
