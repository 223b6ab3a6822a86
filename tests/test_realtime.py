"""df_mps.realtime: the pulsed model, hop by hop, equals upstream's offline enhance().

The reference everywhere is upstream's whole-signal ``df.enhance.enhance`` (through
``df_mps.enhance.Enhancer``, which resamples with ``df.io.resample`` at other rates) on the real
DeepFilterNet3 weights, computed once per case on 1-2 s of speech.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from df_mps.realtime import PulsedDfNet, RealtimeEnhancer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*resampling method name is being deprecated"),
]
SR = 48000
TOL = 1e-4  # the contract; measured: 3e-7


@pytest.fixture(autouse=True)
def eager_unless_asked(monkeypatch):
    """compile="auto" would start a background build of the compiled hop in every test that
    takes the default: the tests below ask for compiling where they test it."""
    monkeypatch.setenv("DF_MPS_REALTIME_COMPILE", "0")


@pytest.fixture(scope="module")
def speech(audio_dir):
    white, _ = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    pink, _ = sf.read(str(audio_dir / "noisy_pink.wav"), dtype="float32")
    # 1.5 s of each, from the middle of the takes (speech, not the lead-in)
    return white[2 * SR : 2 * SR + 3 * SR // 2], pink[3 * SR : 3 * SR + 3 * SR // 2]


def at_rate(speech, rate: int, channels: int) -> np.ndarray:
    """[T, C] float32 at ``rate`` (df.io.resample, as a caller's own audio would be)."""
    from df.io import resample

    x = torch.from_numpy(np.stack(speech[:channels]))
    if rate != SR:
        x = resample(x, SR, rate)
    return np.ascontiguousarray(x.numpy().T)


def offline(enhancer, audio: np.ndarray, rate: int, post_filter=False, atten_lim_db=None):
    """Upstream's enhance() of the whole signal, [T, C] -> [T, C]."""
    from df.enhance import enhance
    from df.io import resample

    model = enhancer.model
    saved = model.post_filter
    model.post_filter = post_filter
    try:
        x = torch.from_numpy(np.ascontiguousarray(audio.T))
        x = resample(x, rate, SR) if rate != SR else x
        y = enhance(model, enhancer.df_state, x, atten_lim_db=atten_lim_db)
        y = resample(y, SR, rate) if rate != SR else y
        length = audio.shape[0]  # resampling there and back can be a sample off
        y = torch.nn.functional.pad(y[..., :length], (0, max(0, length - y.shape[-1])))
        return y.numpy().T
    finally:
        model.post_filter = saved


def random_chunks(total: int, seed: int, largest: int):
    """Chunk lengths from 1 sample to ``largest``, log-uniform, seeded, covering ``total``."""
    rng = np.random.default_rng(seed)
    sizes, done = [], 0
    while done < total:
        n = int(np.exp(rng.uniform(0, np.log(largest))))
        sizes.append(n)
        done += n
    return sizes


def stream_through(rt: RealtimeEnhancer, audio: np.ndarray, sizes) -> np.ndarray:
    outs, i = [], 0
    for n in sizes:
        chunk = audio[i : i + n]
        out = rt.process(chunk)
        assert out.shape == chunk.shape  # as many frames back as given
        outs.append(out)
        i += n
    tail = rt.flush()
    assert tail.shape[0] == rt.latency_samples
    return np.concatenate(outs + [tail])[rt.latency_samples :]


# -- the pulsed model, layer-exact -----------------------------------------------------------------
@pytest.fixture(scope="module")
def live_model(enhancer):
    """DFN3 with every pathway active: the trained weights silence the deep-filter pathway
    convolution (df_convp's ReLU gives zeros); shifted batch-norm biases wake it, so the
    carried frames of every convolution are exercised."""
    model = copy.deepcopy(enhancer.model).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.bias.copy_(0.5 + 0.1 * torch.randn(module.bias.shape, generator=gen))
    return model


@pytest.mark.parametrize("post_filter", [False, True])
def test_pulsed_model_equals_the_models_forward(enhancer, live_model, speech, post_filter):
    from df.enhance import df_features

    audio = torch.from_numpy(np.stack(speech))  # two channels: the batch
    spec, erb_feat, spec_feat = df_features(audio, enhancer.df_state, 96, device="cpu")
    live_model.post_filter = post_filter
    try:
        with torch.no_grad():
            ref, _, lsnr_ref, _ = live_model(spec.clone(), erb_feat, spec_feat)
    finally:
        live_model.post_filter = False
    hook_out = []
    hook = live_model.df_dec.df_convp.register_forward_hook(lambda m, a, o: hook_out.append(o))
    with torch.no_grad():
        live_model(spec.clone(), erb_feat, spec_feat)
    hook.remove()
    assert hook_out[0].abs().max() > 0.1  # the pathway the trained weights silence is live

    pulsed = PulsedDfNet(live_model, post_filter=post_filter)
    pulsed.reset(2)
    frames, outs, lsnrs, i = spec.shape[2], [], [], 0
    rng = np.random.default_rng(1)
    with torch.inference_mode():
        while i < frames:
            n = int(rng.integers(1, 8))  # single hops and several at once
            out, lsnr = pulsed.step(
                spec[:, :, i : i + n], erb_feat[:, :, i : i + n], spec_feat[:, :, i : i + n]
            )
            if out is not None:
                outs.append(out)
                lsnrs.append(lsnr)
            i += n
        out, lsnr = pulsed.finish()
    outs.append(out)
    lsnrs.append(lsnr)
    got = torch.cat(outs, dim=2)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(lsnrs, dim=1), lsnr_ref, atol=1e-4, rtol=1e-5)


# -- the stream against offline enhance() --------------------------------------------------------
CASES = [
    # rate, channels, post_filter, atten_lim_db
    (48000, 1, False, None),
    (48000, 2, True, None),
    (48000, 1, False, 12.0),
    (16000, 1, False, None),
    (16000, 2, True, 6.0),
    (44100, 1, True, None),
    (44100, 2, False, 20.0),
]


