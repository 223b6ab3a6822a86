"""df_mps.dsp (libdf in PyTorch) against the real DeepFilterLib, and the libdf patch.

Comparisons need the real libdf (DeepFilterLib, CPython <= 3.11); they skip where it is absent.
Tests that force the PyTorch stand-in run in a fresh interpreter, since ``import df_mps``
decides at import time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import run_python
from df_mps import dsp
from df_mps.patches import libdf as libdf_patch

CFG = dict(sr=48000, fft_size=960, hop_size=480, nb_bands=32, min_nb_erb_freqs=2)  # DFN3
ALPHA = dsp.norm_alpha(48000, 480)  # 0.99, what df.enhance uses
NB_DF = 96
TOL = 1e-5


@pytest.fixture(scope="module")
def real_libdf():
    try:
        import libdf
    except ImportError as exc:
        pytest.skip(f"real DeepFilterLib not importable here ({exc}); nothing to compare with")
    if libdf_patch.is_shim(libdf):
        import importlib.machinery

        if importlib.machinery.PathFinder.find_spec("libdf") is None:
            pytest.skip("DeepFilterLib is not installed here (df_mps's stand-in is libdf)")
        pytest.skip("libdf is df_mps's stand-in in this process (DF_MPS_LIBDF=torch)")
    return libdf


@pytest.fixture(scope="module")
def dfn3_config(dfn3_model_dir):
    """DeepFilterNet's global config, loaded from the DFN3 model (df_features reads it), and
    put back as it was afterwards."""
    from df.config import config

    saved = {k: getattr(config, k) for k in ("parser", "path", "modified", "allow_defaults")}
    config.load(
        str(dfn3_model_dir / "config.ini"),
        config_must_exist=True,
        allow_defaults=True,
        allow_reload=True,
    )
    yield config
    for name, value in saved.items():
        setattr(config, name, value)


@pytest.fixture(scope="module")
def signals(audio_dir) -> np.ndarray:
    """The three shared 10 s files plus two random signals, as channels [5, T] float32."""
    files = [
        sf.read(audio_dir / f"{n}.wav", dtype="float32")[0]
        for n in ("clean", "noisy_white", "noisy_pink")
    ]
    rng = np.random.default_rng(0)
    length = min(len(f) for f in files)
    noise = rng.standard_normal((2, length)).astype(np.float32) * np.float32(0.3)
    return np.ascontiguousarray(np.concatenate([np.stack([f[:length] for f in files]), noise]))


def assert_close(actual, expected, tol=TOL, what=""):
    """|a - b| <= tol * max(1, |b|): absolute for small values, relative for large ones."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    err = np.abs(actual - expected) / np.maximum(np.abs(expected), 1.0)
    assert err.max() <= tol, f"{what}: max scaled error {err.max():.3g} > {tol}"


def ri(spec: np.ndarray) -> np.ndarray:
    return np.stack([spec.real, spec.imag], axis=-1)


# -- constants ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        (48000, 960, 480, 32, 2),
        (48000, 960, 480, 32, 1),
        (48000, 960, 240, 32, 2),
        (16000, 320, 160, 32, 1),
        (24000, 192, 96, 24, 1),
        (44100, 1024, 256, 40, 2),
        (8000, 128, 64, 16, 1),
    ],
)
def test_erb_widths_window_and_accessors_equal_libdf(real_libdf, cfg):
    ours, theirs = dsp.DF(*cfg), real_libdf.DF(*cfg)
    assert np.array_equal(ours.erb_widths(), theirs.erb_widths())
    assert ours.erb_widths().dtype == theirs.erb_widths().dtype
    assert np.array_equal(ours.fft_window(), theirs.fft_window())
    for name in ("sr", "fft_size", "hop_size", "nb_erb"):
        assert getattr(ours, name)() == getattr(theirs, name)(), name
    assert np.array_equal(dsp.unit_norm_init(96), real_libdf.unit_norm_init(96))


