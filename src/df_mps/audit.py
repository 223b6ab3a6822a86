"""Audit a model for a device you don't have: every aten op it sends there, checked offline.

``audit(model_or_fn, *example_inputs, device="mps", macos=(13, 6))`` runs the call once on the
CPU under a ``TorchDispatchMode`` that records each aten op with the dtypes and shapes it saw,
and classifies the op for the target against the installed torch's operator registry
(``torchgen/packaged/ATen/native/native_functions.yaml``, shipped in every torch wheel):

- ``kernel``: the target backend has its own kernel (``MPS: ...`` in ``dispatch``, directly or
  through ``structured_delegate``);
- ``composite``: CompositeExplicitAutograd(NonFunctional), one kernel for every backend;
- ``decomposed``: CompositeImplicitAutograd; its parts are traced and checked in turn;
- ``view``: a view or metadata op, which launches no kernel;
- ``no kernel``: no kernel for the target, so a CPU fallback with a sync and two copies under
  ``PYTORCH_ENABLE_MPS_FALLBACK=1`` and an error without it (error);
- ``unknown``: not in the registry (custom or non-aten ops); never taken for ok (error);
- a ``dtype`` the target lacks: float64 on every macOS, complex and bfloat16 before macOS 14
  (error);
- a host ``sync``: ``.item()``, data-dependent output shapes (``nonzero``, ``masked_select``,
  boolean indexing, ``unique``), and device-to-host copies (``.cpu()``, ``.to("cpu")``,
  ``.numpy()``, ``.tolist()``) (a warning: slow, not wrong).

Kernels are counted per call: every op that is not a view, not decomposed. ``AuditReport``
prints as a short table; ``.ok`` is False on any error-class finding.

    from df_mps.testing import audit
    report = audit(model, spec, erb_feat, spec_feat, device="mps", macos=(13, 6))
    print(report)          # the table and the findings
    assert report.ok

While the audit runs, df_mps's capabilities describe the target with the CPU standing in for
it, so df_mps routes as it would there (before macOS 14: no complex on the device, so the real
kernels). The CPU's oneDNN paths are switched off, so the CPU takes the generic code that other
backends run.

Checked against torch's own sources (pytorch/pytorch main): ``addmm`` has an MPS kernel
(``TORCH_IMPL_FUNC(addmm_out_mps)``, native/mps/operations/LinearAlgebra.mm), ``sigmoid`` an MPS
stub (``REGISTER_UNARY_TI_DISPATCH(sigmoid)``, a Metal kernel), ``convolution`` reaches
``_mps_convolution``; ``mode`` has CPU, CUDA and XPU kernels only (pytorch/pytorch#195275, "[MPS]
Add mode", is still open), as has ``linalg_eig`` (CPU, CUDA); aten/src/ATen/mps/MPSFallback.mm
sends ``embedding_renorm_``, ``linalg_svd``, ``col2im`` and ``upsample_nearest3d.vec`` to the
CPU even without the environment variable, and registers the error fallback for every other
op without a kernel. tests/test_audit.py checks these against the installed registry.

Known gaps (what the audit can't see from the CPU):

- Composite-explicit ops (``convolution``, ``zeros``, ...) count as one kernel and as supported
  on every backend; what they call inside is not traced, and a backend may run several kernels.
- A backend kernel can still refuse some dtypes or shapes at run time (MPS's int64 reductions
  on old macOS, ``index`` with many dims, conv with more than 65536 channels, ...); the registry
  only says a kernel exists. Only the float64/complex/bfloat16 rules are checked.
- Kernels registered outside native_functions.yaml (``TORCH_LIBRARY_IMPL`` in .mm files) are
  known only where listed in ``EXTRA_KERNELS``; others show as ``no kernel``.
- A structured kernel shared between backends (``CPU, CUDA, MPS: sigmoid_out``) calls a
  DispatchStub that each backend registers; a stub MPS forgot shows as ``kernel`` here and
  raises there.
- For CUDA the counts are the generic ones: there ``nn.GRU`` runs cuDNN's fused kernels, which
  a CPU trace can't show, so CUDA launches far fewer kernels than counted.
- Ops that reach the device through TorchScript are traced, but ``.cpu()`` or ``.numpy()`` on
  a tensor already on the CPU dispatch nothing in TorchScript, so such copies inside scripted
  code are not seen. In eager code they are (a ``TorchFunctionMode``).
- Everything the call runs counts as running on the target; ops df_mps deliberately sends to
  the CPU (STOI's CPU route) count too.
- The CPU's shapes are the target's, but not its launch fusion: MPSGraph may fuse nothing or
  a little more; the count is what torch dispatches.
- ``torch_version`` other than the installed one needs that version's native_functions.yaml
  (``registry_path``); the classification is only as good as the file.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    "AuditReport",
    "Finding",
    "OpEntry",
    "OpRecord",
    "Target",
    "audit",
    "classify",
    "native_functions_path",
    "parse_native_functions",
    "registry",
    "target_routes",
]

MacVersion = Tuple[int, int]

# Kinds of op, for the target.
KERNEL = "kernel"
COMPOSITE = "composite"
DECOMPOSED = "decomposed"
VIEW = "view"
NO_KERNEL = "no kernel"
UNKNOWN = "unknown"
ERROR_KINDS = (NO_KERNEL, UNKNOWN)

# aten ops that MPSFallback.mm (pytorch main) routes to the CPU fallback unconditionally.
MPS_FORCED_FALLBACK = frozenset(
    {"embedding_renorm_", "linalg_svd", "linalg_svd.U", "col2im", "upsample_nearest3d.vec"}
)
# Kernels registered with TORCH_LIBRARY_IMPL(aten, <backend>, m) outside native_functions.yaml.
EXTRA_KERNELS: Mapping[str, frozenset] = {
    "MPS": frozenset({"_copy_from", "_copy_from_and_resize"}),  # native/mps/operations/Copy.mm
}
# Ops that only allocate or set metadata: no kernel launch.
METADATA_OPS = frozenset(
    {
        "empty.memory_format",
        "empty_strided",
        "empty_like",
        "new_empty",
        "new_empty_strided",
        "resize_",
        "set_.source_Storage",
        "set_.source_Storage_storage_offset",
        "set_.source_Tensor",
        "lift_fresh",
        "_unsafe_view",
        "_reshape_alias",
        "detach",
        "detach_",
        # split/chunk without view tracking: views all the same.
        "unsafe_split.Tensor",
        "unsafe_split_with_sizes",
        "unsafe_chunk",
        "sym_size.int",
        "sym_stride.int",
        "sym_numel",
        "sym_storage_offset",
        "is_same_size",
        "_has_compatible_shallow_copy_type",
        "result_type.Tensor",
        "result_type.Scalar",
        "result_type.Scalar_Tensor",
        "result_type.Scalar_Scalar",
    }
)
# Host syncs the runtime tags don't mark (data_dependent_output, dynamic_output_shape do).
SYNC_OPS = frozenset({"_local_scalar_dense", "item", "equal", "is_nonzero", "allclose"})
# Tensor methods that copy device memory to the host (seen by a TorchFunctionMode).
HOST_COPY_METHODS = ("cpu", "numpy", "tolist", "__array__")


# -- the registry ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OpEntry:
    """What native_functions.yaml says about one op (``name.overload``)."""

    name: str
    dispatch: Mapping[str, str]  # dispatch key -> kernel name
    structured_delegate: Optional[str] = None
    autogen: bool = False  # generated by another entry's ``autogen:`` (CompositeExplicit)


def native_functions_path() -> Path:
    """The installed torch's operator registry."""
    import torchgen

    path = Path(torchgen.__file__).parent / "packaged" / "ATen" / "native" / "native_functions.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"the torch wheel has no operator registry at {path}")
    return path


