"""On a real Apple-Silicon Mac only (marker ``mps``; skipped elsewhere with a reason).

Run with ``nox -s mps`` or ``pytest -m mps`` on the Mac.
"""

import platform

import pytest
import soundfile as sf
import torch

pytestmark = [pytest.mark.mps, pytest.mark.slow]


@pytest.fixture(scope="module")
def mps_model(dfn3_model_dir):
    import df_mps

    df_mps.patch(device="mps")
    from df.enhance import init_df

    model, df_state, _ = init_df(str(dfn3_model_dir), log_file=None, log_level="ERROR")
    yield model, df_state
    df_mps.patch(device="auto")


def test_capabilities_match_this_mac():
    from df_mps import capabilities

    caps = capabilities.refresh()
    release = tuple(int(x) for x in platform.mac_ver()[0].split(".")[:2])
    assert caps.mps_available
    if release != (10, 16):
        assert caps.macos_version == release
    assert caps.mps_complex is (caps.macos_version >= (14, 0))
    # The rule and the runtime probe agree on this machine.
    from df_mps.capabilities import probe_mps_complex

    assert probe_mps_complex() is caps.mps_complex


def test_dfn3_runs_on_mps_and_matches_the_cpu(mps_model, audio_dir):
    from df.enhance import enhance

    model, df_state = mps_model
    assert {p.device.type for p in model.parameters()} == {"mps"}
    audio, _ = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32", always_2d=True)
    audio = torch.from_numpy(audio.T.copy())
    on_mps = enhance(model, df_state, audio)
    cpu_model = model.to("cpu")
    import df_mps

    df_mps.patch(device="cpu")
    try:
        on_cpu = enhance(cpu_model, df_state, audio)
    finally:
        model.to("mps")
        df_mps.patch(device="mps")
    assert (on_mps - on_cpu).abs().max().item() <= 1e-4


def test_forced_real_path_on_mps_matches_complex(mps_model, audio_dir):
    from df.enhance import enhance

    from df_mps import capabilities, settings

    if not capabilities.get().mps_complex:
        pytest.skip("this macOS has no MPS complex support: the real path is the only one")
    model, df_state = mps_model
    audio, _ = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32", always_2d=True)
    audio = torch.from_numpy(audio.T.copy())
    previous = settings.get()
    outs = {}
    for method in ("complex", "real"):
        settings.set_current(previous.replace(forward_method=method))
        outs[method] = enhance(model, df_state, audio)
    settings.set_current(previous)
    assert (outs["real"] - outs["complex"]).abs().max().item() <= 1e-5