def test_df_defaults_and_bad_parameters(real_libdf):
    assert dsp.DF(48000, 960, 480).nb_erb() == real_libdf.DF(48000, 960, 480).nb_erb() == 32
    with pytest.raises(ValueError, match="hop_size"):
        dsp.DF(48000, 960, 600)


# -- analysis / synthesis -------------------------------------------------------------------------
def test_analysis_and_synthesis_match_libdf(real_libdf, signals):
    ours, theirs = dsp.DF(**CFG), real_libdf.DF(**CFG)
    spec = theirs.analysis(signals)
    mine = ours.analysis(signals)
    assert_close(mine, spec, what="analysis")
    # Odd length: the samples beyond a whole hop are dropped, as in libdf.
    odd = np.ascontiguousarray(signals[:, : 48000 + 333])
    assert_close(ours.analysis(odd), theirs.analysis(odd), what="analysis, odd length")
    expected = theirs.synthesis(spec.copy())  # libdf overwrites its input
    assert_close(ours.synthesis(spec), expected, what="synthesis")
    # and a round trip reconstructs the signal, delayed by fft_size - hop
    delay = CFG["fft_size"] - CFG["hop_size"]
    assert_close(ours.synthesis(mine)[:, delay:], signals[:, : signals.shape[1] - delay])


def test_synthesis_ignores_imaginary_dc_and_nyquist_like_libdf(real_libdf, signals):
    spec = real_libdf.DF(**CFG).analysis(signals[:2])
    spec[..., 0] += 0.5j
    spec[..., -1] -= 0.25j
    expected = real_libdf.DF(**CFG).synthesis(spec.copy())
    assert_close(dsp.DF(**CFG).synthesis(spec), expected)


def test_analysis_state_carries_across_calls(real_libdf, signals):
    bounds = [(0, 7000), (7000, 20000), (20000, 96000)]  # not multiples of the hop
    mono = signals[1:2]
    ours, theirs = dsp.DF(**CFG), real_libdf.DF(**CFG)
    mine = [ours.analysis(mono[:, a:b], reset=False) for a, b in bounds]
    libs = [theirs.analysis(np.ascontiguousarray(mono[:, a:b]), reset=False) for a, b in bounds]
    for m, t in zip(mine, libs):
        assert_close(m, t, what="chunked analysis vs libdf chunked")
    # Hop-aligned chunks in sequence equal one call, for every channel (libdf shares one
    # state between channels; we keep one per channel).
    aligned = [(0, 4800), (4800, 24000), (24000, 96000)]
    df = dsp.DF(**CFG)
    chunks = np.concatenate([df.analysis(signals[:, a:b], reset=False) for a, b in aligned], 1)
    assert_close(chunks, real_libdf.DF(**CFG).analysis(signals[:, :96000]), what="3 chunks")
    # reset=True (the default) forgets the carried state, as in libdf
    assert_close(df.analysis(signals[:, :4800]), real_libdf.DF(**CFG).analysis(signals[:, :4800]))


def test_synthesis_state_carries_across_calls(real_libdf, signals):
    spec = real_libdf.DF(**CFG).analysis(signals)
    whole = real_libdf.DF(**CFG).synthesis(spec.copy())
    df = dsp.DF(**CFG)
    parts = [df.synthesis(spec[:, a:b], reset=False) for a, b in [(0, 3), (3, 250), (250, 1000)]]
    assert_close(np.concatenate(parts, 1), whole, what="3 synthesis chunks")


@pytest.mark.parametrize("hop", [240, 320, 400])
def test_other_overlaps_match_libdf(real_libdf, signals, hop):
    cfg = dict(CFG, hop_size=hop)
    spec = real_libdf.DF(**cfg).analysis(signals[:2])
    assert_close(dsp.DF(**cfg).analysis(signals[:2]), spec)
    expected = real_libdf.DF(**cfg).synthesis(spec.copy())
    assert_close(dsp.DF(**cfg).synthesis(spec), expected)


