"""df_mps.gru: DFN3's GRUs through the C kernel on the CPU, and its place in the engine: the
kernel against nn.GRU and torch_layer (the same recurrence in torch ops), row by row, and the
engine's outputs with it against the engine with torch's GRUs. Where no C compiler is found the
kernel's tests skip, saying so, and the fallback test runs."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import soundfile as sf
import torch

import df_mps  # noqa: F401  (patches DeepFilterNet)
from df_mps import gru
from df_mps.api import Enhancer
from df_mps.engine import ArraySink, ArraySource, Engine, Job


def _gru(layers=2, hidden=64, batch_first=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.GRU(hidden, hidden, num_layers=layers, batch_first=batch_first).eval()


def test_plan_picks_the_c_kernel_on_the_cpu_only(monkeypatch):
    grus = [_gru(), _gru(layers=1)]
    monkeypatch.delenv(gru.ENV, raising=False)
    for device in ("cuda", "mps"):
        assert gru.plan(device, grus)[0] is None
    assert gru.plan("cpu", [])[0] is None
    lstm = torch.nn.LSTM(64, 64)
    assert gru.plan("cpu", [*grus, lstm]) == (None, "not a GRU the kernel runs (LSTM)")
    assert not gru.supports(torch.nn.GRU(64, 64, bidirectional=True))
    assert not gru.supports(torch.nn.GRU(64, 50))  # 3 x 50 outputs: off the kernel's blocks
    assert not gru.supports(_gru().to(torch.bfloat16))
    name, why = gru.plan("cpu", grus)
    assert name == ("c" if gru.cpu_library()[0] is not None else None), why
    assert gru.recurrence("cpu", grus) is gru.FORWARDS.get(name)
    monkeypatch.setenv(gru.ENV, "0")
    assert gru.plan("cpu", grus) == (None, f"{gru.ENV}=0")


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
        assert gru.plan("cpu", [_gru()]) == (None, "no C compiler (cc, gcc, clang) found")
        assert gru.recurrence("cpu", [_gru()]) is None
    finally:
        gru.cpu_library.cache_clear()


@pytest.mark.slow
def test_engine_grus_through_the_kernels_equal_torchs(dfn3_model_dir, audio_dir):
    """The engine's recurrent modules through gru_forward, with the C kernel (the CPU's
    default where it builds) and with torch_layer: three clips that start and end at
    different steps, each within 1e-5 of the engine with torch's GRUs (pieces, the lookahead
    frames after them, carried states and left-context histories)."""
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
    assert default.model.recurrence is gru.recurrence("cpu", default.model.recurrent)
    reference = run(None)
    loops = [functools.partial(gru.gru_forward, layer=gru.torch_layer)]
    if gru.cpu_library()[0] is not None:
        loops.append(gru.FORWARDS["c"])
    for recurrence in loops:
        for a, b in zip(run(recurrence), reference):
            assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5