def _strip_comment(text: str) -> str:
    cut = text.find("#")
    return (text if cut < 0 else text[:cut]).strip()


def parse_native_functions(text: str) -> Dict[str, OpEntry]:
    """The fields the audit needs from native_functions.yaml, without a YAML library.

    The file is regular: each entry starts with ``- func: name.overload(...) -> ...``; its keys
    are indented by two spaces, ``dispatch:``'s lines by four (``CPU, CUDA: kernel``). An
    entry with ``ufunc_inner_loop`` gets CPU and CUDA kernels from torchgen, as ``ufunc``.
    tests/test_audit.py checks the result against PyYAML's parse where PyYAML is installed.
    """
    entries: Dict[str, OpEntry] = {}
    current: Optional[dict] = None
    in_dispatch = False

    def flush():
        if current is None:
            return
        entries[current["name"]] = OpEntry(
            current["name"], dict(current["dispatch"]), current["delegate"]
        )
        for generated in current["autogen"]:
            entries.setdefault(
                generated,
                OpEntry(generated, {"CompositeExplicitAutograd": generated}, autogen=True),
            )

    for raw in text.splitlines():
        if raw.startswith("- func:"):
            flush()
            signature = raw[len("- func:") :].strip()
            current = {
                "name": signature.split("(", 1)[0].strip(),
                "dispatch": {},
                "delegate": None,
                "autogen": [],
            }
            in_dispatch = False
            continue
        if current is None or not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw.startswith("    ") and in_dispatch:
            line = _strip_comment(raw)
            if ":" in line:
                keys, kernel = line.split(":", 1)
                for key in keys.split(","):
                    current["dispatch"][key.strip()] = kernel.strip()
            continue
        if raw.startswith("  ") and not raw.startswith("   "):
            line = _strip_comment(raw)
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            in_dispatch = key == "dispatch"
            if key == "structured_delegate":
                current["delegate"] = value
            elif key == "ufunc_inner_loop":
                # torchgen generates the CPU and CUDA kernels of a ufunc entry (add.out)
                current["dispatch"].setdefault("CPU", "ufunc")
                current["dispatch"].setdefault("CUDA", "ufunc")
            elif key == "autogen":
                current["autogen"] = [v.strip() for v in value.split(",") if v.strip()]
    flush()
    return entries