# -- features -------------------------------------------------------------------------------------
def test_erb_and_erb_inv_match_libdf(real_libdf, signals):
    theirs = real_libdf.DF(**CFG)
    spec, widths = theirs.analysis(signals), theirs.erb_widths()
    assert_close(dsp.erb(spec, widths), real_libdf.erb(spec, widths), what="erb dB")
    linear = real_libdf.erb(spec, widths, False)
    assert_close(dsp.erb(spec, widths, False), linear, what="erb linear")
    # relative, too, since band powers are tiny (silence in clean.wav is exactly 0 in both)
    ours = dsp.erb(spec, widths, db=False)
    nonzero = linear > 0
    assert np.array_equal(ours > 0, nonzero)
    assert np.abs(ours[nonzero] / linear[nonzero] - 1).max() <= TOL
    assert_close(dsp.erb(spec[0], list(widths)), real_libdf.erb(spec[0], widths), what="erb 2-D")
    assert_close(dsp.erb(spec[None], widths), real_libdf.erb(spec[None], widths), what="erb 4-D")
    bands = real_libdf.erb(spec, widths)
    assert np.array_equal(dsp.erb_inv(bands, widths), real_libdf.erb_inv(bands, widths))


def test_erb_norm_and_unit_norm_match_libdf(real_libdf, signals):
    theirs = real_libdf.DF(**CFG)
    spec = theirs.analysis(signals)
    bands = real_libdf.erb(spec, theirs.erb_widths())
    expected = real_libdf.erb_norm(bands.copy(), ALPHA)  # libdf overwrites its input
    assert_close(dsp.erb_norm(bands, ALPHA), expected, what="erb_norm")
    df_spec = np.ascontiguousarray(spec[..., :NB_DF])
    assert_close(dsp.unit_norm(df_spec, ALPHA), real_libdf.unit_norm(df_spec, ALPHA), what="unit")
    # another alpha, and explicit states
    rng = np.random.default_rng(1)
    state_e = rng.uniform(-90, -20, (5, 32)).astype(np.float32)
    state_u = rng.uniform(1e-4, 1e-2, (5, NB_DF)).astype(np.float32)
    assert_close(dsp.erb_norm(bands, 0.9, state_e), real_libdf.erb_norm(bands.copy(), 0.9, state_e))
    assert_close(dsp.unit_norm(df_spec, 0.9, state_u), real_libdf.unit_norm(df_spec, 0.9, state_u))


def test_norm_states_carry_across_calls(real_libdf, signals):
    theirs = real_libdf.DF(**CFG)
    spec = theirs.analysis(signals)
    bands = real_libdf.erb(spec, theirs.erb_widths())
    df_spec = np.ascontiguousarray(spec[..., :NB_DF])
    whole_e = real_libdf.erb_norm(bands.copy(), ALPHA)
    whole_u = real_libdf.unit_norm(df_spec, ALPHA)
    state_e = state_u = None
    parts_e, parts_u = [], []
    for a, b in [(0, 1), (1, 300), (300, 1000)]:
        out, state_e = dsp.erb_norm(bands[:, a:b], ALPHA, state_e, return_state=True)
        parts_e.append(out)
        out, state_u = dsp.unit_norm(df_spec[:, a:b], ALPHA, state_u, return_state=True)
        parts_u.append(out)
        # libdf, handed our carried state, continues exactly where its one-call run is
        if b < 1000:
            lib_next = real_libdf.erb_norm(bands[:, b:].copy(), ALPHA, state_e)
            assert_close(lib_next, whole_e[:, b:], what="libdf continuing from our erb state")
            lib_next = real_libdf.unit_norm(np.ascontiguousarray(df_spec[:, b:]), ALPHA, state_u)
            assert_close(lib_next, whole_u[:, b:], what="libdf continuing from our unit state")
    assert_close(np.concatenate(parts_e, 1), whole_e, what="chunked erb_norm")
    assert_close(np.concatenate(parts_u, 1), whole_u, what="chunked unit_norm")