@pytest.mark.parametrize("rate, channels, post_filter, atten_lim_db", CASES)
def test_any_chunking_equals_offline_enhance(
    enhancer, speech, rate, channels, post_filter, atten_lim_db
):
    audio = at_rate(speech, rate, channels)
    ref = offline(enhancer, audio, rate, post_filter, atten_lim_db)
    rt = RealtimeEnhancer(
        enhancer,
        sample_rate=rate,
        channels=channels,
        post_filter=post_filter,
        atten_lim_db=atten_lim_db,
    )
    for seed in (0, 1):  # two random chunkings, 1 sample to 2 s; flush() starts a new stream
        out = stream_through(rt, audio, random_chunks(audio.shape[0], seed, 2 * rate))
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=TOL, rtol=0, err_msg=f"seed {seed}")


def test_tiny_chunks_and_one_hop_chunks(enhancer, speech):
    audio = at_rate(speech, SR, 1)[: SR // 3]
    ref = offline(enhancer, audio, SR)
    rt = RealtimeEnhancer(enhancer)
    rng = np.random.default_rng(2)
    tiny = [int(n) for n in rng.integers(1, 40, size=audio.shape[0])]
    np.testing.assert_allclose(stream_through(rt, audio, tiny), ref, atol=TOL, rtol=0)
    hops = [480] * (audio.shape[0] // 480 + 1)
    np.testing.assert_allclose(stream_through(rt, audio, hops), ref, atol=TOL, rtol=0)


def test_one_dimensional_mono_comes_back_one_dimensional(enhancer, speech):
    rt = RealtimeEnhancer(enhancer)
    audio = at_rate(speech, SR, 1)[:4800, 0]
    out = rt.process(audio)
    assert out.shape == (4800,) and out.dtype == np.float32
    assert not out[: rt.latency_samples].any()  # the delay: silence first


def test_latency(enhancer):
    # 48 kHz: STFT 480 + lookahead 2 x 480 + up to one hop of a chunk = 1920 (40 ms)
    assert RealtimeEnhancer(enhancer).latency_samples == 1920
    for rate in (16000, 44100, 8000):
        latency = RealtimeEnhancer(enhancer, sample_rate=rate).latency_samples
        assert 0.040 <= latency / rate < 0.046, rate  # plus the resamplers' few samples


def test_lsnr_per_hop(enhancer, speech):
    from df.enhance import df_features

    audio = at_rate(speech, SR, 1)[: SR // 2]
    rt = RealtimeEnhancer(enhancer)
    values = []
    for i in range(0, audio.shape[0], 480):
        rt.process(audio[i : i + 480])
        assert rt.lsnr.shape[1] == 1 and rt.lsnr.shape[0] <= 1
        values.append(rt.lsnr)
    rt.flush()
    values.append(rt.lsnr)
    got = np.concatenate(values)[:, 0]
    padded = torch.nn.functional.pad(torch.from_numpy(audio.T), (0, 960))
    spec, erb_feat, spec_feat = df_features(padded, enhancer.df_state, 96, device="cpu")
    with torch.no_grad():
        lsnr = enhancer.model.eval()(spec.clone(), erb_feat, spec_feat)[2][0, :, 0].numpy()
    assert got.shape == lsnr.shape
    np.testing.assert_allclose(got, lsnr, atol=1e-3)


def test_many_streams_in_one_batch_equal_each_alone(enhancer, speech):
    white, pink = at_rate(speech, SR, 2)[:SR, 0], at_rate(speech, SR, 2)[:SR, 1]
    streams = np.stack([np.stack([white, pink], 1), np.stack([pink * 0.5, white], 1)])
    multi = RealtimeEnhancer(enhancer, channels=2, streams=2)
    outs = [multi.process(streams[:, i : i + 1000]) for i in range(0, SR, 1000)]
    assert outs[0].shape == (2, 1000, 2)
    got = np.concatenate(outs + [multi.flush()], axis=1)[:, multi.latency_samples :]
    assert multi.lsnr.shape[0] == 2
    for s in range(2):
        ref = offline(enhancer, streams[s], SR)
        np.testing.assert_allclose(got[s], ref, atol=TOL, rtol=0, err_msg=f"stream {s}")


def test_bad_input_is_refused_and_the_state_stays_valid(enhancer, speech):
    audio = at_rate(speech, SR, 2)[: SR // 2]
    ref = offline(enhancer, audio, SR)
    rt = RealtimeEnhancer(enhancer, channels=2)
    outs = [rt.process(audio[:7000])]
    bad = audio[7000:9000].copy()
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf") as exc:
        rt.process(bad)
    assert "\n" not in str(exc.value)
    bad[5, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        rt.process(bad)
    with pytest.raises(ValueError, match=r"expected float32 samples, got dtype int16"):
        rt.process((audio[7000:9000] * 1000).astype(np.int16))
    with pytest.raises(ValueError, match=r"expected a chunk \[frames, 2\], got shape \(2000, 1\)"):
        rt.process(audio[7000:9000, :1])
    with pytest.raises(ValueError, match="expected a chunk"):
        rt.process(audio[7000:9000, 0])  # 1-D is for mono streams only
    outs.append(rt.process(audio[7000:]))
    got = np.concatenate(outs + [rt.flush()])[rt.latency_samples :]
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="sample_rate"):
        RealtimeEnhancer(enhancer, sample_rate=0)
    with pytest.raises(ValueError, match="channels"):
        RealtimeEnhancer(enhancer, channels=0)


def test_reset_starts_a_new_stream(enhancer, speech):
    audio = at_rate(speech, 16000, 1)[:8000]
    rt = RealtimeEnhancer(enhancer, sample_rate=16000)
    first = np.concatenate([rt.process(audio[:3000]), rt.process(audio[3000:])])
    rt.reset()
    again = np.concatenate([rt.process(audio[:5000]), rt.process(audio[5000:])])
    np.testing.assert_allclose(first, again, atol=1e-6, rtol=0)  # other chunks: rounding only


def test_model_directory_and_default_model(dfn3_model_dir, enhancer, speech):
    audio = at_rate(speech, SR, 1)[:4800]
    by_dir = RealtimeEnhancer(str(dfn3_model_dir)).process(audio)
    by_enhancer = RealtimeEnhancer(enhancer).process(audio)
    np.testing.assert_array_equal(by_dir, by_enhancer)


# -- the command line ----------------------------------------------------------------------------
def run_stream(args, data: bytes, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DF_MPS_REALTIME_COMPILE": "0"}
    return subprocess.run(
        [sys.executable, "-m", "df_mps.realtime", *args],
        input=data,
        capture_output=True,
        env=env,
        timeout=300,
        **kwargs,
    )


def run_bounded(argv, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run in a new session whose whole process group is killed at the timeout
    (run's own kill stops only the shell, and its grandchildren, holding the pipes, would
    keep the test waiting), failing the test with what the command had said."""
    import signal

    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{argv} ran past {timeout} s; stderr: {err[-2000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def processes_naming(text) -> list:
    """The live (not zombie) processes whose command line names ``text``: ``ps`` as Linux
    and macOS both have it."""
    out = subprocess.run(
        ["ps", "ax", "-ww", "-o", "pid=,stat=,command="], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for line in out.splitlines():
        pid, stat, command = (line.split(None, 2) + ["", ""])[:3]
        if str(text) in command and not stat.startswith("Z") and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def kill_processes_naming(text) -> None:
    """Stop the process groups of the processes that name ``text`` (a build left running)."""
    import signal

    for pid in processes_naming(text):
        with contextlib.suppress(OSError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)


@pytest.mark.subprocess
def test_cli_round_trips_pcm_like_the_library(dfn3_model_dir, enhancer, speech):
    audio = at_rate(speech, 16000, 2)[:12000]
    rt = RealtimeEnhancer(enhancer, sample_rate=16000, channels=2)
    expected = np.concatenate([rt.process(audio), rt.flush()])
    args = ["--rate", "16000", "--channels", "2", "-m", str(dfn3_model_dir)]
    proc = run_stream(args, audio.astype("<f4").tobytes())
    assert proc.returncode == 0, proc.stderr.decode()
    out = np.frombuffer(proc.stdout, "<f4").reshape(-1, 2)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)  # other chunks: rounding

    pcm = np.clip(np.rint(audio * 32768), -32768, 32767).astype("<i2")
    proc = run_stream([*args, "--format", "s16le"], pcm.tobytes())
    assert proc.returncode == 0, proc.stderr.decode()
    out16 = np.frombuffer(proc.stdout, "<i2").reshape(-1, 2)
    rt.reset()
    lib = rt.process(pcm.astype(np.float32) / 32768)
    lib = np.concatenate([lib, rt.flush()])
    expected16 = np.clip(np.rint(lib * 32768), -32768, 32767).astype("<i2")
    assert np.abs(out16.astype(int) - expected16).max() <= 1


@pytest.mark.subprocess
def test_cli_closed_pipe_and_usage_errors(dfn3_model_dir, tmp_path):
    # A reader that goes away: exit 0, nothing on stderr.
    noise = (np.random.default_rng(0).standard_normal(48000 * 2) * 0.1).astype("<f4")
    # With the default compile="auto" in an empty cache: the hop's build runs in the
    # background and goes on after the command line's exit, to leave the package for the
    # next start (stopped here: test_a_build_outlives_a_killed_parent builds one to the end).
    cache = tmp_path / "cache"
    script = (
        f"env -u DF_MPS_REALTIME_COMPILE DF_MPS_CACHE_DIR={cache} "
        f"{sys.executable} -m df_mps.realtime -m {dfn3_model_dir} --block 4800 "
        f"< {tmp_path / 'in.raw'} | head -c 1000 > /dev/null; echo ${{PIPESTATUS[0]}}"
    )
    (tmp_path / "in.raw").write_bytes(noise.tobytes())
    proc = run_bounded(["bash", "-c", script], timeout=300)
    assert proc.stdout.strip() == "0", proc.stderr
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr
    from df_mps import hopgraph

    if hopgraph._compiler() is not None:
        assert "compiling the real-time hop" in proc.stderr and "in the background" in proc.stderr
        try:
            assert processes_naming(cache), "no build left running after the command line"
        finally:
            kill_processes_naming(cache)

    for bad in (["--format", "u8"], ["--rate", "0"]):
        proc = run_stream(bad, b"")
        assert proc.returncode == 2, bad
        assert b"Traceback" not in proc.stderr
    proc = run_stream(["-m", str(tmp_path / "missing")], b"")
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert len(proc.stderr.decode().strip().splitlines()) == 1


@pytest.mark.parametrize("rate", [48000, 16000])
def test_short_streams_and_empty_chunks(enhancer, speech, rate):
    rt = RealtimeEnhancer(enhancer, sample_rate=rate)
    audio = at_rate(speech, rate, 1)[:, 0]
    for n in (1, 479, 481, 2500):  # shorter than a hop, around one, a few
        x = audio[:n]
        ref = offline(enhancer, x[:, None], rate)[:, 0]
        parts = [rt.process(x[: n // 2]), rt.process(x[:0]), rt.process(x[n // 2 :])]
        tail = rt.flush()
        assert tail.shape == (rt.latency_samples,)  # 1-D in, 1-D out, flush() too
        out = np.concatenate(parts + [tail])[rt.latency_samples :]
        np.testing.assert_allclose(out, ref, atol=TOL, rtol=0, err_msg=f"{n} samples")


@pytest.mark.parametrize("rate, channels, post_filter", [(48000, 2, True), (16000, 1, False)])
def test_torch_dsp_path_equals_offline_enhance(
    enhancer, speech, monkeypatch, rate, channels, post_filter
):
    # Many rows (and Python >= 3.12, where DeepFilterLib is absent) take df_mps.dsp's STFT
    # and features instead of libdf's: the same result.
    from df_mps import realtime

    monkeypatch.setattr(realtime, "LIBDF_MAX_ROWS", 0)
    audio = at_rate(speech, rate, channels)
    ref = offline(enhancer, audio, rate, post_filter)
    rt = RealtimeEnhancer(enhancer, sample_rate=rate, channels=channels, post_filter=post_filter)
    assert rt._model.libdf is None
    out = stream_through(rt, audio, random_chunks(audio.shape[0], 5, 2 * rate))
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


# -- the compiled hop (df_mps.hopgraph) ------------------------------------------------------------
def needs_compiler():
    from df_mps import hopgraph

    if hopgraph._compiler() is None:
        pytest.skip("no C++ compiler: the compiled hop can't be built here")


def skip_where_packages_fail_their_trial(note: str) -> None:
    """Where this PyTorch's AOTInductor packages crash or fail their loader (seen: PyTorch
    2.11 on the H200 machine, a segmentation fault), no compiled hop can be had here: the
    stream runs eager, as test_a_package_that_fails_its_trial_process_runs_eager checks, and
    what needs a working package is skipped, saying why."""
    if "failed in a trial process" in note:
        pytest.skip(f"this PyTorch's compiled hop fails its trial here: {note}")


@pytest.fixture(scope="module")
def module_hop_cache(tmp_path_factory):
    """One df-mps cache for this module's real builds of the compiled hop (40-70 s each on
    2 cores): two packages, one row (built in the background) and two (built by
    compile=True), each built once per run and kept apart from the user's cache. (One more
    build, test_a_build_outlives_a_killed_parent_only_into_the_cache's, is in its own.)"""
    return tmp_path_factory.mktemp("hop-cache")


@pytest.fixture
def hop_cache(module_hop_cache, monkeypatch):
    monkeypatch.setenv("DF_MPS_CACHE_DIR", str(module_hop_cache))
    monkeypatch.delenv("DF_MPS_REALTIME_COMPILE")
    return module_hop_cache / "realtime"


def test_inverse_fft_through_forward_ffts():
    from df_mps.hopgraph import _irfft

    gen = torch.Generator().manual_seed(0)
    for n in (960, 16, 15):
        ri = torch.randn(3, n // 2 + 1, 2, generator=gen)  # DC and Nyquist with imaginary parts
        keep = torch.ones(n // 2 + 1)
        keep[0] = 0.0
        if n % 2 == 0:
            keep[-1] = 0.0
        ref = torch.fft.irfft(torch.view_as_complex(ri), n=n, norm="forward")
        torch.testing.assert_close(_irfft(ri, n, keep), ref, atol=1e-5 * n**0.5, rtol=0)


@pytest.mark.parametrize("channels, post_filter, atten_lim_db", [(2, True, 9.0)])
def test_compiled_hop_equals_eager_hop_by_hop(
    enhancer, speech, channels, post_filter, atten_lim_db, hop_cache
):
    needs_compiler()
    options = dict(channels=channels, post_filter=post_filter, atten_lim_db=atten_lim_db)
    compiled = RealtimeEnhancer(enhancer, compile=True, **options)
    skip_where_packages_fail_their_trial(compiled.compile_note)
    eager = RealtimeEnhancer(enhancer, compile=False, **options)
    assert compiled.compiled and not eager.compiled, compiled.compile_note
    assert compiled.compile_seconds > 0
    audio = at_rate(speech, SR, channels)
    for size in (480, 4 * 480, 1000):  # one hop a call, four, and hops split across calls
        for i in range(0, audio.shape[0], size):
            chunk = audio[i : i + size]
            np.testing.assert_allclose(
                compiled.process(chunk), eager.process(chunk), atol=1e-5, rtol=0, err_msg=str(i)
            )
            np.testing.assert_allclose(compiled.lsnr, eager.lsnr, atol=1e-3, rtol=0)
        np.testing.assert_allclose(compiled.flush(), eager.flush(), atol=1e-5, rtol=0)


def test_auto_builds_in_the_background_and_switches_mid_stream(enhancer, speech, hop_cache):
    """compile="auto" with nothing cached: the stream runs eager from its first chunk while a
    child process builds the hop, takes the compiled hop up between two chunks, and its
    output over the whole stream (eager hops, then compiled ones) equals an eager stream's.
    The build leaves only its package and its trial's pass marker, and the next stream of
    the same shape loads it from the cache at once."""
    needs_compiler()
    from df_mps import hopgraph
    from df_mps._log import logger

    # A stale one-row package in its place (it passed its trial once, but doesn't load
    # here): rebuilt, not taken for built.
    path = one_row_hop(enhancer)[2]
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f"{path.name}*"):
        old.unlink()
    path.write_bytes(b"not a package")
    hopgraph._markers(path)[0].touch()
    messages = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    try:
        rt = RealtimeEnhancer(enhancer)
    finally:
        logger.remove(sink)
    build = rt._build
    try:
        check_the_background_build(enhancer, speech, path, rt, build, messages)
    finally:
        for running in list(hopgraph._builds.values()):
            running.cancel()


def one_row_hop(enhancer):
    """(graph, example, where the cache holds its package) of the one-row hop at this
    process's thread count."""
    from df_mps import hopgraph
    from df_mps.realtime import _ModelRateStream

    rt = RealtimeEnhancer(enhancer, compile=False)
    stream = _ModelRateStream(rt._pulsed, enhancer.df_state, 1, rt.device, None, True)
    graph, example = hopgraph.HopGraph(stream), stream.example_hop()
    return graph, example, hopgraph._package_path(graph, example)


def check_the_background_build(enhancer, speech, path, rt, build, messages) -> None:
    from df_mps import hopgraph

    assert not rt.compiled and build is not None, rt.compile_note
    assert rt.compile_note == "being built in the background; eager until it is ready"
    assert len(messages) == 1, messages
    quoted = (
        "df_mps: compiling the real-time hop for this model and channel count in the "
        "background, once (about a minute; cached in ...); eager until then"
    )
    head, tail = quoted.split("...")
    assert messages[0].startswith(head) and messages[0].endswith(tail), messages[0]
    doc = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text()
    assert f"`{quoted}`" in doc

    eager = RealtimeEnhancer(enhancer, compile=False)
    audio = at_rate(speech, SR, 1)
    sizes = random_chunks(audio.shape[0] // 2, seed=1, largest=2000)
    starts = np.cumsum([0, *sizes[:-1]])
    got = [rt.process(audio[i : i + n]) for i, n in zip(starts, sizes)]
    expected = [eager.process(audio[i : i + n]) for i, n in zip(starts, sizes)]
    assert not rt.compiled  # a second of audio streamed while the build runs
    if not rt.wait_for_compile(timeout=600):
        skip_where_packages_fail_their_trial(rt.compile_note)
    assert rt.compiled, rt.compile_note
    assert rt.compile_note.startswith("built in the background in ")
    assert rt.compile_seconds > 0 and build.proc.returncode == 0
    rest = audio[sum(sizes) :]
    for i in range(0, rest.shape[0], 480):
        got.append(rt.process(rest[i : i + 480]))
        expected.append(eager.process(rest[i : i + 480]))
        np.testing.assert_allclose(rt.lsnr, eager.lsnr, atol=1e-3, rtol=0)
    got.append(rt.flush())
    expected.append(eager.flush())
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(expected), atol=1e-5, rtol=0)
    assert rt._model.hop_fn is not None  # the later hops ran compiled

    # the package, its pass marker and its build lock; no export or temporary file left
    mine = {p.name for p in path.parent.iterdir() if path.stem in p.name}
    assert mine == {path.name, f"{path.name}.ok", f"{path.name}.lock"}, mine
    assert not hopgraph._builds and not hopgraph._private
    again = RealtimeEnhancer(enhancer)
    assert again.compiled and again.compile_note == "loaded from the cache"


def stand_in_build(monkeypatch, code: str) -> None:
    """The background build's child runs ``code`` instead of building."""
    from df_mps import hopgraph

    monkeypatch.setattr(hopgraph, "_build_argv", lambda *args: [sys.executable, "-c", code])


@pytest.mark.parametrize(
    "child, reason",
    [
        (
            "import sys; print('AOTInductor failed: boom', file=sys.stderr); sys.exit(3)",
            r"^AOTInductor failed: boom$",
        ),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", r"^the build process failed"),
        ("pass", r"^the build process failed \(exit status 0\)"),  # exits 0, builds nothing
    ],
)
def test_a_failed_background_build_leaves_the_stream_eager(
    enhancer, speech, monkeypatch, tmp_path, child, reason
):
    from df_mps._log import logger

    needs_compiler()
    monkeypatch.delenv("DF_MPS_REALTIME_COMPILE")
    monkeypatch.setenv("DF_MPS_CACHE_DIR", str(tmp_path))
    stand_in_build(monkeypatch, child)
    rt = RealtimeEnhancer(enhancer)
    assert rt._build is not None and rt._build.wait(60)
    messages = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    try:
        audio = at_rate(speech, SR, 1)[: SR // 2]
        out = stream_through(rt, audio, [480] * (audio.shape[0] // 480 + 1))
    finally:
        logger.remove(sink)
    assert not rt.compiled and rt._build is None
    assert re.search(reason, rt.compile_note), rt.compile_note
    assert messages == [f"df_mps: real-time hop not compiled ({rt.compile_note}); running eager"]
    np.testing.assert_allclose(out, offline(enhancer, audio, SR), atol=TOL, rtol=0)
    assert not list((tmp_path / "realtime").iterdir())  # neither its export nor a package
    # stream_through's flush() ended that stream: the next runs as compile=False would
    assert rt._model.libdf is not None and rt._model.hop_fn is None


def test_streams_of_one_shape_share_one_background_build(enhancer, monkeypatch, tmp_path):
    from df_mps import hopgraph

    needs_compiler()
    monkeypatch.delenv("DF_MPS_REALTIME_COMPILE")
    monkeypatch.setenv("DF_MPS_CACHE_DIR", str(tmp_path))
    stand_in_build(monkeypatch, "import time; time.sleep(60)")
    first, second = RealtimeEnhancer(enhancer), RealtimeEnhancer(enhancer)
    try:
        assert first._build is second._build and first._build.shared
        assert RealtimeEnhancer(enhancer, channels=2)._build is not first._build
    finally:
        for build in list(hopgraph._builds.values()):
            build.cancel()
    assert not hopgraph._builds


@pytest.mark.parametrize("outcome", ["built", "failed"])
def test_a_build_under_way_elsewhere_is_waited_for_not_repeated(
    enhancer, monkeypatch, tmp_path, outcome
):
    """Where another process holds the package's build lock, a new stream starts no build
    of its own (no second child queued behind the first): it waits for that build and loads
    its package, or runs on eager where it fails."""
    import fcntl

    from df_mps import hopgraph
    from df_mps._log import logger

    needs_compiler()
    monkeypatch.setattr(hopgraph, "package_dir", lambda: tmp_path)
    graph, example, path = one_row_hop(enhancer)
    other = os.open(hopgraph._lock_file(path), os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)  # "another process" building it
    messages = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    try:
        runner, build = hopgraph.cached_hop_or_build(graph, example)
        logger.remove(sink)
        assert runner is None and build.proc is None and not build.wait(0.5)
        doc = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text()
        assert len(messages) == 1 and f"`{messages[0]}`" in doc, messages
        assert not processes_naming(tmp_path)
        if outcome == "built":
            path.write_bytes(b"package")
            hopgraph._markers(path)[0].touch()
            monkeypatch.setattr(hopgraph, "_load", lambda p: ("runner of", p))
    finally:
        os.close(other)  # that build ends
    assert build.wait(10)
    if outcome == "built":
        assert build.poll() == ("runner of", path)
    else:
        with pytest.raises(hopgraph.CompileUnavailable, match="another process's build"):
            build.poll()
    assert not hopgraph._builds


def test_a_private_background_build_is_cancelled_at_exit_and_leaves_nothing(
    enhancer, monkeypatch, tmp_path
):
    """Where df-mps's cache can't be written, the build goes to a private directory, of no
    use after this process: the interpreter's exit (here its atexit function) stops it, the
    child and what it started, and removes the directory."""
    from df_mps import hopgraph

    needs_compiler()
    monkeypatch.delenv("DF_MPS_REALTIME_COMPILE")
    (tmp_path / "file").write_bytes(b"")
    monkeypatch.setenv("DF_MPS_CACHE_DIR", str(tmp_path / "file" / "cache"))  # can't be made
    marker = f"df-mps-stand-in-{os.getpid()}"
    stand_in_build(
        monkeypatch,
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', '{marker}'])\n"
        "time.sleep(120)\n",
    )
    rt = RealtimeEnhancer(enhancer)
    build = rt._build
    assert build is not None and not build.shared and build.folder.is_dir()
    assert hopgraph._private == {build} and not hopgraph._builds
    for _ in range(100):  # the grandchild started
        if processes_naming(marker):
            break
        build.wait(0.1)
    assert processes_naming(marker)
    hopgraph._cancel_private_builds()
    for _ in range(100):  # SIGKILL is delivered, not awaited
        if not processes_naming(marker):
            break
        build.wait(0.1)
    assert build.proc.returncode is not None and not processes_naming(marker)
    assert not hopgraph._private and not build.folder.exists()
    rt.process(np.zeros(480, np.float32))
    assert not rt.compiled and rt.compile_note == "the background build was cancelled"


@pytest.mark.subprocess
@pytest.mark.parametrize("where", ["cache", "private"])
def test_a_build_outlives_a_killed_parent_only_into_the_cache(dfn3_model_dir, tmp_path, where):
    """A caller killed outright (no atexit) while its build runs: a build into df-mps's cache
    goes on to the end (the real build, about a minute) and leaves the package, its pass
    marker and its lock; a private one notices within a second or two, stops its process
    group and removes its files."""
    import time

    needs_compiler()
    cache = tmp_path / "cache"
    if where == "private":
        (tmp_path / "file").write_bytes(b"")
        cache = tmp_path / "file" / "cache"
    code = (
        "import os, sys\n"
        "from df_mps.realtime import RealtimeEnhancer\n"
        f"rt = RealtimeEnhancer({str(dfn3_model_dir)!r})\n"
        "print(rt._build.proc.pid, rt._build.folder, flush=True)\n"
        "rt._build.wait(3)\n"  # into the build
        "os.kill(os.getpid(), 9)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DF_MPS_REALTIME_COMPILE"}
    env["DF_MPS_CACHE_DIR"] = str(cache)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == -9, proc.stderr
    child, folder = proc.stdout.split()
    folder = Path(folder)
    deadline = time.monotonic() + (600 if where == "cache" else 30)
    try:
        if where == "cache":
            assert processes_naming(folder), "the build stopped with its parent"
        while processes_naming(folder) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not processes_naming(folder), f"build child {child} still running"
    finally:
        kill_processes_naming(folder)
    if where == "private":
        assert not folder.exists()
        return
    for failed in folder.glob("hop-*.pt2.failed"):
        skip_where_packages_fail_their_trial(failed.read_text())
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 3 and names[0].startswith("hop-"), names
    assert names[1:] == [names[0] + ".lock", names[0] + ".ok"], names


def test_compile_is_never_required(enhancer, speech, monkeypatch, tmp_path):
    from df_mps import hopgraph
    from df_mps._log import logger

    monkeypatch.setenv("DF_MPS_CACHE_DIR", str(tmp_path))  # nothing cached
    monkeypatch.delenv("DF_MPS_REALTIME_COMPILE")
    monkeypatch.setattr(hopgraph, "_compiler", lambda: None)
    messages = []
    sink = logger.add(lambda m: messages.append(m.record), level="DEBUG")
    try:
        auto = RealtimeEnhancer(enhancer)  # compile="auto": quietly eager
        forced = RealtimeEnhancer(enhancer, compile=True)  # asked for: one warning, eager
    finally:
        logger.remove(sink)
    assert not auto.compiled and not forced.compiled
    assert "no C++ compiler" in forced.compile_note
    assert auto._model.libdf is not None  # eager as before: libdf's features
    warnings = [r["message"] for r in messages if r["level"].name == "WARNING"]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0], warnings
    assert "\n" not in warnings[0]
    # as docs/troubleshooting.md quotes it
    assert warnings[0].startswith("df_mps: real-time hop not compiled (")
    assert warnings[0].endswith("); running eager")
    doc = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text()
    assert "`df_mps: real-time hop not compiled (...); running eager`" in doc
    audio = at_rate(speech, SR, 1)[: SR // 2]
    np.testing.assert_allclose(
        stream_through(forced, audio, [480] * 50), offline(enhancer, audio, SR), atol=TOL, rtol=0
    )


def test_a_failed_build_is_not_retried_at_every_start(enhancer, monkeypatch, tmp_path):
    """An AOTInductor build that fails is remembered beside the package: compile="auto"
    runs eager at once for a day, saying why, instead of failing the same build in the
    background at every start; then it tries again, and a build that succeeds forgets it."""
    import time

    from df_mps import hopgraph

    needs_compiler()
    monkeypatch.delenv("DF_MPS_REALTIME_COMPILE")
    monkeypatch.setattr(hopgraph, "package_dir", lambda: tmp_path)
    graph, example, path = one_row_hop(enhancer)

    def failing_build(inductor, exported, tmp):
        raise hopgraph.CompileUnavailable("AOTInductor failed: boom")

    monkeypatch.setattr(hopgraph, "_build", failing_build)
    with pytest.raises(hopgraph.CompileUnavailable, match="boom"):
        hopgraph._install(None, None, path, example)
    marker = hopgraph._build_failed_marker(path)
    assert marker.read_text().strip() == "AOTInductor failed: boom" and not path.exists()
    marker.unlink()

    def out_of_room(inductor, exported, tmp):  # as _build says it
        failure = hopgraph.CompileUnavailable("AOTInductor failed: No space left on device")
        failure.transient = True
        raise failure

    monkeypatch.setattr(hopgraph, "_build", out_of_room)
    with pytest.raises(hopgraph.CompileUnavailable, match="No space left"):
        hopgraph._install(None, None, path, example)
    assert not marker.exists()  # the next start tries again
    monkeypatch.setattr(hopgraph, "_build", failing_build)
    with pytest.raises(hopgraph.CompileUnavailable, match="boom"):
        hopgraph._install(None, None, path, example)
    assert marker.is_file()

    rt = RealtimeEnhancer(enhancer)
    assert not rt.compiled and rt._build is None
    assert rt.compile_note == (
        f"AOTInductor failed: boom (an earlier start's build; tried again a day after, or "
        f"delete {marker})"
    )
    stale = time.time() - (hopgraph.BUILD_RETRY_DAYS + 1) * 86400
    os.utime(marker, (stale, stale))
    stand_in_build(monkeypatch, "import time; time.sleep(60)")
    rt = RealtimeEnhancer(enhancer)
    assert rt._build is not None, rt.compile_note
    rt._build.cancel()

    def good_build(inductor, exported, tmp):
        tmp.write_bytes(b"package")
        return tmp

    monkeypatch.setattr(hopgraph, "_build", good_build)
    monkeypatch.setattr(hopgraph, "_check_in_child", lambda *args, **kwargs: None)
    hopgraph._install(None, None, path, example)
    assert path.read_bytes() == b"package" and hopgraph._markers(path)[0].is_file()
    assert not marker.exists()


@pytest.mark.parametrize(
    "platform, apple_clang, omp, expected",
    [
        ("darwin", True, None, "Apple clang has no OpenMP here"),
        ("darwin", True, "homebrew", None),
        ("darwin", True, "OMP_PREFIX", None),
        ("darwin", True, "conda", None),
        ("darwin", False, None, None),  # another clang++ (LLVM's, with its OpenMP)
        ("linux", True, None, None),
        ("darwin", "no such function", None, None),  # another PyTorch: the build tries
    ],
)
def test_apple_clang_without_openmp_is_known_before_any_build(
    monkeypatch, tmp_path, platform, apple_clang, omp, expected
):
    """On macOS, Apple clang has no OpenMP, and inductor's build fails without one found
    (Homebrew's libomp, conda's llvm-openmp, $OMP_PREFIX): compile="auto" then runs eager
    from the start, saying why in compile_note, instead of a failing build at every start."""
    from torch._inductor import cpp_builder

    from df_mps import hopgraph

    monkeypatch.setattr(hopgraph.sys, "platform", platform)
    monkeypatch.delenv("OMP_PREFIX", raising=False)
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    monkeypatch.delenv("CPATH", raising=False)
    monkeypatch.delenv("CPLUS_INCLUDE_PATH", raising=False)
    monkeypatch.delenv("C_INCLUDE_PATH", raising=False)
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "clang++")
    monkeypatch.setattr(hopgraph.os.path, "exists", _exists_but(Path("/usr/local/include")))
    if apple_clang == "no such function":
        monkeypatch.delattr(cpp_builder, "_is_apple_clang")
    else:
        monkeypatch.setattr(cpp_builder, "_is_apple_clang", lambda cxx: apple_clang)
    monkeypatch.setattr(cpp_builder, "homebrew_libomp", lambda: (omp == "homebrew", "/opt/x"))
    monkeypatch.setattr(cpp_builder, "is_conda_llvm_openmp_installed", lambda: omp == "conda")
    if omp == "OMP_PREFIX":
        (tmp_path / "include").mkdir()
        (tmp_path / "include" / "omp.h").write_text("")
        monkeypatch.setenv("OMP_PREFIX", str(tmp_path))
    if omp == "conda":
        monkeypatch.setenv("CONDA_PREFIX", str(tmp_path))
    why = hopgraph._no_openmp("clang++")
    assert why == (
        None if expected is None else f"{expected} (brew install libomp, or set OMP_PREFIX)"
    )
    if expected is not None and hopgraph._compiler() is not None:
        with pytest.raises(hopgraph.CompileUnavailable, match="Apple clang has no OpenMP"):
            hopgraph._inductor_for_auto()  # "auto" starts no build
        hopgraph._inductor()  # compile=True still tries (an omp.h may be where we didn't look)
        # an omp.h on the compiler's include path from the environment
        (tmp_path / "inc").mkdir(exist_ok=True)
        (tmp_path / "inc" / "omp.h").write_text("")
        monkeypatch.setenv("CPATH", str(tmp_path / "inc"))
        assert hopgraph._no_openmp("clang++") is None


@pytest.mark.parametrize(
    "error, transient",
    [
        (RuntimeError("C++ compile error\nomp.h: No such file"), False),
        (OSError(28, "No space left on device"), True),
        (MemoryError(), True),
        (RuntimeError("c++: fatal error: Killed signal terminated program cc1plus"), True),
    ],
)
def test_a_build_that_failed_for_want_of_room_is_not_remembered(tmp_path, error, transient):
    from types import SimpleNamespace

    from df_mps import hopgraph

    def compile_and_package(*args, **kwargs):
        raise error

    inductor = SimpleNamespace(aoti_compile_and_package=compile_and_package)
    with pytest.raises(hopgraph.CompileUnavailable, match="^AOTInductor failed") as info:
        hopgraph._build(inductor, None, tmp_path / "x.pt2")
    assert info.value.transient is transient


def _exists_but(hidden: Path):
    """os.path.exists, with nothing under ``hidden`` (this machine's own /usr/local)."""
    real = os.path.exists

    return lambda path: False if str(path).startswith(str(hidden)) else real(path)


def test_compile_choice(enhancer, monkeypatch):
    monkeypatch.setenv("DF_MPS_REALTIME_COMPILE", "0")
    rt = RealtimeEnhancer(enhancer)
    assert not rt.compiled and rt.compile_note == "compile=False"
    with pytest.raises(ValueError, match="compile must be"):
        RealtimeEnhancer(enhancer, compile="sometimes")
    monkeypatch.delenv("DF_MPS_REALTIME_COMPILE")
    assert not RealtimeEnhancer(enhancer, compile=False).compiled


def test_a_failing_compiled_hop_goes_eager_mid_stream(enhancer, speech, hop_cache):
    needs_compiler()
    audio = at_rate(speech, SR, 1)
    rt = RealtimeEnhancer(enhancer, compile=True)
    skip_where_packages_fail_their_trial(rt.compile_note)
    assert rt.compiled, rt.compile_note
    calls = []
    run = rt._model.hop_fn

    def flaky(inputs):
        calls.append(1)
        if len(calls) > 20:
            raise RuntimeError("simulated failure")
        return run(inputs)

    rt._model.hop_fn = flaky
    out = stream_through(rt, audio, [480] * (audio.shape[0] // 480 + 1))
    assert len(calls) == 21 and rt._model.hop_fn is None
    np.testing.assert_allclose(out, offline(enhancer, audio, SR), atol=TOL, rtol=0)


def test_cli_compile_flag():
    from df_mps.realtime import build_parser

    assert build_parser().parse_args([]).compile is None  # auto
    assert build_parser().parse_args(["--no-compile"]).compile is False
    assert build_parser().parse_args(["--compile"]).compile is True


def test_one_compiled_package_serves_every_post_filter_and_limit(enhancer):
    # the post-filter and the attenuation limit are inputs of the graph, not part of its key
    from df_mps import hopgraph
    from df_mps.realtime import _ModelRateStream

    keys = set()
    for post_filter, atten_lim_db in ((False, None), (True, None), (False, 12.0)):
        rt = RealtimeEnhancer(
            enhancer, compile=False, post_filter=post_filter, atten_lim_db=atten_lim_db
        )
        stream = _ModelRateStream(rt._pulsed, enhancer.df_state, 1, rt.device, 12.0, True)
        stream.process(torch.zeros((1, 4800)))  # a stream's state is no part of it either
        keys.add(hopgraph._cache_key(hopgraph.HopGraph(stream), stream.example_hop()))
    assert len(keys) == 1


def test_compiled_hop_cache_directory(tmp_path):
    import time

    from df_mps import hopgraph
    from df_mps.util import build_dir

    folder, cached = build_dir(tmp_path / "cache" / "realtime", "df-mps-hop-")
    assert cached and folder.is_dir()
    (tmp_path / "file").write_bytes(b"")
    private, cached = build_dir(tmp_path / "file" / "realtime", "df-mps-hop-")  # can't be made
    assert not cached and private.is_dir()  # built uncached in a private directory instead
    private.rmdir()
    old, recent, keep = (folder / f"hop-{name}.pt2" for name in ("old", "recent", "keep"))
    for path in (old, recent, keep):
        path.write_bytes(b"")
    stale = time.time() - (hopgraph.PRUNE_DAYS + 1) * 86400
    os.utime(old, (stale, stale))
    os.utime(keep, (stale, stale))
    hopgraph._prune(folder, keep=keep)
    assert not old.exists() and recent.exists() and keep.exists()


@pytest.mark.parametrize("crash", ["error", "segfault"])
def test_a_package_that_fails_its_trial_process_runs_eager(enhancer, monkeypatch, tmp_path, crash):
    """A compiled hop is first loaded and run once in a child process: a package whose loader
    raises or kills the process (as AOTInductor's did on the H200 machine's PyTorch 2.11, a
    segmentation fault) leaves the caller alive with CompileUnavailable, is marked failed, and
    the next start refuses it at once instead of building it again."""
    from df_mps import hopgraph

    graph, example, path = _hop_package(enhancer, monkeypatch, tmp_path)
    if crash == "segfault":  # the child dies in the loader, as a crashing loader's would
        _fake_child(
            monkeypatch,
            tmp_path,
            f"print({hopgraph._TRIAL_STARTED!r}, flush=True)\n"
            "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)\n",
        )
    with pytest.raises(hopgraph.CompileUnavailable, match="failed in a trial process"):
        hopgraph.compiled_hop(graph, example)
    passed, failed = hopgraph._markers(path)
    assert failed.is_file() and not passed.exists()
    monkeypatch.setattr(hopgraph, "_build", lambda *a: pytest.fail("built again"))
    with pytest.raises(hopgraph.CompileUnavailable, match="delete .* to try again"):
        hopgraph.compiled_hop(graph, example)


@pytest.mark.parametrize("child", ["no python", "import error", "killed", "no executable"])
def test_a_trial_that_never_reaches_the_loader_marks_nothing(
    enhancer, monkeypatch, tmp_path, child
):
    """Where the trial child is no Python that gets to the loader (a frozen program's own
    binary, another environment's interpreter, a child killed from outside, no interpreter at
    all), nothing is known of the package: this start runs eager, and no marker is written
    that would refuse the package to every other process sharing the cache."""
    import signal as signals

    from df_mps import hopgraph

    graph, example, path = _hop_package(enhancer, monkeypatch, tmp_path)
    if child == "no executable":
        monkeypatch.setattr(hopgraph.sys, "executable", None)
    else:
        code = {
            "no python": "pass\n",  # exits 0 and says nothing
            "import error": "raise ImportError('No module named df_mps')\n",
            "killed": f"print({hopgraph._TRIAL_STARTED!r}, flush=True)\n"
            f"import os; os.kill(os.getpid(), {int(signals.SIGKILL)})\n",
        }[child]
        _fake_child(monkeypatch, tmp_path, code)
    with pytest.raises(hopgraph.CompileUnavailable, match="could not be tried|no Python"):
        hopgraph.compiled_hop(graph, example)
    assert not any(mark.exists() for mark in hopgraph._markers(path))


def _hop_package(enhancer, monkeypatch, tmp_path):
    """(graph, example, path) of a real-time hop whose cached package is junk, in tmp_path."""
    from df_mps import hopgraph

    monkeypatch.setattr(hopgraph, "package_dir", lambda: tmp_path)
    graph, example, path = one_row_hop(enhancer)
    path.write_bytes(b"not a package")
    return graph, example, path


def _fake_child(monkeypatch, tmp_path, code: str) -> None:
    """The trial child runs ``code`` instead of loading the package."""
    from df_mps import hopgraph

    script = tmp_path / "child.py"
    script.write_text(code)
    real_run = subprocess.run
    monkeypatch.setattr(
        hopgraph.subprocess, "run", lambda argv, **kw: real_run([argv[0], str(script)], **kw)
    )