@functools.lru_cache(maxsize=4)
def _registry_at(path: str, mtime_ns: int, size: int) -> Dict[str, OpEntry]:
    del mtime_ns, size  # part of the cache key only: a reinstalled torch is parsed again
    return parse_native_functions(Path(path).read_text(encoding="utf-8"))


def registry(path: Union[str, os.PathLike, None] = None) -> Dict[str, OpEntry]:
    """The parsed registry (``name.overload`` -> OpEntry) of the installed torch, or of ``path``.

    Parsed once per process and file (about 30 ms for torch 2.14's 3,000 entries, so no disk
    cache), offline: the file ships in the torch wheel.
    """
    resolved = Path(path) if path is not None else native_functions_path()
    stat = resolved.stat()
    return _registry_at(str(resolved.resolve()), stat.st_mtime_ns, stat.st_size)


def classify(
    name: str, backend: str = "MPS", entries: Optional[Mapping[str, OpEntry]] = None
) -> Tuple[str, str]:
    """(kind, detail) of op ``name`` (``add.Tensor``; ``mode`` for a default overload) on
    ``backend`` (a dispatch key: "MPS", "CUDA", "CPU"), from the registry alone."""
    entries = registry() if entries is None else entries
    seen = set()
    current = name
    while True:
        if current in seen:  # a cycle in the file: say so rather than loop
            return UNKNOWN, f"structured_delegate cycle at {current}"
        seen.add(current)
        if backend == "MPS" and current in MPS_FORCED_FALLBACK:
            return NO_KERNEL, "MPSFallback.mm sends it to the CPU"
        if current in EXTRA_KERNELS.get(backend, ()):
            return KERNEL, f"{backend} kernel registered outside native_functions.yaml"
        entry = entries.get(current)
        if entry is None:
            return UNKNOWN, "not in the installed torch's native_functions.yaml"
        keys = entry.dispatch
        if backend in keys:
            via = f" (via {current})" if current != name else ""
            return KERNEL, f"{backend}: {keys[backend]}{via}"
        for composite in ("CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional"):
            if composite in keys:
                return COMPOSITE, composite
        if entry.structured_delegate:
            current = entry.structured_delegate
            continue
        if not keys or "CompositeImplicitAutograd" in keys:
            return DECOMPOSED, "CompositeImplicitAutograd"
        return NO_KERNEL, "kernels only for " + ", ".join(sorted(keys))


# -- the target -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    device: str = "mps"
    macos: Optional[MacVersion] = (13, 6)
    torch_version: str = ""

    @property
    def backend(self) -> str:
        return {"mps": "MPS", "cuda": "CUDA", "cpu": "CPU", "xpu": "XPU"}[self.device]

    @property
    def complex_ok(self) -> bool:
        from .capabilities import MPS_COMPLEX_MIN_MACOS

        if self.device != "mps":
            return True
        return self.macos is not None and tuple(self.macos) >= MPS_COMPLEX_MIN_MACOS

    def missing_dtype(self, dtype) -> Optional[str]:
        """Why the target can't hold ``dtype``, or None."""
        import torch

        if self.device != "mps":
            return None
        if dtype in (torch.float64, torch.complex128):
            return "MPS has no float64 on any macOS"
        if (dtype.is_complex or dtype == torch.bfloat16) and not self.complex_ok:
            return "MPS has complex and bfloat16 only from macOS 14"
        return None

    def describe(self) -> str:
        text = self.device
        if self.device == "mps" and self.macos is not None:
            text += f" on macOS {self.macos[0]}.{self.macos[1]}"
        return text + (f", torch {self.torch_version}" if self.torch_version else "")


