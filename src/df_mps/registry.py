"""Installs wrappers through wrapt post-import hooks, remembers originals, and undoes them.

A patch is a list of ``Target``s. Each target names a module, a dotted attribute inside it and a
wrapt-style wrapper ``(wrapped, instance, args, kwargs)``. When the module is imported (or at
once, if it already is), the attribute is replaced by a ``wrapt.FunctionWrapper``; the original
object is kept so that ``unpatch()`` puts back the very same object.

Targets that name ``origin`` are copies of one function bound by name in several modules
(``from df.utils import get_device``). All their bindings share one wrapper object, so
``df.modules.get_device is df.utils.get_device`` holds while patched just as it did before.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import threading
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import wrapt

from ._log import logger, warn_once

Wrapper = Callable[..., object]
SUPPORTED_DEEPFILTERNET = "0.5.x"


@dataclasses.dataclass(frozen=True)
class Target:
    module: str  # "df.multiframe"
    attr: str  # "DF.forward": a dotted path inside the module
    wrapper: Wrapper
    # For a function bound by name in many modules: where the one original lives.
    origin: Optional[Tuple[str, str]] = None


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


class Registry:
    def __init__(self) -> None:
        self._patches: Dict[str, Patch] = {}
        self._installed: Dict[Tuple[str, str, str], _Installed] = {}
        self._undo: Dict[Tuple[str, str], Callable[[], None]] = {}
        self._shared: Dict[Tuple[str, str], object] = {}  # origin -> shared wrapper
        self._hooked: set = set()
        self._lock = threading.RLock()
        self.active = False

    # -- setup -------------------------------------------------------------------------------
    def add(self, patch: Patch) -> None:
        with self._lock:
            self._patches[patch.name] = patch

    @property
    def patches(self) -> List[Patch]:
        return list(self._patches.values())

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
            for patch in self._patches.values():
                for module_name in patch.modules():
                    if module_name not in self._hooked:
                        self._hooked.add(module_name)
                        # wrapt calls the hook at once if the module is already imported.
                        wrapt.register_post_import_hook(self._on_import, module_name)
                    elif module_name in sys.modules:
                        self._on_import(sys.modules[module_name])

    def unpatch(self) -> None:
        """Put back every original object in every binding, and undo custom installs."""
        with self._lock:
            self.active = False
            for item in reversed(list(self._installed.values())):
                setattr(item.owner, item.name, item.original)
            self._installed.clear()
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
        return any(obj is item.wrapper for item in self._installed.values()) or any(
            obj is w for w in self._shared.values()
        )

    # -- hook --------------------------------------------------------------------------------
    def _on_import(self, module) -> None:
        # Runs inside someone's `import df...`: it must never raise.
        with self._lock:
            if not self.active:
                return
            for patch in self._patches.values():
                for target in patch.targets:
                    if target.module == module.__name__:
                        self._guarded(patch.name, target.attr, self._install, patch, target, module)
                installer = patch.installers.get(module.__name__)
                key = (patch.name, module.__name__)
                if installer is not None and key not in self._undo:
                    undo = self._guarded(patch.name, module.__name__, installer, module)
                    if undo is not None:
                        self._undo[key] = undo

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
        owner, name = _resolve_owner(module, target.attr)
        if owner is None:
            warn_once(
                f"missing-{target.module}.{target.attr}",
                f"df_mps: {target.module}.{target.attr} is missing from the installed "
                f"DeepFilterNet ({_deepfilternet_version()}); patch '{patch.name}' skips it. "
                f"df_mps supports deepfilternet {SUPPORTED_DEEPFILTERNET}.",
            )
            return
        # Class attributes are read raw so that staticmethods and plain functions come back
        # exactly as they were.
        current = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        if target.origin is not None:
            original = self._origin_original(target)
            wrapper = self._shared.get(target.origin)
            if wrapper is None:
                wrapper = self._make_wrapper(original, target.wrapper)
                self._shared[target.origin] = wrapper
            if current is wrapper:
                # Bound by name after the origin was patched: only remember how to undo it.
                self._installed[key] = _Installed(owner, name, original, wrapper)
                return
            if current is not original:
                logger.trace(
                    f"df_mps: {target.module}.{target.attr} was replaced by someone else; "
                    "left alone"
                )
                return
        else:
            original = current
            wrapper = self._make_wrapper(original, target.wrapper)
        setattr(owner, name, wrapper)
        self._installed[key] = _Installed(owner, name, original, wrapper)

    def _origin_original(self, target: Target):
        module_name, attr = target.origin
        for item in self._installed.values():
            if item.wrapper is self._shared.get(target.origin):
                return item.original
        module = importlib.import_module(module_name)
        value = getattr(module, attr)
        return getattr(value, "__wrapped__", value) if self.is_wrapper(value) else value

    def _make_wrapper(self, original, wrapper: Wrapper):
        registry = self

        def gate(wrapped, instance, args, kwargs):
            # A wrapper can outlive unpatch() where someone kept a reference (a DfOp stores
            # its bound forward at construction): then it is inert.
            if not registry.active:
                return wrapped(*args, **kwargs)
            return wrapper(wrapped, instance, args, kwargs)

        return wrapt.FunctionWrapper(original, gate)


def _resolve_owner(module, dotted: str):
    parts = dotted.split(".")
    owner = module
    for part in parts[:-1]:
        owner = getattr(owner, part, None)
        if owner is None:
            return None, None
    name = parts[-1]
    if isinstance(owner, type):
        return (owner, name) if name in owner.__dict__ else (None, None)
    return (owner, name) if hasattr(owner, name) else (None, None)


def _deepfilternet_version() -> str:
    try:
        from importlib.metadata import version

        return "deepfilternet " + version("deepfilternet")
    except Exception:
        return "unknown version"


def iter_targets(patches: Iterable[Patch]):
    for patch in patches:
        for target in patch.targets:
            yield patch.name, target


REGISTRY = Registry()