def test_features_equal_upstream_df_features(real_libdf, signals, dfn3_config):
    from df.enhance import df_features
    from df.utils import get_norm_alpha

    assert get_norm_alpha(False) == ALPHA

    audio = torch.from_numpy(signals)
    expected = df_features(audio, real_libdf.DF(**CFG), NB_DF)
    ours = dsp.DF(**CFG)
    got = ours.features(audio, NB_DF)
    for name, g, e in zip(("spec", "erb_feat", "spec_feat"), got, expected):
        assert_close(g.numpy(), e.numpy(), what=name)
    # Chunked features (reset=False) equal the one-call features.
    parts = [
        ours.features(audio[:, a:b], NB_DF, reset=a == 0) for a, b in [(0, 9600), (9600, 480000)]
    ]
    for i, name in enumerate(("spec", "erb_feat", "spec_feat")):
        joined = torch.cat([p[i] for p in parts], dim=-2 if name == "erb_feat" else -3)
        assert_close(joined.numpy(), expected[i].numpy(), what=f"chunked {name}")


# -- tensors, batches, devices --------------------------------------------------------------------
def test_tensor_batch_in_tensor_out(real_libdf, signals):
    """[B, C, T] tensors: each row as libdf computes it on its own; tensors come back."""
    batch = torch.from_numpy(signals[:4]).reshape(2, 2, -1)
    df = dsp.DF(**CFG)
    spec = df.analysis(batch)
    assert isinstance(spec, torch.Tensor) and spec.dtype == torch.complex64
    assert spec.shape == (2, 2, 1000, 481)
    expected = real_libdf.DF(**CFG).analysis(signals[:4]).reshape(2, 2, 1000, 481)
    assert_close(spec.numpy(), expected)
    audio = df.synthesis(spec)
    assert isinstance(audio, torch.Tensor) and audio.shape == (2, 2, 480000)
    flat = real_libdf.DF(**CFG).synthesis(expected.reshape(4, 1000, 481).copy())
    assert_close(audio.numpy(), flat.reshape(2, 2, -1))
    bands = dsp.erb(spec, df.erb_widths())
    assert isinstance(bands, torch.Tensor)
    assert_close(
        bands.numpy(),
        real_libdf.erb(expected.reshape(4, 1000, 481), df.erb_widths()).reshape(2, 2, 1000, 32),
    )


def test_no_complex_device_path_matches_libdf(real_libdf, signals, dfn3_config):
    """Where the device holds no complex tensors (emulated on the CPU: any complex tensor
    raises), analysis, features and synthesis run as real matrix products."""
    from df_mps.testing import emulate_no_complex

    spec = real_libdf.DF(**CFG).analysis(signals)
    expected_audio = real_libdf.DF(**CFG).synthesis(spec.copy())
    from df.enhance import df_features

    expected = df_features(torch.from_numpy(signals), real_libdf.DF(**CFG), NB_DF)
    audio = torch.from_numpy(signals)
    with emulate_no_complex():
        df = dsp.DF(**CFG)
        got = df.analysis(audio, as_real=True)
        assert got.dtype == torch.float32
        assert_close(got.numpy(), ri(spec), what="matmul analysis")
        assert_close(df.synthesis(got).numpy(), expected_audio, what="matmul synthesis")
        feats = df.features(audio, NB_DF)
        for name, g, e in zip(("spec", "erb_feat", "spec_feat"), feats, expected):
            assert_close(g.numpy(), e.numpy(), what=f"no-complex {name}")
        assert_close(dsp.unit_norm(got[..., :NB_DF, :], ALPHA).numpy(), feats[2][:, 0].numpy())
        # Asking for the complex type where it can't exist gives the real layout, with a warning.
        assert df.analysis(audio[:1, :4800]).dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    df = dsp.DF(**CFG)
    with pytest.raises(TypeError, match="real-valued"):
        df.analysis(np.zeros((1, 960), np.complex64))
    with pytest.raises(ValueError, match="481"):
        df.synthesis(np.zeros((1, 4, 100), np.complex64))
    with pytest.raises(ValueError, match="bands"):
        dsp.erb_inv(np.zeros((1, 4, 10), np.float32), df.erb_widths())
    df.analysis(np.zeros((2, 960), np.float32), reset=False)
    with pytest.raises(ValueError, match="reset"):
        df.analysis(np.zeros((3, 960), np.float32), reset=False)