# -- the report ---------------------------------------------------------------------------------
@dataclasses.dataclass
class OpRecord:
    """One aten op as the call used it."""

    op: str  # name.overload, as in native_functions.yaml ("mode" for the default overload)
    kind: str
    detail: str
    count: int = 0
    dtypes: set = dataclasses.field(default_factory=set)
    shapes: list = dataclasses.field(default_factory=list)  # the first few distinct ones
    missing_dtypes: Dict[str, str] = dataclasses.field(default_factory=dict)  # dtype -> why
    sync: str = ""  # why it waits for the device, if it does

    @property
    def launches(self) -> int:
        return 0 if self.kind in (VIEW, DECOMPOSED) else self.count


@dataclasses.dataclass(frozen=True)
class Finding:
    severity: str  # "error" or "warning"
    kind: str  # "no kernel", "unknown", "dtype", "sync"
    op: str
    count: int
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.kind}: {self.op} x{self.count}: {self.message}"


@dataclasses.dataclass(repr=False)
class AuditReport:
    target: Target
    ops: List[OpRecord]
    calls: int = 1
    host_copies: Dict[str, int] = dataclasses.field(default_factory=dict)  # method -> count

    @property
    def kernels(self) -> int:
        """Kernels launched on the target over all calls."""
        return sum(r.launches for r in self.ops)

    @property
    def kernels_per_call(self) -> float:
        return self.kernels / max(self.calls, 1)

    @property
    def syncs(self) -> int:
        return sum(r.count for r in self.ops if r.sync) + sum(self.host_copies.values())

    def count(self, op: str) -> int:
        return sum(r.count for r in self.ops if r.op == op)

    @property
    def no_kernel(self) -> Dict[str, int]:
        return {r.op: r.count for r in self.ops if r.kind in ERROR_KINDS}

    @property
    def missing_dtypes(self) -> Dict[str, List[str]]:
        """dtype -> the ops that used it."""
        out: Dict[str, List[str]] = collections.defaultdict(list)
        for r in self.ops:
            for dtype in r.missing_dtypes:
                out[dtype].append(r.op)
        return dict(out)

    @property
    def findings(self) -> List[Finding]:
        found = []
        for r in self.ops:
            if r.kind in ERROR_KINDS:
                found.append(Finding("error", r.kind, r.op, r.count, r.detail))
            for dtype, why in sorted(r.missing_dtypes.items()):
                found.append(Finding("error", "dtype", r.op, r.count, f"{dtype}: {why}"))
        for r in self.ops:
            if r.sync:
                found.append(Finding("warning", "sync", r.op, r.count, r.sync))
        for method, n in self.host_copies.items():
            found.append(Finding("warning", "sync", f"Tensor.{method}", n, "device-to-host copy"))
        return found

    @property
    def errors(self) -> List[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        if self.ok:
            warn = [f for f in self.findings if f.severity == "warning"]
            return f"OK for {self.target.describe()}" + (
                f" ({len(warn)} warning(s): host syncs)" if warn else ""
            )
        return f"NOT OK for {self.target.describe()}: " + "; ".join(
            f"{f.kind} {f.op}" + (f" ({f.message.split(':')[0]})" if f.kind == "dtype" else "")
            for f in self.errors
        )

    def table(self, limit: int = 20) -> str:
        by_kind = collections.Counter()
        for r in self.ops:
            by_kind[r.kind] += r.count
        rows = sorted(
            self.ops,
            key=lambda r: (-(r.kind in ERROR_KINDS or bool(r.missing_dtypes)), -r.count, r.op),
        )
        width = max([len(r.op) for r in rows[:limit]] + [8])
        lines = [
            f"audit for {self.target.describe()}: {len(self.ops)} distinct ops, "
            f"{self.kernels_per_call:.0f} kernels per call, {self.syncs} host sync(s)",
            "  by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items())),
            f"  {'op':<{width}}  {'count':>7}  {'kind':<10}  dtypes",
        ]
        for r in rows[:limit]:
            flags = "".join([" DTYPE" if r.missing_dtypes else "", " SYNC" if r.sync else ""])
            dtypes = ",".join(sorted(r.dtypes))
            lines.append(f"  {r.op:<{width}}  {r.count:>7}  {r.kind:<10}  {dtypes}{flags}")
        if len(rows) > limit:
            lines.append(f"  ... {len(rows) - limit} more op(s)")
        for f in self.findings:
            lines.append(f"  {f}")
        lines.append(self.summary())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"<AuditReport: {self.summary()}>"

    def to_dict(self) -> dict:
        return {
            "target": dataclasses.asdict(self.target),
            "calls": self.calls,
            "kernels": self.kernels,
            "syncs": self.syncs,
            "ok": self.ok,
            "ops": [
                {
                    "op": r.op,
                    "kind": r.kind,
                    "count": r.count,
                    "dtypes": sorted(r.dtypes),
                    "missing_dtypes": r.missing_dtypes,
                    "sync": r.sync,
                }
                for r in self.ops
            ],
            "host_copies": dict(self.host_copies),
            "findings": [dataclasses.asdict(f) for f in self.findings],
        }


# -- the trace ----------------------------------------------------------------------------------
def _op_name(func) -> str:
    schema = func._schema
    name = schema.name.split("::", 1)[-1]
    return f"{name}.{schema.overload_name}" if schema.overload_name else name


def _namespace(func) -> str:
    return func._schema.name.split("::", 1)[0]


def _is_view(func) -> bool:
    """A return aliases an input without writing to it: a view (no kernel)."""
    for ret in func._schema.returns:
        info = ret.alias_info
        if info is not None and not info.is_write:
            return True
    return False


class _Recorder:
    def __init__(self, target: Target, entries: Mapping[str, OpEntry], max_shapes: int = 4):
        self.target = target
        self.entries = entries
        self.max_shapes = max_shapes
        self.records: Dict[str, OpRecord] = {}
        self.host_copies: Dict[str, int] = collections.Counter()
        self._kinds: Dict[str, Tuple[str, str]] = {}

    def kind_of(self, func) -> Tuple[str, str]:
        key = func.name()
        known = self._kinds.get(key)
        if known is None:
            name = _op_name(func)
            if _namespace(func) != "aten":
                known = (UNKNOWN, f"{_namespace(func)}:: op, not in the aten registry")
            elif name in METADATA_OPS:
                known = (VIEW, "allocation or metadata only")
            else:
                known = classify(name, self.target.backend, self.entries)
                if known[0] in (KERNEL, COMPOSITE) and _is_view(func):
                    known = (VIEW, "view")
            self._kinds[key] = known
        return known

    def record(self, func, args, kwargs, out, kind: Tuple[str, str]) -> None:
        import torch
        from torch.utils._pytree import tree_flatten

        name = _op_name(func)
        rec = self.records.get(name)
        if rec is None:
            rec = self.records[name] = OpRecord(name, kind[0], kind[1])
        rec.count += 1
        leaves = tree_flatten((args, kwargs))[0] + tree_flatten(out)[0]
        shapes = []
        for leaf in leaves:
            dtype = None
            if isinstance(leaf, torch.Tensor):
                dtype = leaf.dtype
                if len(shapes) < 3:
                    shapes.append(tuple(leaf.shape))
            elif isinstance(leaf, torch.dtype):
                dtype = leaf
            if dtype is None:
                continue
            text = str(dtype).replace("torch.", "")
            rec.dtypes.add(text)
            why = self.target.missing_dtype(dtype)
            if why is not None:
                rec.missing_dtypes[text] = why
        if len(rec.shapes) < self.max_shapes and shapes not in rec.shapes:
            rec.shapes.append(shapes)
        sync = "" if kind[0] == DECOMPOSED else self._sync(func, name, args)
        if sync:  # (a decomposed op's parts carry its sync)
            rec.sync = sync

    @staticmethod
    def _sync(func, name: str, args) -> str:
        import torch

        tags = set(getattr(func, "tags", ()))
        if name.split(".")[0] in SYNC_OPS or torch.Tag.data_dependent_output in tags:
            return "reads a device value on the host"
        if torch.Tag.dynamic_output_shape in tags:
            return "output shape depends on the data"
        if name == "index.Tensor" and len(args) > 1:
            for index in args[1]:
                if isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8):
                    return "boolean-mask indexing (nonzero inside)"
        return ""


