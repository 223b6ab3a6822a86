"""df_mps.gru: DFN3's GRUs through the C kernel on the CPU, and its place in the engine.

The kernel against nn.GRU and against torch_layer (the same recurrence in torch ops), row by
row; the engine's outputs with it against the engine with torch's GRUs; the fallbacks (no
compiler, a failed build, a failed check, DF_MPS_GRU_KERNEL=0); and the callers' modes that
once broke it (inference mode, autocast, torch.compile). Where no C compiler is found the
kernel's own tests skip, saying so, and the fallback tests run.
"""

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


@pytest.fixture
def c_kernel():
    """The loaded C kernel, or a skip saying why it can't be built here."""
    function, why = gru.cpu_library()
    if function is None:
        pytest.skip(f"the C GRU kernel can't be built here: {why}")
    return function


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """cpu_library() built anew, into an empty cache, and forgotten again afterwards."""
    monkeypatch.setenv("DF_MPS_CACHE_DIR", str(tmp_path))
    gru.cpu_library.cache_clear()
    yield
    gru.cpu_library.cache_clear()


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
    for off in ("0", "off"):
        monkeypatch.setenv(gru.ENV, off)
        assert gru.plan("cpu", grus) == (None, f"{gru.ENV}={off}")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_h0", [True, False])
def test_frame_loop_equals_torch_gru(batch_first, with_h0):
    """gru_forward (input projections, layers stacked, the final states) with torch_layer
    equals nn.GRU, for either layout, with and without h0."""
    module = _gru(batch_first=batch_first)
    x = torch.randn((3, 11, 64) if batch_first else (11, 3, 64))
    h0 = torch.randn(2, 3, 64) if with_h0 else None
    with torch.no_grad():
        want, want_h = module(x, h0)
        got, got_h = gru.gru_forward(module, x, h0, layer=gru.torch_layer)
    assert got.shape == want.shape and got_h.shape == want_h.shape
    assert (got - want).abs().max() <= 1e-6 and (got_h - want_h).abs().max() <= 1e-6


@pytest.mark.parametrize("batch_first", [True, False])
def test_c_kernel_equals_torch_gru(c_kernel, batch_first):
    """The C kernel (one call a layer) at DFN3's sizes, 1 to 6 rows (its blocks of 4 rows and
    the rest), with h0: within 1e-5 of nn.GRU."""
    module = _gru(layers=2, hidden=256, batch_first=batch_first)
    for rows in (1, 2, 3, 4, 6):
        x = torch.randn((rows, 30, 256) if batch_first else (30, rows, 256)) * 2
        h0 = torch.randn(2, rows, 256) * 0.5
        with torch.no_grad():
            want, want_h = module(x, h0)
            got, got_h = gru.gru_forward(module, x, h0, layer=gru.cpu_layer)
        assert (got - want).abs().max() <= 1e-5 and (got_h - want_h).abs().max() <= 1e-5


def test_a_rows_recurrence_is_bit_for_bit_the_same_beside_any_rows(c_kernel):
    """Row 5 of 6 and the same row alone, from the same input projections and state: equal
    bit for bit (what keeps a stream's output the same whatever batch it rode in)."""
    module = _gru(layers=1, hidden=256)
    gi = torch.randn(6, 40, 768)
    h = torch.randn(6, 256)
    among, alone = torch.empty(6, 40, 256), torch.empty(1, 40, 256)
    w_hh, b_hh = module.weight_hh_l0.detach(), module.bias_hh_l0.detach()
    gru.cpu_layer(gi, h, among, w_hh, b_hh)
    gru.cpu_layer(gi[5:6].clone(), h[5:6].clone(), alone, w_hh, b_hh)
    assert torch.equal(alone[0], among[5])


def test_c_kernel_follows_weights_changed_in_place(c_kernel):
    """The kernel reads the weights as they are at each call, however they were changed."""
    module = _gru(layers=1, hidden=64)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        gru.gru_forward(module, x, layer=gru.cpu_layer)
        module.weight_hh_l0.mul_(0.5)
        module.weight_hh_l0.data.mul_(0.5)  # no version bump
        want, _ = module(x)
        got, _ = gru.gru_forward(module, x, layer=gru.cpu_layer)
    assert (got - want).abs().max() <= 1e-5


def test_c_kernel_refuses_what_it_cannot_read(c_kernel):
    """A wrong dtype or shape is a ValueError, never memory read as something it is not."""
    w_hh, b_hh = torch.randn(96, 32), torch.randn(96)
    out = torch.empty(2, 3, 32)
    with pytest.raises(ValueError, match="float32"):
        gru.cpu_layer(torch.randn(2, 3, 96).bfloat16(), torch.randn(2, 32), out, w_hh, b_hh)
    with pytest.raises(ValueError, match="shapes"):
        gru.cpu_layer(torch.randn(2, 3, 64), torch.randn(2, 32), out, w_hh, b_hh)


