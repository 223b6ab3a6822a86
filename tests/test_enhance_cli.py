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


@pytest.fixture(scope="module")
def enhancer(dfn3_model_dir):
    return cli.load_enhancer(dfn3_model_dir)


@pytest.fixture
def run_cli(dfn3_model_dir, enhancer, capsys):
    def run(*argv):
        capsys.readouterr()
        rc = cli.main([*map(str, argv), "-m", str(dfn3_model_dir), "--threads", "1"])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def si_sdr(estimate: np.ndarray, reference: np.ndarray) -> float:
    alpha = np.dot(estimate, reference) / np.dot(reference, reference)
    target = alpha * reference
    return float(10 * np.log10(np.sum(target**2) / np.sum((estimate - target) ** 2)))


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


def test_a_wav_cut_inside_its_data_gives_the_samples_it_has(run_cli, audio_dir, tmp_path):
    files = _make_corpus(audio_dir, tmp_path / "in")
    cut = tmp_path / "in" / "cut.wav"
    cut.write_bytes(files["good"].read_bytes()[:30001])  # half a sample at the end, too
    readable = sf.info(str(cut)).frames
    rc, _, err = run_cli(cut, "-o", tmp_path / "out")
    assert rc == 0, err
    assert sf.info(str(tmp_path / "out" / f"cut_{SUFFIX}.wav")).frames == readable


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
