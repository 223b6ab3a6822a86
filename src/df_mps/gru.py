"""DeepFilterNet3's GRUs on CUDA: one small Triton kernel per frame, replayed in CUDA graphs.

Why: DFN3's five GRU layers step through every 10 ms frame, and inside the engine's CUDA
graph cuDNN's GRU (PyTorch picks its standard algorithm for GRUs on Ampere and Hopper: the
persistent one is excluded as "flakier") costs about 18 us a layer-step at 64 rows on an H200,
whatever the rows: 5 layers x 3,000 frames of a 30 s file is about 0.28 s of device time, most
of what a batch of 64 such files costs. A step is latency, not arithmetic: [64, 256] x [256, 768]
is 12 MFLOP.

How: the input projection of every frame at once (one matrix product, as cuDNN does), then
one launch of ``_gru_step`` per frame. Program (b, j) computes rows b*16... of hidden units
j*16...: the three gates' hidden products over the previous state (fp32 products, no TF32), the
gates, and the new state, written straight into the output sequence, where the next frame's
launch reads it. At 64 rows that is 4 x 16 programs; a launch from a CUDA graph costs a few
microseconds. Launching from Python costs more than that, so the kernel pays only where the
engine captures its step as a CUDA graph (``df_mps.graphs``); elsewhere torch's GRU runs.

The result is that of ``torch.nn.GRU`` within float32 rounding (the products are summed in
another order); each row's arithmetic is the same whatever the other rows, so a stream's
output does not depend on the batch it rode in. ``DF_MPS_GRU_KERNEL=0`` turns it off.

``TRITON_INTERPRET=1`` (set before this module is imported) runs the kernel on CPU tensors,
which is how the tests check its arithmetic on machines without a GPU.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

ENV = "DF_MPS_GRU_KERNEL"
BLOCK_ROWS = 16  # tl.dot's smallest M
BLOCK_UNITS = 16  # hidden units per program (tl.dot's smallest N)


@functools.lru_cache(maxsize=1)
def _kernel():
    """The Triton kernel, or None where Triton can't be imported."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - no Triton (macOS, CPU-only wheels): torch's GRU runs
        return None

    @triton.jit
    def _gru_step(
        gi_ptr,  # [rows, 3H] at this frame: W_ih x + b_ih (strides below)
        h_ptr,  # [rows, H]: the previous state
        out_ptr,  # [rows, H]: the new state goes here
        w_ptr,  # W_hh [3H, H], contiguous
        b_ptr,  # b_hh [3H]
        rows,
        stride_gi,
        stride_h,
        stride_out,
        H: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_U: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_u = tl.program_id(1)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
        live = r < rows
        acc_r = tl.zeros((BLOCK_R, BLOCK_U), dtype=tl.float32)
        acc_z = tl.zeros((BLOCK_R, BLOCK_U), dtype=tl.float32)
        acc_n = tl.zeros((BLOCK_R, BLOCK_U), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            h = tl.load(h_ptr + r[:, None] * stride_h + k[None, :], mask=live[:, None], other=0.0)
            # W_hh rows (r, z, n gates) for these units, transposed: [BLOCK_K, BLOCK_U].
            w_r = tl.load(w_ptr + u[None, :] * H + k[:, None])
            w_z = tl.load(w_ptr + (H + u[None, :]) * H + k[:, None])
            w_n = tl.load(w_ptr + (2 * H + u[None, :]) * H + k[:, None])
            acc_r += tl.dot(h, w_r, input_precision="ieee")
            acc_z += tl.dot(h, w_z, input_precision="ieee")
            acc_n += tl.dot(h, w_n, input_precision="ieee")
        gi = gi_ptr + r[:, None] * stride_gi + u[None, :]
        i_r = tl.load(gi, mask=live[:, None], other=0.0)
        i_z = tl.load(gi + H, mask=live[:, None], other=0.0)
        i_n = tl.load(gi + 2 * H, mask=live[:, None], other=0.0)
        b_r = tl.load(b_ptr + u)[None, :]
        b_z = tl.load(b_ptr + H + u)[None, :]
        b_n = tl.load(b_ptr + 2 * H + u)[None, :]
        reset = tl.sigmoid(i_r + acc_r + b_r)
        update = tl.sigmoid(i_z + acc_z + b_z)
        a = i_n + reset * (acc_n + b_n)
        # tanh(a) = 1 - 2 / (exp(2a) + 1): exact at both ends (exp overflows to inf -> 1).
        new = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
        h_old = tl.load(h_ptr + r[:, None] * stride_h + u[None, :], mask=live[:, None], other=0.0)
        h_new = (h_old - new) * update + new  # as aten's GRU cell writes it
        tl.store(out_ptr + r[:, None] * stride_out + u[None, :], h_new, mask=live[:, None])

    return _gru_step


def plan(device_type: str, modules, *, graphed: bool) -> Tuple[Optional[str], str]:
    """(which kernel runs ``modules`` in the engine's steps, why): "triton" on CUDA where the
    step is a CUDA graph, "c" on the CPU where the C kernel builds, None for torch's GRU."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "off", "no", "false"):
        return None, f"{ENV}=0"
    if not modules:
        return None, "the network has no recurrent layers"
    unsupported = [type(m).__name__ for m in modules if not supports(m)]
    if unsupported:
        return None, f"not a GRU the kernels run ({', '.join(sorted(set(unsupported)))})"
    if device_type == "cpu":
        function, why = cpu_library()
        return ("c", f"one C call a layer ({why})") if function is not None else (None, why)
    if device_type != "cuda":
        return None, f"no GRU kernel of df-mps's for {device_type}"
    if not graphed:
        return None, "the Triton kernel pays only inside CUDA graphs (Python's launches cost more)"
    if _kernel() is None:
        return None, "Triton can't be imported"
    return "triton", "one Triton launch a frame and layer, replayed in the step's CUDA graph"


def recurrence(device_type: str, modules, *, graphed: bool):
    """What ``plan`` picks, as the engine's ``forward(module, x, h0)``, or None."""
    name, _ = plan(device_type, modules, graphed=graphed)
    return FORWARDS.get(name)


def supports(module) -> bool:
    """Whether ``module`` is a GRU the kernel runs: unidirectional, biased, fp32, its hidden
    size a multiple of the kernel's block."""
    import torch

    return (
        type(module) is torch.nn.GRU
        and not module.bidirectional
        and module.bias
        and module.hidden_size % BLOCK_UNITS == 0
        and module.hidden_size % 64 == 0
        and all(p.dtype == torch.float32 for p in module.parameters())
    )


def gru_forward(module, x, h0: Optional[object] = None, *, layer=None) -> Tuple[object, object]:
    """``module(x, h0)`` (a ``torch.nn.GRU`` that ``supports``) layer by layer: (output
    [batch, time, hidden] or [time, batch, hidden], final state [layers, batch, hidden]).

    Each layer's input projection of every frame is one matrix product; then ``layer(gi, h,
    out, w_hh, b_hh)`` runs the recurrence over the frames, writing each frame's new state into
    ``out`` [rows, time, H] from ``gi`` [rows, time, 3H] and the start state ``h`` [rows, H]:
    ``triton_layer`` (the default: one Triton launch a frame; CUDA, or the CPU under
    ``TRITON_INTERPRET=1``), ``cpu_layer`` (one C call) or ``torch_layer`` (torch ops).
    """
    import torch

    layer = layer or triton_layer
    if x.dim() != 3:
        raise ValueError(f"expected a batched sequence [.., .., features], got {tuple(x.shape)}")
    seq = x if module.batch_first else x.transpose(0, 1)  # [rows, time, features]
    rows, frames = seq.shape[0], seq.shape[1]
    hidden, layers = module.hidden_size, module.num_layers
    if h0 is None:
        h0 = seq.new_zeros((layers, rows, hidden))
    finals = []
    layer_in = seq
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


def triton_layer(gi, h, out, w_hh, b_hh) -> None:
    """The recurrence as one ``triton_step`` launch a frame."""
    for t in range(out.shape[1]):
        triton_step(gi[:, t], h if t == 0 else out[:, t - 1], out[:, t], w_hh, b_hh)


def torch_layer(gi, h, out, w_hh, b_hh) -> None:
    """The recurrence in torch ops (``torch_step`` a frame): the reference."""
    for t in range(out.shape[1]):
        torch_step(gi[:, t], h if t == 0 else out[:, t - 1], out[:, t], w_hh, b_hh)


def triton_step(gi, h, out, w_hh, b_hh) -> None:
    """One frame of one GRU layer for every row (``_gru_step``): ``out`` = the new state, from
    ``gi`` [rows, 3H] (input projection), ``h`` [rows, H] (previous state), W_hh, b_hh."""
    rows, hidden = h.shape
    grid = (-(-rows // BLOCK_ROWS), hidden // BLOCK_UNITS)
    _kernel()[grid](
        gi,
        h,
        out,
        w_hh,
        b_hh,
        rows,
        gi.stride(0),
        h.stride(0),
        out.stride(0),
        H=hidden,
        BLOCK_R=BLOCK_ROWS,
        BLOCK_U=BLOCK_UNITS,
        BLOCK_K=64,
    )


def torch_step(gi, h, out, w_hh, b_hh) -> None:
    """``triton_step``'s arithmetic in torch ops (the reference the tests hold it to, and a
    stand-in that runs anywhere)."""
    import torch

    gh = torch.nn.functional.linear(h, w_hh, b_hh)
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    reset = torch.sigmoid(i_r + h_r)
    update = torch.sigmoid(i_z + h_z)
    new = torch.tanh(i_n + reset * h_n)
    out.copy_((h - new) * update + new)  # as aten's GRU cell writes it


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
    source, compiler and processor into df-mps's cache (``$DF_MPS_CACHE_DIR/kernels``) and
    checked against ``torch_step`` on a small layer before it is used."""
    import ctypes
    import hashlib
    import subprocess
    import tempfile
    from pathlib import Path

    from .util import cpu_identity

    compiler = _c_compiler()
    if compiler is None:
        return None, "no C compiler (cc, gcc, clang) found"
    source = (Path(__file__).with_name(C_SOURCE)).read_bytes()
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{compiler} does not run ({exc})"
    key = hashlib.sha256(source + version.encode() + cpu_identity().encode()).hexdigest()[:20]
    folder = library_dir()
    path = folder / f"gru-{key}.so"
    errors = []
    if not path.is_file():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            folder = Path(tempfile.mkdtemp(prefix="df-mps-kernels-"))
            path = folder / path.name
        with tempfile.TemporaryDirectory(prefix="df-mps-gru-") as tmp:
            src = Path(tmp) / C_SOURCE
            src.write_bytes(source)
            built = Path(tmp) / path.name
            for flags in C_FLAGS:
                cmd = [compiler, *flags, "-shared", "-fPIC", str(src), "-o", str(built), "-lm"]
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                except (OSError, subprocess.SubprocessError) as exc:
                    errors.append(str(exc))
                    continue
                if done.returncode == 0:
                    break
                errors.append((done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"])
            else:
                return None, f"{compiler} could not build {C_SOURCE}: {errors[-1]}"
            try:  # into place atomically: another process may be building the same
                tmp_target = folder / f".{path.name}.{os.getpid()}.tmp"
                tmp_target.write_bytes(built.read_bytes())
                os.replace(tmp_target, path)
            except OSError as exc:
                return None, f"could not write {path}: {exc}"
    try:
        function = ctypes.CDLL(str(path)).dfmps_gru_layer
    except (OSError, AttributeError) as exc:
        return None, f"could not load {path}: {exc}"
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    function.argtypes = [i32, i32, i32, pointer, i64, i64, pointer, i64, pointer, pointer]
    function.argtypes += [pointer, i64, i64, pointer]
    function.restype = i32
    problem = _check_cpu_layer(function)
    if problem:
        return None, f"the built kernel is wrong here ({problem}); torch's GRU runs"
    return function, f"built from {C_SOURCE} with {compiler} ({path.name})"


def _check_cpu_layer(function) -> Optional[str]:
    """Why ``function`` can't be trusted (its layer against ``torch_step``'s beyond 1e-5 on
    a small random layer), or None."""
    import torch

    generator = torch.Generator().manual_seed(0)
    hidden = 2 * JB
    module = torch.nn.GRU(hidden, hidden, batch_first=True)
    rows, frames = MAX_ROWS + 1, 7
    x = torch.randn((rows, frames, hidden), generator=generator)
    h0 = torch.randn((1, rows, hidden), generator=generator)
    with torch.no_grad():
        want, _ = gru_forward(module, x, h0, layer=torch_layer)
        try:
            got, _ = gru_forward(module, x, h0, layer=lambda *a: _c_layer(function, *a))
        except Exception as exc:  # noqa: BLE001 - a kernel that fails is not used
            return f"{type(exc).__name__}: {exc}"
    worst = float((want - got).abs().max())
    return None if worst <= 1e-5 else f"differs by {worst:.1e}"


def _packed(w_hh):
    """W_hh [3H, H] as the C kernel reads it: blocks of JB output rows, k-major in each
    ([3H / JB, H, JB]); kept on the weight tensor while it is unchanged (its version)."""
    import torch

    key = (w_hh.data_ptr(), w_hh._version)
    cached = getattr(w_hh, "_df_mps_packed", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    outputs, hidden = w_hh.shape
    packed = w_hh.detach().reshape(outputs // JB, JB, hidden).permute(0, 2, 1).contiguous()
    packed = packed.to(torch.float32)
    w_hh._df_mps_packed = (key, packed)
    return packed


def _c_layer(function, gi, h, out, w_hh, b_hh) -> None:
    rows, frames, hidden = out.shape
    if gi.stride(-1) != 1 or h.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("the C kernel needs the feature dim contiguous")
    packed = _packed(w_hh)
    bias = b_hh.detach().contiguous()
    scratch = out.new_empty(MAX_ROWS * 3 * hidden)
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
        scratch.data_ptr(),
    )
    if status != 0:
        raise ValueError(f"the C kernel refused a layer of {rows} x {frames} x {hidden}")


def cpu_layer(gi, h, out, w_hh, b_hh) -> None:
    """One layer over every frame in one C call (``gru_cpu.c``); CPU tensors, float32."""
    function, why = cpu_library()
    if function is None:
        raise RuntimeError(f"the C GRU kernel is unavailable: {why}")
    _c_layer(function, gi, h, out, w_hh, b_hh)


# The engine's recurrences, one object each (a graph store is keyed by which one it captured).
FORWARDS = {
    "triton": functools.partial(gru_forward, layer=triton_layer),
    "c": functools.partial(gru_forward, layer=cpu_layer),
}


def name_of(forward) -> Optional[str]:
    """A stable name for an engine recurrence: its FORWARDS key, None for torch's GRU, else
    its function's qualified name (graph stores are keyed by it, and survive copies)."""
    if forward is None:
        return None
    for name, known in FORWARDS.items():
        if known is forward:
            return name
    function = getattr(forward, "func", forward)
    keywords = getattr(forward, "keywords", {})
    return f"{function.__module__}.{function.__qualname__}{sorted(keywords.items())}"
