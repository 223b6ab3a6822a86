"""df.io.load_audio / save_audio served through soundfile (patches/audio_io.py)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import df_mps
from df_mps.patches import audio_io
from df_mps.registry import REGISTRY

SR = 48000


@pytest.fixture(scope="module")
def df_io():
    df_mps.patch()
    import df.enhance  # noqa: F401  (binds load_audio/save_audio by name)
    import df.io

    return df.io


def _files(directory) -> list:
    return sorted(os.listdir(directory))


def test_every_binding_is_the_patched_function(df_io):
    enhance_mod = sys.modules["df.enhance"]
    assert REGISTRY.is_wrapper(df_io.load_audio)
    assert REGISTRY.is_wrapper(df_io.save_audio)
    assert enhance_mod.load_audio is df_io.load_audio
    assert enhance_mod.save_audio is df_io.save_audio
    installed = {(m, a) for p, m, a in REGISTRY.installed() if p == "audio_io"}
    assert {("df.io", "load_audio"), ("df.enhance", "save_audio")} <= installed


def test_float32_round_trip_is_exact(df_io, tmp_path):
    rng = np.random.default_rng(0)
    audio = torch.from_numpy(rng.uniform(-1.5, 1.5, (2, 4801)).astype(np.float32))
    path = tmp_path / "f.wav"
    df_io.save_audio(str(path), audio, SR, dtype=torch.float32)
    assert sf.info(str(path)).subtype == "FLOAT"
    loaded, meta = df_io.load_audio(str(path))
    assert isinstance(loaded, torch.Tensor) and loaded.dtype == torch.float32
    assert loaded.shape == (2, 4801) and loaded.is_contiguous()
    torch.testing.assert_close(loaded, audio, rtol=0, atol=0)  # float keeps values beyond 1.0
    assert isinstance(meta, df_io.AudioMetaData)
    assert (meta.sample_rate, meta.num_frames, meta.num_channels) == (SR, 4801, 2)
    assert (meta.bits_per_sample, meta.encoding) == (32, "PCM_F")


def test_int16_round_trip_rounds_to_the_nearest_step(df_io, tmp_path):
    rng = np.random.default_rng(1)
    audio = torch.from_numpy(rng.uniform(-1, 0.999, (1, 4800)).astype(np.float32))
    path = tmp_path / "i.wav"
    df_io.save_audio(str(path), audio, SR)  # upstream's default dtype: int16
    assert sf.info(str(path)).subtype == "PCM_16"
    loaded, meta = df_io.load_audio(str(path))
    assert (meta.bits_per_sample, meta.encoding) == (16, "PCM_S")
    assert torch.max(torch.abs(loaded - audio)) <= 0.5 / 32768 + 1e-7
    raw, _ = sf.read(str(path), dtype="int16")
    np.testing.assert_array_equal(raw, np.round(audio.numpy()[0] * 32768).astype(np.int16))


def test_int16_clips_instead_of_wrapping(df_io, tmp_path):
    audio = torch.tensor([[-2.0, -1.5, -1.0, 0.5, 0.9999, 1.0, 1.5, 2.0]])
    path = tmp_path / "clip.wav"
    df_io.save_audio(str(path), audio, SR, dtype=torch.int16)
    raw, _ = sf.read(str(path), dtype="int16")
    np.testing.assert_array_equal(raw, [-32768, -32768, -32768, 16384, 32765, 32767, 32767, 32767])
    loaded, _ = df_io.load_audio(str(path))
    assert loaded.min() == -1.0 and loaded.max() == pytest.approx(32767 / 32768)
    assert torch.all(torch.sign(loaded[0, -3:]) == 1)  # no wrap-around to negative


def test_int16_input_is_written_as_is_and_scaled_for_float(df_io, tmp_path):
    pcm = torch.tensor([[-32768, -1, 0, 1, 32767]], dtype=torch.int16)
    df_io.save_audio(str(tmp_path / "a.wav"), pcm, SR, dtype=torch.int16)
    raw, _ = sf.read(str(tmp_path / "a.wav"), dtype="int16")
    np.testing.assert_array_equal(raw, pcm.numpy()[0])
    df_io.save_audio(str(tmp_path / "b.wav"), pcm, SR, dtype=torch.float32)
    loaded, _ = df_io.load_audio(str(tmp_path / "b.wav"))
    torch.testing.assert_close(loaded, pcm.float() / 32768, rtol=0, atol=0)


def test_suffix_and_output_dir_follow_upstream(df_io, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    df_io.save_audio(
        "some/dir/noisy.flac", torch.zeros(1, 480), SR, output_dir=str(out), suffix="DeepFilterNet3"
    )
    assert _files(out) == ["noisy_DeepFilterNet3.flac"]
    info = sf.info(str(out / "noisy_DeepFilterNet3.flac"))
    assert (info.format, info.subtype, info.samplerate) == ("FLAC", "PCM_16", SR)


def test_formats_follow_the_extension(df_io, tmp_path):
    audio = torch.zeros(2, 4800)
    df_io.save_audio(str(tmp_path / "a.flac"), audio, SR, dtype=torch.float32)
    df_io.save_audio(str(tmp_path / "a.ogg"), audio, SR)
    assert sf.info(str(tmp_path / "a.flac")).subtype == "PCM_24"  # FLAC has no float samples
    ogg = sf.info(str(tmp_path / "a.ogg"))
    assert (ogg.format, ogg.subtype, ogg.channels) == ("OGG", "VORBIS", 2)
    _, meta = df_io.load_audio(str(tmp_path / "a.flac"))
    assert (meta.encoding, meta.bits_per_sample) == ("FLAC", 24)


def test_load_resamples_and_keeps_the_original_metadata(df_io, tmp_path):
    t = np.arange(44100) / 44100
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(str(tmp_path / "t.wav"), np.stack([tone, -tone], 1), 44100, subtype="FLOAT")
    loaded, meta = df_io.load_audio(str(tmp_path / "t.wav"), sr=SR, verbose=False)
    assert loaded.shape == (2, SR)
    assert meta.sample_rate == 44100 and meta.num_frames == 44100
    expected = df_io.resample(torch.from_numpy(np.stack([tone, -tone])), 44100, SR)
    torch.testing.assert_close(loaded, expected)
    part, _ = df_io.load_audio(str(tmp_path / "t.wav"), frame_offset=100, num_frames=50)
    torch.testing.assert_close(part[0], torch.from_numpy(tone[100:150]))


def test_load_errors_are_runtime_errors_with_the_reason(df_io, tmp_path):
    (tmp_path / "text.wav").write_text("not audio\n" * 20)
    with pytest.raises(RuntimeError, match="Format not recognised"):
        df_io.load_audio(str(tmp_path / "text.wav"))
    with pytest.raises(RuntimeError, match="no such file|System error"):
        df_io.load_audio(str(tmp_path / "missing.wav"))
    with pytest.raises(TypeError, match="bogus"):
        df_io.load_audio(str(tmp_path / "text.wav"), bogus=1)


def test_failed_write_leaves_no_file_and_keeps_the_old_one(df_io, tmp_path):
    target = tmp_path / "x.opus"
    target.write_bytes(b"old contents")
    # Opus can't hold 44.1 kHz: libsndfile fails after the temporary file exists.
    with pytest.raises(RuntimeError, match="Opus only supports"):
        df_io.save_audio(str(target), torch.zeros(1, 441), 44100)
    assert target.read_bytes() == b"old contents"
    assert _files(tmp_path) == ["x.opus"]


def test_interrupted_write_cleans_up(tmp_path, monkeypatch):
    real_write = sf.SoundFile.write

    def write_then_interrupt(self, *args, **kwargs):
        real_write(self, *args, **kwargs)  # the samples are in the temp file at this point
        raise KeyboardInterrupt

    monkeypatch.setattr(sf.SoundFile, "write", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        audio_io.write_audio(tmp_path / "y.wav", np.zeros((480, 1), np.float32), SR)
    assert _files(tmp_path) == []


def test_write_without_overwrite_refuses_an_existing_file(tmp_path):
    target = tmp_path / "z.wav"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        audio_io.write_audio(target, np.zeros((480, 1), np.float32), SR, overwrite=False)
    assert target.read_bytes() == b"keep me"
    assert _files(tmp_path) == ["z.wav"]
    audio_io.write_audio(tmp_path / "new.wav", np.zeros((480, 1), np.float32), SR, overwrite=False)
    assert oct((tmp_path / "new.wav").stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's


@pytest.mark.parametrize("subtype,bits", [("PCM_24", 24), ("PCM_32", 32), ("PCM_U8", 8)])
def test_wider_pcm_clips_and_round_trips(tmp_path, subtype, bits):
    x = np.array([[-2.0], [-1.0], [0.25], [1.0], [2.0]], dtype=np.float32)
    path = tmp_path / "w.wav"
    audio_io.write_audio(path, x, SR, subtype=subtype)
    y, _ = sf.read(str(path), dtype="float64")
    top = 1 - 2.0 ** (1 - bits)
    np.testing.assert_allclose(y, [-1.0, -1.0, 0.25, top, top], atol=1e-9)
