"""DeepFilterNet3's GRUs in the engine on the CPU: one C call a layer, not ten aten calls a frame.

Why: DFN3's five GRU layers step through every 10 ms frame. torch's CPU GRU spends each frame in
about ten small aten calls, and oneMKL's product of a few rows with the 768 x 256 hidden weights
packs its inputs at every call: on one thread a layer-step cost about 45 us at 1 row and 100-150
us at 4 rows, about 60% of the model's time at batch 1 (docs/performance.md).

How: each layer's input projection of every frame at once (one matrix product, as torch does),
then the whole recurrence in ``gru_cpu.c``: per frame, one pass over the hidden weights for every
four rows (the weights stream from the cache once a frame for them), and the gates, vectorised.
On the 2-core development machine, one thread, the three GRUs of DFN3 take about 100 ms per 10 s
of one row at batch 1 and 70 ms a row at batch 4, against 208 and 121 with torch's GRU
(``benchmarks/cpu_step_parts.py``, docs/performance.md). The library is built at first use with
the machine's C compiler (about a second), kept in df-mps's cache per source, flags, compiler and
processor, and checked against torch's arithmetic before it is used; where there is no compiler
or the build or the check fails, torch's GRU runs (``python -m df_mps doctor`` says which).
The kernel runs on one thread, whatever ``torch.set_num_threads`` says.

The result is torch's GRU within float32 rounding (each hidden product is a chain of fused
multiply-adds in another order; exp is a polynomial good to about 2 ulp). A row's arithmetic is
the same whatever rows ride beside it, bit for bit, so a stream's output does not depend on the
batch it rode in. ``DF_MPS_GRU_KERNEL=0`` runs torch's GRU.

On CUDA the engine keeps cuDNN's GRU: replayed in the step's CUDA graph it costs 2.6-5.9 us a
layer-step at 1-64 rows on an H100, and a Triton kernel launched once a frame cost 15-16 us
(tried in commit f0cb2fa with ``benchmarks/bench_gru.py``, both since removed;
docs/data/h100_gru_triton.json). MPS has no kernel of ours.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Optional, Tuple

import torch  # this module serves the engine, which has torch loaded already

from .settings import FALSE_WORDS

ENV = "DF_MPS_GRU_KERNEL"


def plan(device_type: str, modules) -> Tuple[Optional[str], str]:
    """(which kernel runs ``modules`` in the engine's steps, why): "c" on the CPU where the C
    kernel builds, None for torch's GRU."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in FALSE_WORDS:
        return None, f"{ENV}={setting}"
    if device_type != "cpu":
        return None, f"torch's GRU on {device_type} (cuDNN's in the step's CUDA graph on CUDA)"
    if not modules:
        return None, "the network has no recurrent layers"
    unsupported = [type(m).__name__ for m in modules if not supports(m)]
    if unsupported:
        return None, f"not a GRU the kernel runs ({', '.join(sorted(set(unsupported)))})"
    function, why = cpu_library()
    return ("c", f"one C call a layer ({why})") if function is not None else (None, why)


def recurrence(device_type: str, modules):
    """What ``plan`` picks, as the engine's ``forward(module, x, h0)``, or None."""
    name, _ = plan(device_type, modules)
    return FORWARDS.get(name)


def supports(module) -> bool:
    """Whether ``module`` is a GRU the kernel runs: unidirectional, biased, fp32, its hidden
    size a multiple of the kernel's block of outputs."""
    return (
        type(module) is torch.nn.GRU
        and not module.bidirectional
        and module.bias
        and (3 * module.hidden_size) % JB == 0
        and all(p.dtype == torch.float32 for p in module.parameters())
    )


# Never traced by torch.compile (DF_MPS_COMPILE): the C call takes raw pointers, and a graph
# break before it could free a tensor it reads or writes (one did: memory corrupted).
@torch.compiler.disable
def gru_forward(module, x, h0: Optional[object] = None, *, layer=None) -> Tuple[object, object]:
    """``module(x, h0)`` (a ``torch.nn.GRU`` that ``supports``) layer by layer: (output
    [batch, time, hidden] or [time, batch, hidden], final state [layers, batch, hidden]).

    Each layer's input projection of every frame is one matrix product; then ``layer(gi, h,
    out, w_hh, b_hh)`` runs the recurrence over the frames, writing each frame's new state into
    ``out`` [rows, time, H] from ``gi`` [rows, time, 3H] and the start state ``h`` [rows, H]:
    ``cpu_layer`` (the default: one C call) or ``torch_layer`` (torch ops, the reference).
    Inference only (no autograd); in float32 whatever autocast says, as torch's CPU GRU.
    """
    layer = layer or cpu_layer
    if x.dim() != 3:
        raise ValueError(f"expected a batched sequence [.., .., features], got {tuple(x.shape)}")
    seq = x if module.batch_first else x.transpose(0, 1)  # [rows, time, features]
    rows, frames = seq.shape[0], seq.shape[1]
    hidden, layers = module.hidden_size, module.num_layers
    if h0 is None:
        h0 = seq.new_zeros((layers, rows, hidden))
    finals = []
    layer_in = seq
    with torch.autocast(seq.device.type, enabled=False):
        for index in range(layers):
            w_ih = getattr(module, f"weight_ih_l{index}")
            w_hh = getattr(module, f"weight_hh_l{index}").contiguous()
            b_ih = getattr(module, f"bias_ih_l{index}")
            b_hh = getattr(module, f"bias_hh_l{index}").contiguous()
            gi = torch.nn.functional.linear(layer_in, w_ih, b_ih)
            out = seq.new_empty((rows, frames, hidden))
            state = h0[index].contiguous()
            layer(gi, state, out, w_hh, b_hh)
            finals.append(out[:, -1] if frames else state)
            layer_in = out
    output = layer_in if module.batch_first else layer_in.transpose(0, 1)
    return output, torch.stack(finals)


def torch_layer(gi, h, out, w_hh, b_hh) -> None:
    """The recurrence in torch ops, a frame at a time: the reference the C kernel is held to."""
    for t in range(out.shape[1]):
        prev = h if t == 0 else out[:, t - 1]
        gh = torch.nn.functional.linear(prev, w_hh, b_hh)
        i_r, i_z, i_n = gi[:, t].chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        reset = torch.sigmoid(i_r + h_r)
        update = torch.sigmoid(i_z + h_z)
        new = torch.tanh(i_n + reset * h_n)
        out[:, t] = (prev - new) * update + new  # as aten's GRU cell writes it


# -- the CPU: one C call a layer --------------------------------------------------------------
C_SOURCE = "gru_cpu.c"
JB = 16  # the C kernel's output block (JB in gru_cpu.c)
MAX_ROWS = 4  # the rows it multiplies at once (MAX_ROWS in gru_cpu.c)
# Tried in order: the machine's own vector instructions, then without them. -fopenmp-simd
# lets ``omp simd`` vectorise the loops; -fno-trapping-math lets gcc turn the exponential's
# clamps into blends (it changes no result, only what gcc may assume about FP exceptions).
C_FLAGS = (
    ("-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math"),
    ("-O3", "-mcpu=native", "-fopenmp-simd", "-fno-trapping-math"),
    ("-O3", "-fopenmp-simd", "-fno-trapping-math"),
    ("-O3",),
)


PRUNE_DAYS = 30  # built libraries not loaded this long go when a new one is built
_build_lock = threading.Lock()


def _c_compiler() -> Optional[str]:
    import shutil

    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def library_dir():
    from .models.cache import cache_root

    return cache_root() / "kernels"


@functools.lru_cache(maxsize=1)
def cpu_library() -> Tuple[Optional[object], str]:
    """(the C kernel's ``dfmps_gru_layer`` through ctypes, or None; why), built once per
    source, flags, compiler and processor into df-mps's cache (``$DF_MPS_CACHE_DIR/kernels``;
    a private temporary directory where that can't be written) and checked against
    ``torch_layer`` before it is used."""
    import hashlib
    import subprocess
    from pathlib import Path

    from .util import cpu_identity, prune_unused

    with _build_lock:  # one build per process; other processes: see _build
        compiler = _c_compiler()
        if compiler is None:
            return None, "no C compiler (cc, gcc, clang) found"
        source = Path(__file__).with_name(C_SOURCE).read_bytes()
        try:
            version = subprocess.run(
                [compiler, "--version"], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"{compiler} does not run ({exc})"
        digest = hashlib.sha256(source)
        digest.update(f"|{C_FLAGS}|{version}|{cpu_identity()}".encode())
        name = f"gru-{digest.hexdigest()[:20]}.so"
        function, problem = _load(library_dir() / name)
        if function is None:  # not built here yet, or a damaged file: build it
            from .audio import discard
            from .util import build_dir

            folder, cached = build_dir(library_dir(), "df-mps-kernels-")
            try:
                built, problem = _build(compiler, source, folder / name)
                if built is not None:
                    function, problem = _load(built)
            finally:
                if not cached:  # a library stays usable once loaded; the folder can go
                    discard(folder)
            if function is not None and cached:
                prune_unused(folder, "gru-*.so", folder / name, PRUNE_DAYS)
        if function is None:
            return None, problem
        problem = _check_cpu_layer(function)
        if problem:
            return None, f"the built kernel is wrong here ({problem}); torch's GRU runs"
        return function, f"built from {C_SOURCE} with {compiler} ({name})"


def _load(path) -> Tuple[Optional[object], str]:
    """``dfmps_gru_layer`` of the library at ``path`` with its argument types, or None."""
    import ctypes

    if not path.is_file():
        return None, f"{path} is not built"
    try:
        function = ctypes.CDLL(str(path)).dfmps_gru_layer
    except (OSError, AttributeError) as exc:
        return None, f"could not load {path}: {exc}"
    with contextlib.suppress(OSError):
        os.utime(path)  # in use: kept by prune_unused
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    function.argtypes = [i32, i32, i32, pointer, i64, i64, pointer, i64, pointer, pointer]
    function.argtypes += [pointer, i64, i64]
    function.restype = i32
    return function, ""


def _build(compiler: str, source: bytes, target):
    """(``target``, the library built from ``source``, or None; why not), placed through a
    temporary name beside it, fsynced and renamed (another process may build the same)."""
    import subprocess
    import tempfile
    from pathlib import Path

    from .audio import discard, new_temp, publish

    with tempfile.TemporaryDirectory(prefix="df-mps-gru-") as tmp:
        src = Path(tmp) / C_SOURCE
        src.write_bytes(source)
        built = Path(tmp) / target.name
        errors = []
        for flags in C_FLAGS:
            cmd = [compiler, *flags, "-shared", "-fPIC", str(src), "-o", str(built), "-lm"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
                continue
            if done.returncode == 0:
                break
            lines = (done.stderr or done.stdout).strip().splitlines()
            errors.append(lines[-1] if lines else f"exit status {done.returncode}")
        else:
            return None, f"{compiler} could not build {C_SOURCE}: {errors[-1]}"
        temp = new_temp(target)
        try:
            Path(temp).write_bytes(built.read_bytes())
            publish(temp, target, overwrite=True)
        except OSError as exc:
            discard(temp)
            return None, f"could not write {target}: {exc}"
    return target, ""


def _check_cpu_layer(function) -> Optional[str]:
    """Why ``function`` can't be trusted (its layers against ``torch_layer``'s beyond 1e-5,
    on small random layers of 1, 2 and 7 rows: every row count the kernel treats apart), or
    None."""
    generator = torch.Generator().manual_seed(0)
    hidden = 2 * JB
    with torch.random.fork_rng(devices=[]):  # the module's initial weights: not the caller's RNG
        module = torch.nn.GRU(hidden, hidden, batch_first=True)
    worst = 0.0
    # Ordinary tensors, whatever mode the caller is in (inference tensors have no versions).
    with torch.inference_mode(False), torch.no_grad():
        for rows in (1, 2, MAX_ROWS + 3):
            x = torch.randn((rows, 7, hidden), generator=generator)
            h0 = torch.randn((1, rows, hidden), generator=generator)
            want, _ = gru_forward(module, x, h0, layer=torch_layer)
            try:
                got, _ = gru_forward(module, x, h0, layer=functools.partial(_c_layer, function))
            except Exception as exc:  # noqa: BLE001 - a kernel that fails is not used
                return f"{type(exc).__name__}: {exc}"
            worst = max(worst, float((want - got).abs().max()))
    return None if worst <= 1e-5 else f"differs by {worst:.1e}"


def _packed(w_hh):
    """W_hh [3H, H] as the C kernel reads it: blocks of JB output rows, k-major in each
    ([3H / JB, H, JB]). Made at every call (about 0.1 ms, against milliseconds for the
    layer's frames): a copy kept between calls could miss a change made through ``.data``."""
    outputs, hidden = w_hh.shape
    return w_hh.detach().reshape(outputs // JB, JB, hidden).permute(0, 2, 1).contiguous()


def _c_layer(function, gi, h, out, w_hh, b_hh) -> None:
    rows, frames, hidden = out.shape
    shapes = (tuple(gi.shape), tuple(h.shape), tuple(w_hh.shape), tuple(b_hh.shape))
    if shapes != ((rows, frames, 3 * hidden), (rows, hidden), (3 * hidden, hidden), (3 * hidden,)):
        raise ValueError(f"the C GRU kernel got mismatched shapes {shapes} for {tuple(out.shape)}")
    tensors = (gi, h, out, w_hh, b_hh)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ValueError("the C GRU kernel takes float32 CPU tensors")
    if any(t.stride(-1) != 1 for t in (gi, h, out)):
        raise ValueError("the C GRU kernel needs the feature dim contiguous")
    if not rows or not frames:
        return
    packed = _packed(w_hh)
    bias = b_hh.detach().contiguous()
    # Every tensor whose memory the call reads or writes is held by a name here until it
    # returns (gru_forward is never traced by torch.compile, which could free one early).
    status = function(
        rows,
        frames,
        hidden,
        gi.data_ptr(),
        gi.stride(0),
        gi.stride(1),
        h.data_ptr(),
        h.stride(0),
        packed.data_ptr(),
        bias.data_ptr(),
        out.data_ptr(),
        out.stride(0),
        out.stride(1),
    )
    if status != 0:
        raise ValueError(f"the C kernel refused a layer of {rows} x {frames} x {hidden}")
    del packed, bias


def cpu_layer(gi, h, out, w_hh, b_hh) -> None:
    """One layer over every frame in one C call (``gru_cpu.c``); float32 CPU tensors."""
    function, why = cpu_library()
    if function is None:
        raise RuntimeError(f"the C GRU kernel is unavailable: {why}")
    _c_layer(function, gi, h, out, w_hh, b_hh)


# The engine's recurrences, by name.
FORWARDS = {"c": functools.partial(gru_forward, layer=cpu_layer)}
