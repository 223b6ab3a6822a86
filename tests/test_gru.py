"""df_mps.gru: DFN3's GRUs frame by frame through a Triton kernel, and its place in the engine.

The kernel's arithmetic is checked here on the CPU by Triton's interpreter (a fresh
interpreter with TRITON_INTERPRET=1), and against cuDNN on CUDA (skipped without a GPU; the
lead runs it on the H200). The frame loop around it, and the engine's use of it, are checked
with ``torch_step`` (the same arithmetic in torch ops) on the CPU.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import pytest
import soundfile as sf
import torch

import df_mps  # noqa: F401  (patches DeepFilterNet)
from df_mps import graphs, gru
from df_mps.api import Enhancer
from df_mps.engine import ArraySink, ArraySource, Engine, Job, exact_fp32

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the kernel on CUDA needs a CUDA device (none here)"
)
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed here"
)


def _gru(layers=2, hidden=64, batch_first=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.GRU(hidden, hidden, num_layers=layers, batch_first=batch_first).eval()


def test_plan_picks_c_on_the_cpu_triton_in_cuda_graphs_else_torch(monkeypatch):
    grus = [_gru(), _gru(layers=1)]
    monkeypatch.delenv(gru.ENV, raising=False)
    assert gru.plan("mps", grus, graphed=True)[0] is None
    assert gru.plan("cuda", grus, graphed=False)[0] is None  # Python's launches cost more
    assert gru.plan("cuda", [], graphed=True)[0] is None
    lstm = torch.nn.LSTM(64, 64)
    assert gru.plan("cuda", [*grus, lstm], graphed=True) == (
        None,
        "not a GRU the kernels run (LSTM)",
    )
    assert not gru.supports(torch.nn.GRU(64, 64, bidirectional=True))
    assert not gru.supports(torch.nn.GRU(64, 48))  # hidden size off the kernels' blocks
    assert not gru.supports(_gru().to(torch.bfloat16))
    name, why = gru.plan("cuda", grus, graphed=True)
    assert name == ("triton" if importlib.util.find_spec("triton") else None), why
    name, why = gru.plan("cpu", grus, graphed=False)
    assert name == ("c" if gru.cpu_library()[0] is not None else None), why
    assert gru.recurrence("cpu", grus, graphed=False) is gru.FORWARDS.get(name)
    monkeypatch.setenv(gru.ENV, "0")
    assert gru.plan("cuda", grus, graphed=True) == (None, f"{gru.ENV}=0")
    assert gru.plan("cpu", grus, graphed=False) == (None, f"{gru.ENV}=0")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_h0", [True, False])
def test_frame_loop_equals_torch_gru(batch_first, with_h0):
    """gru_forward (input projections, layers stacked, the final states) with torch_layer
    (torch_step a frame) equals nn.GRU, for either layout, with and without h0."""
    module = _gru(batch_first=batch_first)
    x = torch.randn((3, 11, 64) if batch_first else (11, 3, 64))
    h0 = torch.randn(2, 3, 64) if with_h0 else None
    with torch.no_grad():
        want, want_h = module(x, h0)
        got, got_h = gru.gru_forward(module, x, h0, layer=gru.torch_layer)
    assert got.shape == want.shape and got_h.shape == want_h.shape
    assert (got - want).abs().max() <= 1e-6 and (got_h - want_h).abs().max() <= 1e-6


@pytest.mark.subprocess
@needs_triton
def test_triton_kernel_equals_torch_gru_in_the_interpreter(python_child):
    """The Triton kernel itself, run by Triton's interpreter on the CPU: equal to nn.GRU
    within float32 rounding for rows within one block and across two (3 and 17), either
    layout; and a row's result does not depend on the rows beside it."""
    proc = python_child(
        """
        import torch
        from df_mps import gru

        worst = 0.0
        for rows in (3, 17):
            for batch_first in (True, False):
                torch.manual_seed(rows)
                m = torch.nn.GRU(64, 64, num_layers=2, batch_first=batch_first).eval()
                x = torch.randn((rows, 6, 64) if batch_first else (6, rows, 64)) * 3
                h0 = torch.randn(2, rows, 64)
                with torch.no_grad():
                    want, want_h = m(x, h0)
                    got, got_h = gru.gru_forward(m, x, h0)
                    worst = max(worst, (got - want).abs().max().item())
                    worst = max(worst, (got_h - want_h).abs().max().item())
        # Row 16 (the second block) alone against its place among 17.
        with torch.no_grad():
            alone, _ = gru.gru_forward(m, x[:, 16:17], h0[:, 16:17])
        beside = (alone[:, 0] - got[:, 16]).abs().max().item()
        print("worst", worst, "beside", beside)
        """,
        env={"TRITON_INTERPRET": "1"},
    )
    words = proc.stdout.split()
    worst, beside = float(words[words.index("worst") + 1]), float(words[-1])
    assert worst <= 1e-5, proc.stdout
    assert beside <= 1e-6, proc.stdout


@needs_cuda
@needs_triton
@pytest.mark.parametrize("rows", [1, 20, 64])
def test_triton_kernel_equals_cudnn(rows):
    """DFN3's sizes on CUDA: the kernel against cuDNN's GRU (TF32 off, as in the engine's
    steps), eager and captured as a CUDA graph, within 1e-5."""
    device = torch.device("cuda")
    module = _gru(layers=2, hidden=256).to(device)
    x = torch.randn(rows, 40, 256, device=device) * 2
    h0 = torch.randn(2, rows, 256, device=device) * 0.5
    with torch.no_grad(), exact_fp32(device):
        want, want_h = module(x, h0)
        got, got_h = gru.gru_forward(module, x, h0)
        assert (got - want).abs().max() <= 1e-5 and (got_h - want_h).abs().max() <= 1e-5
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            gru.gru_forward(module, x, h0)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            captured, captured_h = gru.gru_forward(module, x, h0)
        graph.replay()
        torch.cuda.synchronize()
        assert (captured - want).abs().max() <= 1e-5
        assert (captured_h - want_h).abs().max() <= 1e-5