def test_c_kernel_under_inference_mode_autocast_and_compile(c_kernel):
    """Callers' modes that once broke it: weights made under inference mode (no version
    counters), CPU autocast to bf16 (torch's CPU GRU stays fp32: so does this), and
    torch.compile around it (it is never traced: a graph break freed a tensor it wrote)."""
    with torch.inference_mode():
        module = _gru(layers=2, hidden=64)
        x = torch.randn(3, 9, 64)
        want, _ = module(x)
        got, _ = gru.gru_forward(module, x, layer=gru.cpu_layer)
    assert (got - want).abs().max() <= 1e-5
    module = _gru(layers=2, hidden=64)
    with torch.no_grad():
        want, _ = module(x.clone())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, _ = gru.gru_forward(module, x.clone(), layer=gru.cpu_layer)
        assert got.dtype == torch.float32 and (got - want).abs().max() <= 1e-5
        compiled = torch.compile(lambda a: gru.FORWARDS["c"](module, a)[0] * 1.0, backend="eager")
        for _ in range(3):
            assert (compiled(x.clone()) - want).abs().max() <= 1e-5


def test_without_a_c_compiler_the_kernel_is_not_used(fresh_library, monkeypatch):
    monkeypatch.setattr(gru, "_c_compiler", lambda: None)
    assert gru.plan("cpu", [_gru()]) == (None, "no C compiler (cc, gcc, clang) found")
    assert gru.recurrence("cpu", [_gru()]) is None


def test_a_build_that_fails_says_why_in_one_line(fresh_library, monkeypatch):
    monkeypatch.setattr(gru, "_c_compiler", lambda: "false")  # exits 1, prints nothing
    name, why = gru.plan("cpu", [_gru()])
    assert name is None and why == "false could not build gru_cpu.c: exit status 1", why


def test_a_kernel_that_fails_its_check_is_not_used(c_kernel, fresh_library, monkeypatch):
    monkeypatch.setattr(gru, "_check_cpu_layer", lambda function: "differs by 1.0e+00")
    name, why = gru.plan("cpu", [_gru()])
    assert name is None and "wrong here (differs by 1.0e+00)" in why


def test_a_cache_that_cant_be_written_builds_in_a_private_folder(c_kernel, fresh_library):
    """Where the kernels' cache folder can't be made or written (here a file stands at its
    path; a read-only folder takes the same way), the kernel is built and loaded from a
    temporary folder, which is gone afterwards: nothing is cached, the kernel runs."""
    import os
    import tempfile

    blocker = gru.library_dir()
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    before = set(os.listdir(tempfile.gettempdir()))
    name, why = gru.plan("cpu", [_gru()])
    assert name == "c", why
    assert blocker.read_text() == "not a folder"
    left = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("df-mps-kernels-")}
    assert not left - before


@pytest.mark.slow
def test_engine_grus_through_the_kernels_equal_torchs(dfn3_model_dir, audio_dir, monkeypatch):
    """The engine's recurrent modules through gru_forward, with the C kernel (the CPU's
    default where it builds) and with torch_layer: three clips that start and end at
    different steps, each within 1e-5 of the engine with torch's GRUs (pieces, the lookahead
    frames after them, carried states and left-context histories). DF_MPS_GRU_KERNEL=0 gives
    an engine with torch's GRUs."""
    enhancer = Enhancer(dfn3_model_dir, batch=3, piece_seconds=0.5, device="cpu")
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    clips = [noisy[: 2 * sr], noisy[sr : 3 * sr], noisy[: int(1.3 * sr)]]

    def engine():
        return Engine(enhancer.model, enhancer.df_state, batch=3, piece_frames=50)

    def run(recurrence):
        runner = engine()
        runner.model.use_recurrence(recurrence)
        sinks = [ArraySink() for _ in clips]
        jobs = [Job(open=(lambda x=x, k=k: (ArraySource(x, sr), k))) for x, k in zip(clips, sinks)]
        for result in runner.run(jobs):
            assert result.ok, result.error
        return [k.result(1)[:, 0] for k in sinks]

    default = engine()
    assert default.model.recurrence is gru.recurrence("cpu", default.model.recurrent)
    monkeypatch.setenv(gru.ENV, "0")
    assert engine().model.recurrence is None
    monkeypatch.delenv(gru.ENV)
    reference = run(None)
    loops = [functools.partial(gru.gru_forward, layer=gru.torch_layer)]
    if gru.cpu_library()[0] is not None:
        loops.append(gru.FORWARDS["c"])
    for recurrence in loops:
        for a, b in zip(run(recurrence), reference):
            assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5
