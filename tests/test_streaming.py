"""df_mps.streaming: pieces that join exactly, streamed resampling, bounded memory, safe files.

The reference everywhere is upstream's own whole-file ``df.enhance.enhance`` (through the
CLI's ``Enhancer`` where resampling is involved) on the real DeepFilterNet3 weights.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from df_mps import enhance as cli
from df_mps import streaming
from df_mps.audio import TEMP_SUFFIX, AudioFileError
from df_mps.streaming import (
    BadAudioError,
    StreamEnhancer,
    StreamResampler,
    enhance_blocks,
    enhance_stream,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*resampling method name is being deprecated"),
]
SR = 48000


def _model_on_cpu() -> bool:
    from df.modules import get_device

    return get_device().type == "cpu"


# On the CPU the joins are exact to float32 rounding (measured: 1e-6). A GPU may pick other
# convolution algorithms (TF32 on CUDA) for a piece than for the whole file.
EXACT_DB = 90.0 if _model_on_cpu() else 60.0


def assert_matches(out: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    assert out.shape == ref.shape, what
    if EXACT_DB >= 90:
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=what)
    assert snr_db(out, ref) >= EXACT_DB, what


@pytest.fixture(scope="module")
def takes(audio_dir):
    white, _ = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    pink, _ = sf.read(str(audio_dir / "noisy_pink.wav"), dtype="float32")
    return white, pink


def program(takes, seconds: float, seed: int = 0) -> np.ndarray:
    """noisy_white/noisy_pink takes one after another, each at its own gain, cut to length."""
    rng = np.random.default_rng(seed)
    parts, total, i = [], 0, 0
    while total < seconds * SR:
        take = takes[i % 2] * np.float32(rng.uniform(0.2, 1.6))
        parts.append(take)
        total += take.shape[0]
        i += 1
    return np.clip(np.concatenate(parts)[: int(seconds * SR)], -1, 1).astype(np.float32)


def snr_db(out: np.ndarray, ref: np.ndarray) -> float:
    err = np.sum((out.astype(np.float64) - ref) ** 2)
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(err, 1e-300)))


def upstream(model, df_state, audio: np.ndarray, **kwargs) -> np.ndarray:
    """df.enhance.enhance on [T, C] audio at 48 kHz, returned as [T, C]."""
    from df.enhance import enhance

    x = torch.from_numpy(np.ascontiguousarray(audio.T))
    return enhance(model, df_state, x, **kwargs).numpy().T


def stream_through(stream: StreamEnhancer, audio: np.ndarray, block: int) -> np.ndarray:
    out = [stream.process(audio[i : i + block]) for i in range(0, audio.shape[0], block)]
    return np.concatenate(out + [stream.finish()])


def no_temp_files(directory: Path) -> bool:
    return not any(name.endswith(TEMP_SUFFIX) for name in os.listdir(directory))


# -- the acceptance test: 3 minutes, bounded-memory mode vs upstream's whole file ---------------
def test_three_minutes_match_upstreams_whole_file(
    enhancer, takes, dfn3_model_dir, tmp_path, python_child
):
    noisy = program(takes, 180)
    src, dst = tmp_path / "three_minutes.wav", tmp_path / "enhanced.wav"
    sf.write(str(src), noisy, SR, subtype="FLOAT")
    seen = []
    result = enhance_stream(enhancer, None, src, dst, progress=seen.append)
    assert result.frames == noisy.shape[0] and sum(seen) == noisy.shape[0]
    assert len(seen) == 18  # 10 s blocks: the file was never read whole
    out, rate = sf.read(str(dst), dtype="float32")
    assert rate == SR and out.shape == noisy.shape

    # Upstream on the whole file, in a child process: it needs ~2 GB for 3 minutes.
    ref_path = tmp_path / "ref.npy"
    python_child(
        f"""
        import numpy as np, soundfile as sf, torch
        torch.set_num_threads(1)
        import df_mps
        from df.enhance import enhance, init_df
        model, df_state, _ = init_df({str(dfn3_model_dir)!r}, log_file=None)
        noisy, _ = sf.read({str(src)!r}, dtype="float32")
        ref = enhance(model, df_state, torch.from_numpy(noisy)[None])[0].numpy()
        np.save({str(ref_path)!r}, ref)
        """
    )
    ref = np.load(ref_path)
    snr = snr_db(out, ref)
    print(f"3 min, streamed vs upstream whole file: {snr:.1f} dB")
    assert snr >= 40.0
    # In fact the pieces join exactly: what differs is float32 rounding.
    assert_matches(out, ref)


# -- joins ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live_model(enhancer):
    """DFN3 with every pathway active. The trained weights silence the deep-filter pathway
    convolution (df_convp: its ReLU outputs zeros), which hides how far back the model looks;
    shifting the batch-norm biases wakes it, so the joins are checked against the whole
    receptive field."""
    model = copy.deepcopy(enhancer.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.bias.copy_(0.5 + 0.1 * torch.randn(module.bias.shape, generator=gen))
    return model


def test_pieces_join_exactly_over_the_whole_receptive_field(enhancer, live_model, takes):
    noisy = program(takes, 4)[:, None]
    features = []
    hook = live_model.df_dec.df_convp.register_forward_hook(
        lambda module, args, out: features.append(out)
    )
    try:
        ref = upstream(live_model, enhancer.df_state, noisy)
    finally:
        hook.remove()
    assert features[0].abs().max() > 0.1  # the pathway the trained weights silence is live

    def streamed(**context):
        stream = StreamEnhancer(
            live_model, enhancer.df_state, sample_rate=SR, channels=1, piece_seconds=0.5,
            **context,
        )  # fmt: skip
        return stream_through(stream, noisy, 7001)

    out = streamed()
    assert out.shape == ref.shape
    assert_matches(out, ref)
    # The context is what makes it exact: a piece run with less of it gets the joins wrong.
    # What DFN3 needs: 6 frames before (2 input-layer + 4 deep-filter-pathway kernel frames),
    # 2 after (the lookahead). model_context's bound has room; with less, the joins are wrong.
    assert streaming.model_context(live_model) == (10, 6)
    assert snr_db(streamed(context_frames=(6, 2)), ref) >= EXACT_DB
    assert snr_db(streamed(context_frames=(4, 6)), ref) < 50.0  # measured 45 dB
    assert snr_db(streamed(context_frames=(10, 1)), ref) < 50.0  # measured 29 dB


def test_result_does_not_depend_on_block_or_piece_size(enhancer, takes):
    noisy = program(takes, 6, seed=3)[:, None]
    ref = upstream(enhancer.model, enhancer.df_state, noisy)
    for piece, block in [(1.0, 480), (2.3, 100_003), (10.0, 1)]:
        if block == 1:
            noisy_part, block = noisy[: SR // 2], 997  # many tiny blocks: keep it short
            expected = upstream(enhancer.model, enhancer.df_state, noisy_part)
        else:
            noisy_part, expected = noisy, ref
        stream = StreamEnhancer(enhancer, sample_rate=SR, channels=1, piece_seconds=piece)
        out = stream_through(stream, noisy_part, block)
        assert_matches(out, expected, f"{piece} s pieces")


def test_options_and_stereo_match_upstream(enhancer, takes):
    white, pink = takes
    stereo = np.stack([white[: 5 * SR - 333], pink[: 5 * SR - 333] * 0.5], axis=1)
    for options in [dict(pad=False), dict(atten_lim_db=12.0), dict(pad=False, atten_lim_db=6.0)]:
        ref = upstream(enhancer.model, enhancer.df_state, stereo, **options)
        stream = StreamEnhancer(
            enhancer.model, enhancer.df_state, sample_rate=SR, channels=2, piece_seconds=1.0,
            **options,
        )  # fmt: skip
        out = stream_through(stream, stereo, 12_345)
        # Upstream returns whole hops without delay compensation; the stream keeps the length.
        assert out.shape == stereo.shape
        assert_matches(out[: ref.shape[0]], ref, str(options))
        assert not out[ref.shape[0] :].any()


@pytest.mark.parametrize("rate,channels", [(44100, 2), (16000, 1)])
def test_other_rates_match_the_whole_file_path(enhancer, takes, rate, channels, tmp_path):
    from df.io import resample

    white, pink = takes
    x48 = torch.from_numpy(np.stack([white, pink])[:channels, : 7 * SR])
    noisy = resample(x48, SR, rate)[:, :-5].numpy().T  # an odd length
    src = tmp_path / "in.flac"
    sf.write(str(src), noisy, rate, subtype="PCM_24")
    noisy, _ = sf.read(str(src), dtype="float32", always_2d=True)
    whole = cli.enhance_file(src, tmp_path / "whole.flac", enhancer, whole_file=True)
    assert whole.frames == noisy.shape[0]
    piece = cli.enhance_file(src, tmp_path / "piece.flac", enhancer, piece_seconds=1.5)
    assert (piece.frames, piece.sample_rate, piece.channels) == (noisy.shape[0], rate, channels)
    info = sf.info(str(tmp_path / "piece.flac"))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (
        rate,
        channels,
        noisy.shape[0],
        "PCM_24",
    )
    a, _ = sf.read(str(tmp_path / "whole.flac"), dtype="float32", always_2d=True)
    b, _ = sf.read(str(tmp_path / "piece.flac"), dtype="float32", always_2d=True)
    if EXACT_DB >= 90:
        assert np.max(np.abs(a - b)) <= 2 / 2**23 + 1e-5  # 24-bit steps plus float rounding
    assert snr_db(b, a) >= EXACT_DB


def test_stream_resampler_equals_upstreams_resample():
    from df.io import resample

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 54_321, generator=gen) * 0.3
    for orig, new in [
        (48000, 44100),
        (44100, 48000),
        (16000, 48000),
        (48000, 8000),
        (22050, 48000),
    ]:
        whole = resample(x, orig, new)
        for block in (1000, 54_321, 4097):
            r = StreamResampler(orig, new)
            parts = [r.process(x[:, i : i + block]) for i in range(0, x.shape[1], block)]
            got = torch.cat(parts + [r.finish()], dim=-1)
            assert got.shape == whole.shape, (orig, new, block)
            assert torch.equal(got, whole), (orig, new, block)


COMMON_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 37800, 44100, 47952, 88200, 96000, 192000)


def test_stream_resampler_takes_torchaudios_kernel_for_common_rates_and_soxr_for_the_rest():
    for rate in COMMON_RATES:
        assert StreamResampler(rate, SR).uses_sinc_kernel, rate
        assert StreamResampler(SR, rate).uses_sinc_kernel, rate
    for rate in (22051, 44056, 47999):
        # torchaudio's kernel: 4.2 GB for 22,051 Hz, 9.2 GB for 47,999 Hz.
        assert streaming.sinc_kernel_values(rate, SR) > streaming.MAX_SINC_KERNEL_VALUES
        assert not StreamResampler(rate, SR).uses_sinc_kernel, rate
        assert not StreamResampler(SR, rate).uses_sinc_kernel, rate


@pytest.mark.parametrize("orig,new", [(22051, SR), (SR, 22051)])
def test_stream_resampler_soxr_path_is_blockwise_equal_and_keeps_torchaudios_length(orig, new):
    import soxr

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 20_001, generator=gen) * 0.3
    whole = torch.from_numpy(soxr.resample(x.numpy().T, orig, new, quality="HQ").T.copy())
    length = -(-x.shape[1] * new // orig)
    for block in (999, 20_001):
        r = StreamResampler(orig, new)
        parts = [r.process(x[:, i : i + block]) for i in range(0, x.shape[1], block)]
        got = torch.cat(parts + [r.finish()], dim=-1)
        assert got.shape == (2, length), block
        n = min(length, whole.shape[1])
        assert torch.allclose(got[:, :n], whole[:, :n], atol=1e-6), block


@pytest.mark.subprocess
def test_a_rate_sharing_no_factor_with_48k_enhances_in_bounded_memory(
    python_child, dfn3_model_dir, tmp_path
):
    # #13 item 4: 0.05 s at 22,051 Hz made torchaudio allocate a 4.2 GB kernel (4.7 GB peak).
    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak RSS is read from /proc/self/status (VmHWM), which this OS lacks")
    gen = np.random.default_rng(3)
    src = tmp_path / "odd_rate.wav"
    sf.write(str(src), (gen.standard_normal((1103, 1)) * 0.1).astype(np.float32), 22051)
    proc = python_child(
        f"""
        import json
        from df_mps.enhance import main
        codes = [
            main(["-m", {str(dfn3_model_dir)!r}, "-o", {str(tmp_path / "a")!r}, {str(src)!r}]),
            main(["-m", {str(dfn3_model_dir)!r}, "-o", {str(tmp_path / "b")!r}, "--whole-file",
                  {str(src)!r}]),
        ]
        status = open("/proc/self/status").read()
        hwm_kb = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1])
        print(json.dumps(dict(codes=codes, peak_gb=hwm_kb / 2**20)))
        """,
        timeout=120,  # before the fix, one thread spent many minutes on the 4.2 GB kernel
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0, 0], proc.stderr
    assert report["peak_gb"] < 2.0, report
    for out in ("a", "b"):
        info = sf.info(str(tmp_path / out / "odd_rate_DeepFilterNet3.wav"))
        assert (info.samplerate, info.frames) == (22051, 1103)


def test_enhance_blocks_generator(enhancer, takes):
    noisy = program(takes, 3, seed=5)[:, None]
    blocks = (noisy[i : i + 9999] for i in range(0, noisy.shape[0], 9999))
    out = np.concatenate(list(enhance_blocks(enhancer, None, blocks, sample_rate=SR)))
    ref = upstream(enhancer.model, enhancer.df_state, noisy)
    assert_matches(out, ref)
    with pytest.raises(TypeError, match="df_state"):
        StreamEnhancer(enhancer.model, sample_rate=SR, channels=1)


# -- files ---------------------------------------------------------------------------------------
def test_nan_in_the_middle_leaves_no_output(enhancer, takes, tmp_path):
    noisy = program(takes, 25)
    noisy[21 * SR + 7] = np.nan
    src = tmp_path / "nan.wav"
    sf.write(str(src), noisy, SR, subtype="FLOAT")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(BadAudioError, match=r"NaN or Inf sample\(s\) \(first at 21.00 s\)"):
        enhance_stream(enhancer, None, src, out_dir / "x.wav")
    assert os.listdir(out_dir) == []


def test_files_are_never_overwritten_by_accident(enhancer, takes, tmp_path):
    noisy = program(takes, 1)
    src = tmp_path / "in.wav"
    sf.write(str(src), noisy, SR)
    before = src.read_bytes()
    link = tmp_path / "link.wav"
    link.symlink_to(src)
    for same in (src, link):
        with pytest.raises(AudioFileError, match="input file itself"):
            enhance_stream(enhancer, None, src, same, overwrite=True)
    existing = tmp_path / "out.wav"
    existing.write_bytes(b"precious")
    with pytest.raises(AudioFileError, match="output exists"):
        enhance_stream(enhancer, None, src, existing)
    assert existing.read_bytes() == b"precious" and src.read_bytes() == before
    enhance_stream(enhancer, None, src, existing, overwrite=True)
    assert sf.info(str(existing)).frames == noisy.shape[0]
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros((0, 1), np.float32), SR)
    with pytest.raises(BadAudioError, match="no audio samples"):
        enhance_stream(enhancer, None, empty, tmp_path / "empty_out.wav")
    assert no_temp_files(tmp_path) and not (tmp_path / "empty_out.wav").exists()


# -- memory ----------------------------------------------------------------------------------------
@pytest.mark.subprocess
def test_peak_memory_does_not_grow_with_length(dfn3_model_dir, takes, tmp_path, python_child):
    """The CLI's peak RSS for 1 and 3 minutes. Whole-file, upstream's would grow ~1.1 GB."""
    peaks = {}
    for minutes in (1, 3):
        src = tmp_path / f"{minutes}min.wav"
        sf.write(str(src), program(takes, 60 * minutes, seed=minutes), SR, subtype="PCM_16")
        proc = python_child(
            f"""
            import json, resource
            from df_mps import enhance
            rc = enhance.main([{str(src)!r}, "-o", {str(tmp_path / "out")!r}, "-m",
                               {str(dfn3_model_dir)!r}, "--threads", "1", "--log-level", "none"])
            # VmHWM is this process's own peak; ru_maxrss survives exec() and can report the
            # size of the (large, forked) pytest process instead.
            with open("/proc/self/status") as status:
                hwm = [int(l.split()[1]) for l in status if l.startswith("VmHWM:")]
            kib = hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(json.dumps({{"rc": rc, "peak_mib": kib / 1024}}))
            """
        )
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        assert report["rc"] == 0
        peaks[minutes] = report["peak_mib"]
    print(f"peak RSS, MiB: {peaks}")
    assert abs(peaks[3] - peaks[1]) < 100, peaks
    assert peaks[3] < 1.5 * 1024, peaks


def test_left_context_must_fit_in_a_piece(enhancer):
    with pytest.raises(ValueError, match="left context"):
        StreamEnhancer(enhancer, sample_rate=SR, channels=1, piece_seconds=0.05)