# -- the libdf patch ------------------------------------------------------------------------------
def test_stand_in_module_is_lazy_and_complete():
    module = libdf_patch.make_module()
    assert "DF" not in module.__dict__  # nothing loaded before first use
    assert module.DF is dsp.DF and module.erb_norm is dsp.erb_norm
    for name in libdf_patch.EXPORTS:
        assert getattr(module, name) is getattr(dsp, name)
    with pytest.raises(AttributeError):
        module.does_not_exist  # noqa: B018


def test_torch_mode_replaces_and_undo_restores(real_libdf, monkeypatch):
    from df_mps import settings

    monkeypatch.setattr(settings, "_current", settings.Settings(libdf="torch"))
    undo = libdf_patch.install()
    try:
        assert libdf_patch.is_shim(sys.modules["libdf"])
        from libdf import DF

        assert DF is dsp.DF
    finally:
        undo()
    assert sys.modules["libdf"] is real_libdf
    monkeypatch.setattr(settings, "_current", settings.Settings(libdf="auto"))
    assert libdf_patch.install() is None  # real one importable: nothing to do
    assert sys.modules["libdf"] is real_libdf


REFERENCE_CHILD = """
import numpy as np, soundfile as sf, torch
torch.set_num_threads(1)
import df_mps
import libdf
assert not getattr(libdf, "__df_mps_shim__", False), libdf
from df.enhance import enhance, init_df
model, df_state, _ = init_df({model!r}, log_level="ERROR", log_file=None)
assert type(df_state) is libdf.DF, type(df_state)
audio = sf.read({audio!r}, dtype="float32")[0]
np.save({out!r}, enhance(model, df_state, torch.from_numpy(audio)[None]).numpy())
"""


@pytest.fixture(scope="module")
def upstream_enhanced(real_libdf, dfn3_model_dir, audio_dir, tmp_path_factory) -> Path:
    """noisy_white.wav through upstream df.enhance with the real libdf, saved as .npy.

    In a child process: init_df reconfigures loguru process-wide."""
    out = tmp_path_factory.mktemp("dsp") / "upstream_enhanced.npy"
    code = REFERENCE_CHILD.format(
        model=str(dfn3_model_dir), audio=str(audio_dir / "noisy_white.wav"), out=str(out)
    )
    run_python(code, env={"DF_MPS_LIBDF": "native"})
    return out


