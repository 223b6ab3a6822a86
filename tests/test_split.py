"""``--split-long``: a long file as segments on several lanes, crossfaded back together.

Speech made for the test: ../shared's clean.wav tiled (reversed, rolled, at other gains) to
40 s, plus the noise of noisy_white.wav (noisy_white - clean) rolled against it, so the clean
reference is known. White noise only: with noisy_pink's noise the split output moves by
-0.9 to +0.3 dB (as the exact output does when the recording starts 1-5 s earlier; see
benchmarks/bench_split.py and docs/troubleshooting.md), so 0.2 dB is not a bound there.

The split output must score within 0.2 dB SI-SDR against clean of the exact
(unsplit) output, keep the input's length, rate, channels and sample format, and leave no
temporary file after success, a bad file or an interruption.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

import df_mps  # noqa: F401  (patches DeepFilterNet)
from df_mps import enhance as cli
from df_mps import split
from df_mps.api import Enhancer, FileError, FileResult
from df_mps.split import SplitOptions, SplitPlan
from df_mps.testing import made_speech, si_sdr


# -- planning (no model) ------------------------------------------------------------------------
def test_a_file_is_split_only_when_it_would_set_the_wall_time():
    # Alone at batch 4: a 60 s mono file's share is 15 s; segments of at least 20 s -> 3.
    assert split.segment_count(60, 1, 15, 4, 20) == 3
    assert split.segment_count(60, 1, 15, 4, 10) == 4  # never more than the lanes
    assert split.segment_count(60, 2, 30, 4, 10) == 2  # a stereo file takes 2 lanes a segment
    assert split.segment_count(30, 1, 30, 64, 20) == 1  # not longer than its share
    assert split.segment_count(35, 1, 10, 4, 20) == 1  # two segments would be too short
    assert split.segment_count(1800, 1, 750, 4, 20) == 3  # 30 min among 20 x 60 s files
    assert split.segment_count(60, 1, 15, 1, 20) == 1  # one lane: nothing to spread over


def test_segments_cover_the_file_and_linear_fades_sum_to_one():
    bounds = split.segment_bounds(100_001, 3)
    assert bounds[0] == 0 and bounds[-1] == 100_001 and bounds == sorted(bounds)
    out, inn = split.crossfade_weights(480, "linear")
    assert np.allclose(out + inn, 1) and inn[0, 0] < 0.01 and inn[-1, 0] > 0.99
    out, inn = split.crossfade_weights(480, "equal-power")
    assert np.allclose(out**2 + inn**2, 1)


# -- with DFN3 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def enhancer(dfn3_model_dir):
    return Enhancer(dfn3_model_dir, batch=4, piece_seconds=1.0)


@pytest.mark.slow
def test_split_long_stays_within_0_2_db_of_the_exact_output(enhancer, audio_dir, tmp_path):
    noisy, clean, sr = made_speech(audio_dir, "white", 40.0)
    path = tmp_path / "long.wav"
    sf.write(str(path), noisy, sr, "FLOAT")
    options = SplitOptions(min_segment_seconds=10.0)  # 4 segments: 3 joins; W, fade default
    plan = SplitPlan([(path, tmp_path / "x.wav")], batch=enhancer.batch, overwrite=False,
                     options=options)  # fmt: skip
    assert [f.k for f in plan.files] == [4]

    (exact,) = enhancer.enhance_files([(path, tmp_path / "out" / "exact.wav")])
    (parted,) = enhancer.enhance_files([(path, tmp_path / "out" / "split.wav")], split_long=options)
    assert isinstance(parted, FileResult), parted
    assert (parted.frames, parted.sample_rate, parted.channels) == (len(noisy), sr, 1)
    a, _ = sf.read(str(exact.target), dtype="float32")
    b, _ = sf.read(str(parted.target), dtype="float32")
    assert a.shape == b.shape == noisy.shape
    first_join = plan.files[0].bounds[1]
    assert np.abs(a[:first_join] - b[:first_join]).max() <= 1e-5  # exact up to the first join
    assert np.abs(a[first_join:] - b[first_join:]).max() > 1e-4  # and really split after it
    exact_db, split_db = si_sdr(a, clean), si_sdr(b, clean)
    assert abs(split_db - exact_db) <= 0.2, (exact_db, split_db)
    assert sorted(os.listdir(tmp_path / "out")) == ["exact.wav", "split.wav"]


SMALL = SplitOptions(warmup_seconds=1.0, fade_seconds=0.25, min_segment_seconds=2.0)


@pytest.mark.slow
def test_stereo_at_44k_keeps_length_rate_channels_and_format(enhancer, audio_dir, tmp_path):
    import torch
    import torchaudio.functional as AF

    noisy, _, sr = made_speech(audio_dir, "white", 8.0)
    stereo = np.stack([noisy, np.roll(noisy, sr // 3) * 0.7])
    x = AF.resample(torch.from_numpy(stereo), sr, 44100).numpy().T * 0.5
    path = tmp_path / "stereo.flac"
    sf.write(str(path), x, 44100, "PCM_16")
    (exact,) = enhancer.enhance_files([(path, tmp_path / "out" / "exact.flac")])
    seconds = []
    (parted,) = enhancer.enhance_files(
        [(path, tmp_path / "out" / "split.flac")], split_long=SMALL, progress=seconds.append
    )
    assert isinstance(parted, FileResult), parted
    assert abs(sum(seconds) - 8.0) < 0.1  # the file's seconds, not its segments' warm-ups
    a_info, b_info = sf.info(str(path)), sf.info(str(parted.target))
    assert (b_info.frames, b_info.samplerate, b_info.channels, b_info.subtype) == (
        a_info.frames,
        44100,
        2,
        "PCM_16",
    )
    a, _ = sf.read(str(exact.target), dtype="float32")
    b, _ = sf.read(str(parted.target), dtype="float32")
    for c in range(2):
        assert si_sdr(b[:, c], a[:, c]) > 20  # the same speech, joined without clicks
    assert sorted(os.listdir(tmp_path / "out")) == ["exact.flac", "split.flac"]


@pytest.mark.slow
def test_a_bad_long_file_is_one_error_and_leaves_nothing(enhancer, audio_dir, tmp_path):
    noisy, _, sr = made_speech(audio_dir, "white", 6.0)
    good, nan, corrupt = tmp_path / "good.wav", tmp_path / "nan.wav", tmp_path / "corrupt.wav"
    sf.write(str(good), noisy, sr, "FLOAT")
    bad = noisy.copy()
    bad[int(4.5 * sr)] = np.nan  # in a later segment than the first
    sf.write(str(nan), bad, sr, "FLOAT")
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    out = tmp_path / "out"
    jobs = [(p, out / p.name) for p in (good, nan, corrupt)]
    assert {len(f.bounds) - 1 for f in SplitPlan(jobs, batch=4, overwrite=False,
                                                 options=SMALL).files} == {2}  # fmt: skip
    results = list(enhancer.enhance_files(jobs, split_long=SMALL))
    assert len(results) == 3
    errors = {r.source.name: r.message for r in results if isinstance(r, FileError)}
    assert set(errors) == {"nan.wav", "corrupt.wav"}
    assert "NaN or Inf sample(s) (first at 4.50 s)" in errors["nan.wav"], errors["nan.wav"]
    assert "\n" not in errors["nan.wav"] + errors["corrupt.wav"]
    assert os.listdir(out) == ["good.wav"]  # no temp file, no partial output


def test_a_wav_without_a_length_is_split_and_read_to_its_end(enhancer, audio_dir, tmp_path):
    # #13 item 1: a data size of 0 (a recorder that died) reads as no samples in libsndfile;
    # the segments read the samples that are there, as from the finalised file.
    import struct

    noisy, _, sr = made_speech(audio_dir, "white", 6.0)
    intact, path = tmp_path / "intact.wav", tmp_path / "open.wav"
    sf.write(str(intact), noisy, sr, "PCM_16")
    data = bytearray(intact.read_bytes())
    at = data.find(b"data")
    data[4:8] = data[at + 4 : at + 8] = struct.pack("<I", 0)
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    jobs = [(intact, out / "intact.wav"), (path, out / "open.wav")]
    assert [len(f.bounds) - 1 for f in SplitPlan(jobs, batch=4, overwrite=False,
                                                 options=SMALL).files] == [2, 2]  # fmt: skip
    results = list(enhancer.enhance_files(jobs, split_long=SMALL))
    assert all(isinstance(r, FileResult) for r in results), results
    a, _ = sf.read(str(out / "intact.wav"), dtype="float32")
    b, _ = sf.read(str(out / "open.wav"), dtype="float32")
    assert a.shape == b.shape == noisy.shape and np.array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["segments", "assembly", "after_a_segment_is_in"])
def test_interrupt_removes_every_temp_file(enhancer, audio_dir, tmp_path, monkeypatch, where):
    noisy, _, sr = made_speech(audio_dir, "white", 6.0)
    path = tmp_path / "long.wav"
    sf.write(str(path), noisy, sr, "FLOAT")
    out = tmp_path / "out"
    seen = []
    progress = None
    if where == "segments":
        real = split.SegmentSink.write

        def write(self, samples):
            real(self, samples)
            seen.append(os.listdir(out))
            if len(seen) == 5:
                raise KeyboardInterrupt

        monkeypatch.setattr(split.SegmentSink, "write", write)
    elif where == "assembly":
        real_write = sf.SoundFile.write

        def write(self, *args, **kwargs):  # only the assembler writes through SoundFile
            real_write(self, *args, **kwargs)
            seen.append(os.listdir(out))
            raise KeyboardInterrupt

        monkeypatch.setattr(sf.SoundFile, "write", write)
    else:
        # Segment 0 has no warm-up, so it is in its temporary file while the others still run:
        # interrupt the next step (the scheduling thread), with no sink left to abort it.
        real_done = split.SplitFile.segment_done
        done = []

        def segment_done(self, i):
            real_done(self, i)
            done.append(i)

        def progress(seconds):
            if done:
                seen.append(os.listdir(out))
                raise KeyboardInterrupt

        monkeypatch.setattr(split.SplitFile, "segment_done", segment_done)
    # With 2 s of warm-up segment 0 is two 1-s pieces shorter than the others.
    options = SMALL if where != "after_a_segment_is_in" else SplitOptions(2.0, 0.25, 2.0)
    job = (path, out / "long.wav")
    with pytest.raises(KeyboardInterrupt):
        list(enhancer.enhance_files([job], split_long=options, progress=progress))
    assert seen and any(".part" in name for name in seen[-1]), seen  # temp files existed
    assert os.listdir(out) == []


def test_an_existing_output_is_one_error_and_untouched(enhancer, audio_dir, tmp_path):
    noisy, _, sr = made_speech(audio_dir, "white", 6.0)
    path, target = tmp_path / "long.wav", tmp_path / "out" / "long.wav"
    sf.write(str(path), noisy, sr, "FLOAT")
    target.parent.mkdir()
    target.write_bytes(b"keep me")
    results = list(enhancer.enhance_files([(path, target)], split_long=SMALL))
    assert [type(r) for r in results] == [FileError]
    assert results[0].message == f"'{target}': output exists (use --overwrite to replace it)"
    assert os.listdir(target.parent) == ["long.wav"] and target.read_bytes() == b"keep me"


def test_cli_split_long_flag(dfn3_model_dir, audio_dir, tmp_path, capsys):
    rc = cli.main(["x.wav", "--split-long", "--whole-file"])
    assert rc == 1
    assert capsys.readouterr().err.strip() == (
        "df-mps-enhance: error: --split-long and --whole-file exclude each other"
    )
    # Ray's actors run whole files: refused in one line, before any cluster starts.
    assert cli.main(["x.wav", "--split-long", "--ray"]) == 1
    assert capsys.readouterr().err.strip() == (
        "df-mps-enhance: error: --split-long and --ray exclude each other (Ray's actors run "
        "whole files)"
    )
    noisy, _, sr = made_speech(audio_dir, "white", 1.0)
    path = tmp_path / "short.wav"
    sf.write(str(path), noisy, sr)
    args = [str(path), "-o", str(tmp_path / "out"), "-m", str(dfn3_model_dir), "--split-long"]
    assert cli.main(args + ["--threads", "1", "--log-level", "error", "--no-suffix"]) == 0
    assert os.listdir(tmp_path / "out") == ["short.wav"]
