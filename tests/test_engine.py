"""The batched engine: each file's output is the same whatever batch it rode in.

A corpus of 13 files mixes lengths (0.3 s to 3 min), rates (16, 44.1, 48 kHz) and channels
(1, 2). It is enhanced through the command line at ``--batch 1`` in input order and at
``--batch 4`` in reverse order; every output must equal its counterpart within 1e-5, and the
48 kHz mono members must equal upstream's whole-file ``enhance()`` within 1e-4. Real DFN3
weights and speech from ../shared.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import df_mps  # noqa: F401  (patches DeepFilterNet)
from df_mps import enhance as cli
from df_mps.api import Enhancer, FileError, FileResult
from df_mps.engine import exact_fp32

pytestmark = pytest.mark.slow

# (name, seconds, rate, channels)
CORPUS = [
    ("a_short", 0.3, 48000, 1),
    ("b_16k", 0.8, 16000, 1),
    ("c_stereo", 1.5, 48000, 2),
    ("d_44k", 2.5, 44100, 1),
    ("e_48k", 4.0, 48000, 1),
    ("f_16k_stereo", 6.0, 16000, 2),
    ("g_48k", 8.0, 48000, 1),
    ("h_44k_stereo", 10.0, 44100, 2),
    ("i_48k", 12.5, 48000, 1),
    ("j_16k", 20.0, 16000, 1),
    ("k_48k", 25.0, 48000, 1),
    ("l_44k", 30.0, 44100, 1),
    ("m_long", 180.0, 44100, 1),
]


def _speech(audio_dir: Path, seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    """Shared speech (white and pink noise at 5 dB), tiled to length, at ``rate``."""
    import torchaudio.functional as AF

    white, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    pink, _ = sf.read(str(audio_dir / "noisy_pink.wav"), dtype="float32")
    rng = np.random.default_rng(seed)
    source = np.concatenate([white, pink * 0.8, white[::-1] * 0.6])
    start = int(rng.integers(0, sr * 5))
    need = int(seconds * sr) + 1
    reps = -(-(start + need) // source.shape[0])
    mono = np.tile(source, reps)[start : start + need]
    cols = [mono, np.roll(mono, sr // 3) * 0.7][:channels]
    x = torch.from_numpy(np.stack(cols))
    if rate != sr:
        x = AF.resample(x, sr, rate)
    return np.ascontiguousarray(x.numpy().T[: int(seconds * rate)], dtype=np.float32)


@pytest.fixture(scope="module")
def corpus(audio_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    files = []
    for seed, (name, seconds, rate, channels) in enumerate(CORPUS):
        path = root / f"{name}.wav"
        sf.write(str(path), _speech(audio_dir, seconds, rate, channels, seed), rate, "FLOAT")
        files.append(path)
    return files


@pytest.fixture(scope="module")
def outputs(corpus, dfn3_model_dir, tmp_path_factory):
    """The corpus through the CLI at batch 1 (input order) and batch 4 (reverse order)."""
    out = {}
    for batch, order in ((1, corpus), (4, corpus[::-1])):
        target = tmp_path_factory.mktemp(f"batch{batch}")
        rc = cli.main(
            [*map(str, order), "-o", str(target), "-m", str(dfn3_model_dir), "--batch", str(batch)]
            + ["--threads", "1", "--log-level", "error", "--no-suffix"]
        )
        assert rc == 0
        out[batch] = target
    return out


def test_every_file_equals_across_batch_sizes(corpus, outputs):
    for path in corpus:
        one, _ = sf.read(str(outputs[1] / path.name), dtype="float32", always_2d=True)
        four, _ = sf.read(str(outputs[4] / path.name), dtype="float32", always_2d=True)
        info = sf.info(str(path))
        assert one.shape == four.shape == (info.frames, info.channels), path.name
        assert np.abs(one - four).max() <= 1e-5, path.name


def test_mono_48k_members_equal_upstream_whole_file(corpus, outputs, dfn3_model_dir):
    from df.enhance import enhance

    enhancer = Enhancer(dfn3_model_dir)
    checked = 0
    for path in corpus:
        info = sf.info(str(path))
        if info.samplerate != 48000 or info.channels != 1 or info.duration > 30:
            continue
        noisy, _ = sf.read(str(path), dtype="float32", always_2d=True)
        with exact_fp32(enhancer.device):  # upstream's maths without TF32 on a GPU too
            ref = enhance(enhancer.model, enhancer.df_state, torch.from_numpy(noisy.T.copy()))
        got, _ = sf.read(str(outputs[4] / path.name), dtype="float32", always_2d=True)
        assert np.abs(got - ref.numpy().T).max() <= 1e-4, path.name
        checked += 1
    assert checked >= 5


def test_outputs_keep_rate_channels_and_leave_no_temp_files(corpus, outputs):
    for directory in outputs.values():
        names = sorted(p.name for p in directory.iterdir())
        assert names == sorted(p.name for p in corpus)
        for path in corpus:
            a, b = sf.info(str(path)), sf.info(str(directory / path.name))
            assert (a.samplerate, a.channels, a.frames) == (b.samplerate, b.channels, b.frames)


# -- the library API ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def enhancer(dfn3_model_dir):
    return Enhancer(dfn3_model_dir, batch=4, piece_seconds=1.0)


def test_enhance_array_equals_upstream_at_any_rate_and_shape(enhancer, audio_dir):
    from df.enhance import enhance

    noisy, sr = sf.read(str(audio_dir / "noisy_pink.wav"), dtype="float32")
    noisy = noisy[: 3 * sr]
    with exact_fp32(enhancer.device):
        ref = enhance(enhancer.model, enhancer.df_state, torch.from_numpy(noisy[None].copy()))[0]
    got = enhancer.enhance_array(noisy, sr)  # 1-D in, 1-D out
    assert got.shape == noisy.shape
    assert np.abs(got - ref.numpy()).max() <= 1e-4
    stereo = np.stack([noisy, noisy[::-1]], axis=1)
    both = enhancer.enhance_array(stereo, sr)
    assert both.shape == stereo.shape
    assert np.abs(both[:, 0] - got).max() <= 1e-5
    # Another rate goes through the streamed resampler, as upstream's df.io.resample.
    with exact_fp32(enhancer.device):
        via = cli.Enhancer.__call__(enhancer, torch.from_numpy(noisy[None, ::3].copy()), 16000)
    assert np.abs(enhancer.enhance_array(noisy[::3], 16000) - via[0].numpy()).max() <= 1e-4


def test_enhance_array_refuses_bad_audio(enhancer):
    with pytest.raises(ValueError, match="NaN or Inf"):
        enhancer.enhance_array(np.array([0.0, np.nan], np.float32), 48000)
    with pytest.raises(ValueError, match="no samples"):
        enhancer.enhance_array(np.zeros((0, 1), np.float32), 48000)


def test_enhance_files_reports_a_bad_file_and_finishes_the_others(enhancer, audio_dir, tmp_path):
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    good = []
    for i in range(3):
        path = tmp_path / f"good{i}.wav"
        sf.write(str(path), noisy[: int((1.5 + i) * sr)], sr)
        good.append(path)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    nan = tmp_path / "nan.wav"
    bad = noisy[: 3 * sr].copy()
    bad[2 * sr] = np.nan
    sf.write(str(nan), bad, sr, "FLOAT")
    jobs = [(p, tmp_path / "out" / p.name) for p in [good[0], corrupt, good[1], nan, good[2]]]
    results = list(enhancer.enhance_files(jobs))
    assert len(results) == 5
    errors = {r.source.name: r.message for r in results if isinstance(r, FileError)}
    assert set(errors) == {"corrupt.wav", "nan.wav"}
    assert "NaN or Inf" in errors["nan.wav"] and "\n" not in errors["corrupt.wav"]
    done = sorted(r.source.name for r in results if isinstance(r, FileResult))
    assert done == ["good0.wav", "good1.wav", "good2.wav"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == done  # nothing partial


def test_interrupt_removes_every_lanes_temp_file(enhancer, audio_dir, tmp_path, monkeypatch):
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    jobs = []
    for i in range(4):
        path = tmp_path / f"in{i}.wav"
        sf.write(str(path), noisy[: 4 * sr], sr)
        jobs.append((path, tmp_path / "out" / path.name))
    real_write = sf.SoundFile.write
    calls = []

    def write_then_interrupt(self, *args, **kwargs):
        real_write(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 6:  # several lanes are mid-file
            raise KeyboardInterrupt

    monkeypatch.setattr(sf.SoundFile, "write", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        list(enhancer.enhance_files(jobs))
    assert len(calls) >= 6
    left = os.listdir(tmp_path / "out")
    assert left == [], left


def test_a_file_wider_than_the_batch_takes_turns(dfn3_model_dir, audio_dir):
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    x = noisy[: 2 * sr]
    wide = np.stack([x * g for g in (1.0, 0.5, 0.8, 0.3, 0.9)], axis=1)  # 5 channels
    narrow = Enhancer(dfn3_model_dir, batch=2, piece_seconds=0.5)
    got = narrow.enhance_array(wide, sr)
    one = Enhancer(dfn3_model_dir, batch=1, piece_seconds=0.5)
    for c in range(wide.shape[1]):
        assert np.abs(got[:, c] - one.enhance_array(wide[:, c], sr)).max() <= 1e-5


@pytest.mark.parametrize("dsp, fixed", [("step", "1"), ("io", "0")], ids=["gpu-way", "cpu-way"])
def test_both_dsp_placements_equal_upstream(dfn3_model_dir, audio_dir, monkeypatch, dsp, fixed):
    """On a GPU the DSP of all jobs runs stacked on the scheduling thread ("step") and every
    step has one shape (idle rows on zeros); on the CPU the DSP runs per job in the I/O threads
    ("io") and steps shrink. Both, forced here on the CPU, give upstream's output."""
    from df.enhance import enhance

    monkeypatch.setenv("DF_MPS_ENGINE_DSP", dsp)
    monkeypatch.setenv("DF_MPS_ENGINE_FIXED", fixed)
    enhancer = Enhancer(dfn3_model_dir, batch=3, piece_seconds=0.5)
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    signals = [noisy[: int(sr * s)] for s in (1.7, 1.0, 2.3, 0.4)]
    signals.append(np.stack([noisy[:sr], noisy[sr : 2 * sr]], axis=1))
    from df_mps.engine import ArraySink, ArraySource, Job

    sinks = [ArraySink() for _ in signals]
    jobs = [Job(open=lambda x=x, k=k: (ArraySource(x, sr), k)) for x, k in zip(signals, sinks)]
    engine = enhancer.engine()
    assert engine.dsp_in_io == (dsp == "io") and engine.fixed_shape == (fixed == "1")
    assert all(r.error is None for r in engine.run(jobs))
    for x, sink in zip(signals, sinks):
        x2 = x if x.ndim == 2 else x[:, None]
        ref = enhance(enhancer.model, enhancer.df_state, torch.from_numpy(x2.T.copy()))
        assert np.abs(sink.result(x2.shape[1]) - ref.numpy().T).max() <= 1e-4