ENHANCE_CHILD = """
import sys, numpy as np, soundfile as sf, torch
torch.set_num_threads(1)
{prelude}
import df_mps
import libdf
assert getattr(libdf, "__df_mps_shim__", False), libdf
from df.enhance import enhance, init_df
from df_mps import dsp
model, df_state, _ = init_df({model!r}, log_level="ERROR", log_file=None)
assert type(df_state) is dsp.DF, type(df_state)
audio = sf.read({audio!r}, dtype="float32")[0]
out = enhance(model, df_state, torch.from_numpy(audio)[None]).numpy()
ref = np.load({ref!r})
diff = float(np.abs(out - ref).max())
print("max abs diff", diff)
assert out.shape == ref.shape and diff <= 1e-4, diff
"""


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize(
    "env, prelude",
    [
        ({"DF_MPS_LIBDF": "torch"}, ""),
        # auto, with DeepFilterLib not importable: what Python >= 3.12 sees
        ({}, "sys.modules['libdf'] = None  # import libdf -> ImportError"),
    ],
    ids=["forced-torch", "auto-without-deepfilterlib"],
)
def test_enhance_pipeline_on_pytorch_dsp_matches_libdf(
    upstream_enhanced, dfn3_model_dir, audio_dir, env, prelude
):
    code = ENHANCE_CHILD.format(
        prelude=prelude,
        model=str(dfn3_model_dir),
        audio=str(audio_dir / "noisy_white.wav"),
        ref=str(upstream_enhanced),
    )
    proc = run_python(code, env=env)
    assert "max abs diff" in proc.stdout


SI_SDR_CHILD = """
import numpy as np, soundfile as sf, torch
torch.set_num_threads(1)
import df_mps
import libdf
assert getattr(libdf, "__df_mps_shim__", False), libdf
from df.enhance import enhance, init_df
model, df_state, _ = init_df({model!r}, log_level="ERROR", log_file=None)
noisy = sf.read({noisy!r}, dtype="float32")[0]
clean = sf.read({clean!r}, dtype="float64")[0]
out = enhance(model, df_state, torch.from_numpy(noisy)[None])[0].double().numpy()
target = (out @ clean) / (clean @ clean) * clean
print("si-sdr", 10 * np.log10((target @ target) / ((out - target) @ (out - target))))
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_enhance_quality_on_pytorch_dsp(dfn3_model_dir, audio_dir):
    """Needs no DeepFilterLib (runs on Python >= 3.12 too): DFN3 on the PyTorch DSP reaches
    the SI-SDR that upstream DFN3 reaches on noisy_white.wav (16.1 dB, from 5 dB)."""
    code = SI_SDR_CHILD.format(
        model=str(dfn3_model_dir),
        noisy=str(audio_dir / "noisy_white.wav"),
        clean=str(audio_dir / "clean.wav"),
    )
    proc = run_python(code, env={"DF_MPS_LIBDF": "torch"})
    si_sdr = float(proc.stdout.split("si-sdr")[-1])
    assert si_sdr >= 16.0, si_sdr


@pytest.mark.subprocess
def test_native_mode_without_deepfilterlib_warns():
    proc = run_python(
        """
        import sys
        sys.modules["libdf"] = None
        import df_mps
        assert sys.modules["libdf"] is None  # nothing installed in its place
        """,
        env={"DF_MPS_LIBDF": "native"},
    )
    assert "DF_MPS_LIBDF=native" in proc.stderr and "can't be imported" in proc.stderr


@pytest.mark.subprocess
def test_forcing_torch_after_df_was_imported_warns(real_libdf):
    proc = run_python(
        """
        import sys
        import df_mps  # auto: the real libdf is importable, so it stays
        import df.enhance
        real = sys.modules["df.enhance"].DF
        df_mps.patch(libdf="torch")
        import libdf
        assert getattr(libdf, "__df_mps_shim__", False)
        assert sys.modules["df.enhance"].DF is real  # already bound: unchanged
        df_mps.unpatch()
        assert sys.modules["libdf"].DF is real
        """,
    )
    assert "only reaches modules imported from now on" in proc.stderr


@pytest.mark.parametrize("n", [960, 512, 320, 97, 6])
def test_rfft_real_equals_torch_fft(n):
    """The complex-free FFT against torch.fft (two-step factorisations, and the direct DFT
    for a prime length)."""
    frames = torch.randn(3, 7, n, generator=torch.Generator().manual_seed(n))
    expected = torch.view_as_real(torch.fft.rfft(frames))
    got = dsp.rfft_real(frames)
    scale = expected.abs().amax()
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-6 * scale