needs_c = pytest.mark.skipif(
    gru.cpu_library()[0] is None, reason=f"the C kernel can't be built here: {gru.cpu_library()[1]}"
)


@needs_c
@pytest.mark.parametrize("batch_first", [True, False])
def test_c_kernel_equals_torch_gru(batch_first):
    """The C kernel (one call a layer) at DFN3's sizes, 1 to 6 rows (its blocks of 4 rows and
    the rest), with h0: within 1e-5 of nn.GRU; and a row's result is bit for bit the same
    whatever rows ride beside it (the engine's exactness across batch sizes)."""
    module = _gru(layers=2, hidden=256, batch_first=batch_first)
    for rows in (1, 3, 4, 6):
        x = torch.randn((rows, 30, 256) if batch_first else (30, rows, 256)) * 2
        h0 = torch.randn(2, rows, 256) * 0.5
        with torch.no_grad():
            want, want_h = module(x, h0)
            got, got_h = gru.gru_forward(module, x, h0, layer=gru.cpu_layer)
        assert (got - want).abs().max() <= 1e-5 and (got_h - want_h).abs().max() <= 1e-5
    x6, h6 = (x[5:6], h0[:, 5:6]) if batch_first else (x[:, 5:6], h0[:, 5:6])
    with torch.no_grad():
        alone, _ = gru.gru_forward(module, x6, h6, layer=gru.cpu_layer)
    among = got[5:6] if batch_first else got[:, 5:6]
    assert torch.equal(alone, among)


@needs_c
def test_c_kernel_follows_weights_changed_in_place():
    """The packed copy of W_hh the C kernel reads is made again when the weight changes."""
    module = _gru(layers=1, hidden=64)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        gru.gru_forward(module, x, layer=gru.cpu_layer)
        module.weight_hh_l0.mul_(0.5)
        want, _ = module(x)
        got, _ = gru.gru_forward(module, x, layer=gru.cpu_layer)
    assert (got - want).abs().max() <= 1e-5


def test_without_a_c_compiler_the_engine_runs_torchs_grus(monkeypatch, tmp_path):
    """No compiler (or a build that fails): the plan says why, and None is torch's GRU."""
    monkeypatch.setenv("DF_MPS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gru, "_c_compiler", lambda: None)
    gru.cpu_library.cache_clear()
    try:
        assert gru.plan("cpu", [_gru()], graphed=False) == (
            None,
            "no C compiler (cc, gcc, clang) found",
        )
        assert gru.recurrence("cpu", [_gru()], graphed=False) is None
    finally:
        gru.cpu_library.cache_clear()


@pytest.mark.slow
def test_engine_grus_through_the_kernels_equal_torchs(dfn3_model_dir, audio_dir):
    """The engine's recurrent modules through gru_forward, with the C kernel (the CPU's
    default where it builds) and with torch_layer (the frame loop the Triton kernel runs in
    on CUDA): three clips that start and end at different steps, each within 1e-5 of the
    engine with torch's GRUs (pieces, the lookahead frames after them, carried states and
    left-context histories)."""
    enhancer = Enhancer(dfn3_model_dir, batch=3, piece_seconds=0.5, device="cpu")
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    clips = [noisy[: 2 * sr], noisy[sr : 3 * sr], noisy[: int(1.3 * sr)]]

    def run(recurrence):
        engine = Engine(enhancer.model, enhancer.df_state, batch=3, piece_frames=50)
        engine.model.use_recurrence(recurrence)
        sinks = [ArraySink() for _ in clips]
        jobs = [Job(open=(lambda x=x, k=k: (ArraySource(x, sr), k))) for x, k in zip(clips, sinks)]
        for result in engine.run(jobs):
            assert result.ok, result.error
        return [k.result(1)[:, 0] for k in sinks]

    default = Engine(enhancer.model, enhancer.df_state, batch=3, piece_frames=50)
    assert default.model.recurrence is gru.recurrence("cpu", default.model.recurrent, graphed=False)
    reference = run(None)
    loops = [functools.partial(gru.gru_forward, layer=gru.torch_layer)]
    if gru.cpu_library()[0] is not None:
        loops.append(gru.FORWARDS["c"])
    for recurrence in loops:
        for a, b in zip(run(recurrence), reference):
            assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5


def test_graphs_pick_triton_only_for_cuda_graphs(dfn3_model_dir, monkeypatch):
    """graphs.accelerate leaves a CPU engine's GRUs as the engine chose them (the C kernel,
    or torch's), and keeps a graph store per choice of GRU: a graph captured with one kind is
    never replayed for another."""
    enhancer = Enhancer(dfn3_model_dir, batch=2, piece_seconds=0.5, device="cpu")
    engine = graphs.accelerate(
        Engine(enhancer.model, enhancer.df_state, batch=2, piece_frames=50), cuda_graphs=True
    )
    batched = engine.model
    assert batched.recurrence is gru.recurrence("cpu", batched.recurrent, graphed=False)
    batched.use_recurrence(None)
    store = graphs.graph_store(batched)
    batched.use_recurrence(gru.FORWARDS["triton"])
    assert graphs.graph_store(batched) is not store
    batched.use_recurrence(None)
    assert graphs.graph_store(batched) is store