def test_files_in_step_fill_every_step_and_end_on_the_short_shape(
    dfn3_model_dir, audio_dir, monkeypatch
):
    """The GPU's way (one shape, DSP on the scheduling thread), forced on the CPU: four files
    of 2 s at batch 4 and 0.5 s pieces (50 frames) run as four full steps of all four rows,
    then one step of the short shape for the 2 frames that upstream's end padding leaves (not
    a fifth full step), with no step part-empty while a file's next piece is still being read
    or analysed. Outputs equal upstream's."""
    from df.enhance import enhance

    from df_mps.engine import ArraySink, ArraySource, Job

    monkeypatch.setenv("DF_MPS_ENGINE_DSP", "step")
    monkeypatch.setenv("DF_MPS_ENGINE_FIXED", "1")
    monkeypatch.setenv("DF_MPS_ENGINE_TIMELINE", "1")
    enhancer = Enhancer(dfn3_model_dir, batch=4, piece_seconds=0.5)
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    signals = [noisy[k * sr : (k + 2) * sr] for k in range(4)]
    sinks = [ArraySink() for _ in signals]
    jobs = [Job(open=lambda x=x, k=k: (ArraySource(x, sr), k)) for x, k in zip(signals, sinks)]
    engine = enhancer.engine()
    assert all(r.error is None for r in engine.run(jobs))
    shapes = [(rows, piece) for _, _, rows, piece in engine.step_log]
    assert shapes == [(4, 50)] * 4 + [(4, engine.tail_frames)], shapes
    for x, sink in zip(signals, sinks):
        ref = enhance(enhancer.model, enhancer.df_state, torch.from_numpy(x[None].copy()))
        assert np.abs(sink.result(1)[:, 0] - ref.numpy()[0]).max() <= 1e-4