def _make_modes(recorder: _Recorder):
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpTrace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            kind = recorder.kind_of(func)
            if kind[0] == DECOMPOSED:
                # Seen only where autograd's key was skipped (inference mode): run the
                # decomposition under this mode again, so its parts are traced and checked.
                with self:
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    recorder.record(func, args, kwargs, out, kind)
                    return out
            out = func(*args, **kwargs)
            recorder.record(func, args, kwargs, out, kind)
            return out

    class HostCopies(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            import torch

            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name in HOST_COPY_METHODS and args and isinstance(args[0], torch.Tensor):
                recorder.host_copies[name] += 1
            elif (
                name == "to"
                and args
                and isinstance(args[0], torch.Tensor)
                and _to_host(args[1:], kwargs)
            ):
                recorder.host_copies["to(cpu)"] += 1
            return func(*args, **kwargs)

    return OpTrace(), HostCopies()


def _to_host(args, kwargs) -> bool:
    import torch

    for value in list(args) + [kwargs.get("device")]:
        if isinstance(value, str) and value.split(":")[0] == "cpu":
            return True
        if isinstance(value, torch.device) and value.type == "cpu":
            return True
    return False


@contextlib.contextmanager
def _generic_cpu_paths() -> Iterator[None]:
    """Switch off the CPU's oneDNN paths, which no other backend has: where torch would pick
    oneDNN's fused RNN or a oneDNN-only op on the CPU (it does for some dtypes and builds), the
    trace would show CPU-only ops that the target never runs. (With torch 2.14 and float32,
    nn.GRU takes the generic per-step cell either way.)"""
    import torch

    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


@contextlib.contextmanager
def target_routes(target: Target) -> Iterator[None]:
    """Inside the block, df_mps's capabilities are the target's, the CPU standing in for its
    device: where the target lacks complex, so does the CPU, and df_mps routes around it."""
    from . import capabilities

    caps = capabilities.get()
    without = frozenset() if target.complex_ok else frozenset({"cpu"})
    with capabilities.override(
        dataclasses.replace(caps, devices_without_complex=without, emulated=True)
    ):
        yield


def audit(
    model_or_fn: Callable,
    *example_inputs,
    device: str = "mps",
    macos: Union[MacVersion, Sequence[int], str, None] = (13, 6),
    torch_version: Optional[str] = None,
    registry_path: Union[str, os.PathLike, None] = None,
    routes: bool = True,
) -> AuditReport:
    """Run ``model_or_fn(*example_inputs)`` once on the CPU and audit every aten op it sends to
    ``device`` (``"mps"``, ``"cuda"``, ``"cpu"``) on ``macos`` (a tuple, "13.6", or None) with
    ``torch_version`` (None: the installed torch, whose registry is read).

    ``routes``: while the call runs, df_mps routes as it would on the target (the default).
    Tensors should be on the CPU. Raises ValueError on a bad target.
    """
    import torch

    from . import capabilities

    if device not in ("mps", "cuda", "cpu", "xpu"):
        raise ValueError(f"audit: unknown device {device!r} (mps, cuda, cpu or xpu)")
    if isinstance(macos, str):
        parsed = capabilities.parse_version(macos)
        if parsed is None:
            raise ValueError(f"audit: macOS version {macos!r} is not like 13.6")
        macos = parsed
    if macos is not None:
        macos = tuple(int(v) for v in tuple(macos)[:2]) + (0,) * max(0, 2 - len(tuple(macos)))
    installed = torch.__version__.split("+")[0]
    if torch_version and registry_path is None and torch_version.split("+")[0] != installed:
        raise ValueError(
            f"audit: torch {torch_version} asked for, but the registry read here is torch "
            f"{installed}'s; install that torch or pass its native_functions.yaml as registry_path"
        )
    target = Target(device, macos if device == "mps" else None, torch_version or installed)
    entries = registry(registry_path)
    recorder = _Recorder(target, entries)
    op_trace, host_copies = _make_modes(recorder)
    with contextlib.ExitStack() as stack:
        if routes:
            stack.enter_context(target_routes(target))
        stack.enter_context(_generic_cpu_paths())
        stack.enter_context(host_copies)
        stack.enter_context(op_trace)
        model_or_fn(*example_inputs)
    return AuditReport(target, list(recorder.records.values()), 1, dict(recorder.host_copies))
