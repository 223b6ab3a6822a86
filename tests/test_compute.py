"""Device-safe compute with the real DFN3 weights: emulation and CPU equivalence.

- Emulation: df_mps.testing makes the CPU behave like MPS before macOS 14 (any complex tensor
  raises inside the model's forward). Unpatched DFN3 must fail there; patched DFN3 must pass.
- Equivalence: the real-valued path (forced with forward_method="real") against upstream's
  complex path on the CPU, same input: max abs difference <= 1e-5.
"""

import contextlib
import math

import pytest
import soundfile as sf
import torch

import df_mps
from df_mps import settings
from df_mps.testing import ComplexNotSupportedError, emulate_no_complex

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def unpatched():
    df_mps.unpatch()
    try:
        yield
    finally:
        df_mps.patch()


@contextlib.contextmanager
def forward_method(method):
    previous = settings.get()
    settings.set_current(previous.replace(forward_method=method))
    try:
        yield
    finally:
        settings.set_current(previous)


def read(path):
    audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(audio.T.copy()), sr


def si_sdr(est, ref):
    est, ref = est.double().flatten(), ref.double().flatten()
    n = min(len(est), len(ref))
    est, ref = est[:n], ref[:n]
    alpha = (est @ ref) / (ref @ ref)
    target = alpha * ref
    return 10 * math.log10(float(target @ target) / float((est - target) @ (est - target)))


@pytest.fixture(scope="module")
def noisy(audio_dir):
    audio, sr = read(audio_dir / "noisy_white.wav")
    assert sr == 48000
    return audio


@pytest.fixture(scope="module")
def features(dfn3, noisy):
    from df.enhance import df_features

    model, df_state = dfn3
    return df_features(noisy[:, : 48000 * 3], df_state, model.nb_df, device="cpu")


def forward(model, features):
    spec, erb_feat, spec_feat = features
    with torch.no_grad():
        return model(spec.clone(), erb_feat, spec_feat)


@contextlib.contextmanager
def post_filter(model, on):
    previous = model.post_filter
    model.post_filter = on
    try:
        yield
    finally:
        model.post_filter = previous


# -- emulation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pf", [False, True], ids=["no-pf", "pf"])
def test_unpatched_dfn3_fails_under_emulation(dfn3, features, pf):
    model, _ = dfn3
    with post_filter(model, pf), unpatched(), emulate_no_complex(model):
        with pytest.raises(ComplexNotSupportedError, match="MacOS 14.0 or newer"):
            forward(model, features)


@pytest.mark.parametrize("pf", [False, True], ids=["no-pf", "pf"])
def test_patched_dfn3_passes_under_emulation_and_matches(dfn3, features, pf):
    model, _ = dfn3
    with post_filter(model, pf):
        reference = forward(model, features)  # CPU, upstream's complex path
        with emulate_no_complex(model):
            emulated = forward(model, features)
    for got, expected in zip(emulated, reference):
        assert (got - expected).abs().max().item() <= 1e-5


def test_post_filter_guard_bites_only_in_the_post_filter(dfn3, features):
    # With the deep filter routed but the post-filter left upstream, --pf must still fail:
    # proves the post-filter patch is needed on its own.
    from df_mps.registry import REGISTRY

    model, _ = dfn3
    post = next(i for k, i in REGISTRY._installed.items() if k[0] == "post_filter")
    setattr(post.owner, post.name, post.original)
    try:
        with post_filter(model, True), emulate_no_complex(model):
            with pytest.raises(ComplexNotSupportedError, match="abs|view_as_complex"):
                forward(model, features)
    finally:
        setattr(post.owner, post.name, post.wrapper)


def test_enhance_end_to_end_under_emulation(dfn3, noisy, audio_dir):
    from df.enhance import enhance

    model, df_state = dfn3
    reference = enhance(model, df_state, noisy)
    with emulate_no_complex(model):
        emulated = enhance(model, df_state, noisy)
    assert emulated.shape == noisy.shape
    assert (emulated - reference).abs().max().item() <= 1e-5
    with unpatched(), emulate_no_complex(model), pytest.raises(ComplexNotSupportedError):
        enhance(model, df_state, noisy)