def test_stacked_dsp_at_padded_shapes_equals_the_cpu_way(dfn3_model_dir, audio_dir, monkeypatch):
    """The GPU's way forced on the CPU, at batch 8, on five files of mixed lengths, rates and
    channels: reads arrive in groups of any size, which analyse and synthesise at a power of
    two of rows (spare rows on a stream's initial state), last reads padded to a regular read
    length and last pieces to the step's length. Every output equals the CPU way's (DSP per
    job, no padding) within 1e-5, and the stacked DSP ran at no other row count."""
    from df_mps import engine as engine_module
    from df_mps.engine import ArraySink, ArraySource, Job

    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    clips = [
        (noisy[: int(1.3 * sr)], sr),
        (np.stack([noisy[sr : int(3.1 * sr)], noisy[: int(2.1 * sr)] * 0.5], axis=1), sr),
        (noisy[: int(0.37 * sr) : 3], sr // 3),
        (noisy[2 * sr : int(4.55 * sr)], sr),
        (noisy[: int(0.9 * sr)], sr),
    ]

    def run(way):
        for name, value in way.items():
            monkeypatch.setenv(name, value)
        enhancer = Enhancer(dfn3_model_dir, batch=8, piece_seconds=0.5)
        sinks = [ArraySink() for _ in clips]
        jobs = [
            Job(open=lambda x=x, rate=rate, k=k: (ArraySource(x, rate), k))
            for (x, rate), k in zip(clips, sinks)
        ]
        assert all(r.error is None for r in enhancer.engine().run(jobs))
        return [k.result(1 if x.ndim == 1 else x.shape[1]) for (x, _), k in zip(clips, sinks)]

    rows_seen = set()
    stacked = engine_module._stacked

    def spy(engine, items, which, spare=0):
        rows_seen.add(sum(item.channels for item in items) + spare)
        return stacked(engine, items, which, spare)

    reference = run({"DF_MPS_ENGINE_DSP": "io", "DF_MPS_ENGINE_FIXED": "0"})
    monkeypatch.setattr(engine_module, "_stacked", spy)
    got = run({"DF_MPS_ENGINE_DSP": "step", "DF_MPS_ENGINE_FIXED": "1"})
    assert rows_seen and rows_seen <= {1, 2, 4, 8}, rows_seen
    for ref, out in zip(reference, got):
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= 1e-5


def test_memory_does_not_grow_with_the_channel_count(
    dfn3_model_dir, audio_dir, tmp_path, python_child
):
    """#13 item 11: a 32-channel file runs as 32 lanes taking turns in rows of --batch, so the
    model's memory is that of --batch rows whatever the channel count. At 3 s pieces the old
    whole-channel run took 1.61 GB for 32 channels against 0.72 GB for one (+29 MB a channel).
    What still grows is the job's audio and features around the piece all its channels are on
    (measured: +135 MB for 28 more channels at 1 s pieces, +280 MB at 3 s)."""
    noisy, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    x = noisy[: 6 * sr]
    wide = np.stack([np.roll(x, 97 * c) * (0.5 + c / 64) for c in range(32)], axis=1)
    sf.write(str(tmp_path / "four.wav"), wide[:, :4], sr, "PCM_16")
    sf.write(str(tmp_path / "wide.wav"), wide, sr, "PCM_16")
    peaks = {}
    for name in ("four", "wide"):
        out = python_child(
            f"""
            import sys
            from df_mps import enhance
            rc = enhance.main([{str(tmp_path / name) + ".wav"!r}, "-o", {str(tmp_path / "out")!r},
                               "-m", {str(dfn3_model_dir)!r}, "--batch", "4", "--threads", "1",
                               "--piece-seconds", "3", "--log-level", "error"])
            assert rc == 0
            status = open("/proc/self/status").read()
            print("PEAK", [l.split()[1] for l in status.splitlines() if l.startswith("VmHWM")][0])
            """,
            # Two malloc arenas: glibc's one per thread (the I/O threads) makes the peak depend
            # on which thread freed what, by 100 MB and more between runs.
            env={"MALLOC_ARENA_MAX": "2"},
        ).stdout
        peaks[name] = int(out.split("PEAK")[1].strip()) / 1024  # MiB
    info = sf.info(str(tmp_path / "out" / "wide_DeepFilterNet3.wav"))
    assert (info.channels, info.frames) == (32, wide.shape[0])
    assert peaks["wide"] - peaks["four"] < 420, peaks  # 8x the channels: under 15 MB each