def test_stoi_under_emulation():
    from df.stoi import stoi

    torch.manual_seed(0)
    clean = torch.randn(2, 16000) * 0.1
    degraded = clean + 0.05 * torch.randn(2, 16000)
    expected = stoi(clean, degraded, 16000)
    with unpatched(), emulate_no_complex(), pytest.raises(ComplexNotSupportedError):
        stoi(clean, degraded, 16000)
    with emulate_no_complex():
        got = stoi(clean, degraded, 16000)
    assert torch.equal(got, expected)
    assert got.device == clean.device


def test_stoi_on_a_complex_less_device_runs_on_the_cpu(monkeypatch):
    from df_mps import capabilities
    from df_mps.routing import Route, route
    from df_mps.testing import no_complex_capabilities

    with capabilities.override(no_complex_capabilities(("mps",))):
        assert route("stoi", torch.device("mps")) is Route.CPU
        assert route("stoi", torch.device("cpu")) is Route.UPSTREAM


# -- equivalence on the CPU ----------------------------------------------------------------------
@pytest.mark.parametrize("pf", [False, True], ids=["no-pf", "pf"])
def test_real_path_equals_upstream_model_outputs(dfn3, features, pf):
    model, _ = dfn3
    with post_filter(model, pf):
        with unpatched():
            upstream = forward(model, features)
        with forward_method("real"):
            real = forward(model, features)
    names = ("spec", "erb mask", "lsnr", "df coefs")
    for name, got, expected in zip(names, real, upstream):
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-5, f"{name}: {diff}"


def test_real_path_equals_upstream_waveform_and_si_sdr(dfn3, noisy, audio_dir):
    from df.enhance import enhance

    model, df_state = dfn3
    clean, _ = read(audio_dir / "clean.wav")
    with unpatched():
        upstream = enhance(model, df_state, noisy)
    with forward_method("real"):
        real = enhance(model, df_state, noisy)
    assert (real - upstream).abs().max().item() <= 1e-5
    sdr_up, sdr_real = si_sdr(upstream, clean), si_sdr(real, clean)
    assert abs(sdr_up - sdr_real) <= 0.01
    assert sdr_up > 15  # sanity: the shared README reports 16.1 dB


def test_config_ini_section_selects_the_real_path(dfn3, features):
    from df.config import config

    from df_mps.routing import Route, route

    model, _ = dfn3
    assert settings.get().forward_method is None
    assert route("deep_filter", "cpu") is Route.UPSTREAM
    config.parser.add_section("df_mps")
    config.parser.set("df_mps", "forward_method", "real")
    try:
        assert route("deep_filter", "cpu") is Route.REAL
        with forward_method("complex"):  # patch()/env beat config.ini
            assert route("deep_filter", "cpu") is Route.UPSTREAM
    finally:
        config.parser.remove_section("df_mps")
    assert route("deep_filter", "cpu") is Route.UPSTREAM


def test_real_post_filter_is_kept_in_concurrent_calls_on_one_model(dfn3, features):
    # Threads share one model and the real route: every call must get the post-filter, and no
    # call may change the model's own setting (#13 item 2: half the calls lost it).
    import threading

    model, _ = dfn3
    short = tuple(f[:, :, 100:150].clone() for f in features)

    def relative(got, ref):
        return ((got - ref).norm() / ref.norm()).item()

    with post_filter(model, True), forward_method("real"):
        expected = forward(model, short)[0]
        with post_filter(model, False):
            without = forward(model, short)[0]
        assert relative(without, expected) > 1e-2
        barrier = threading.Barrier(4)
        results, errors = [], []

        def calls():
            try:
                barrier.wait()
                for _ in range(3):
                    results.append(forward(model, short)[0])
                    assert model.post_filter is True
            except Exception as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=calls) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    lost = sum(relative(got, expected) > 1e-6 for got in results)
    assert len(results) == 12 and lost == 0, f"{lost} of {len(results)} calls lost the post-filter"


def test_real_post_filter_stand_in_stays_inside_dfn3_forward(dfn3):
    # The registry follows as_complex to every module that bound it (df.enhance uses it on the
    # enhanced spectrum): outside DfNet.forward it must stay upstream's complex view.
    import importlib

    df_enhance = importlib.import_module("df.enhance")
    x = torch.randn(1, 1, 4, 481, 2)
    with forward_method("real"):
        got = df_enhance.as_complex(x)
    assert torch.is_complex(got) and torch.equal(torch.view_as_real(got), x)
