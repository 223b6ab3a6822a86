"""df_mps.ray and `df-mps-enhance --ray`: a real local Ray cluster (2 CPUs, no dashboard), the
real DFN3 model, short files (1-1.5 s) of mixed rates and channels.

The outputs are compared with the plain command line's on the same files. The fault test kills
an actor's process while it writes a file, and Ray's retries (max_restarts, max_task_retries)
bring the work back; the resume test interrupts a run of the command and finishes it with
--skip-existing. Without Ray installed, or where a cluster can't start, these tests skip and
say why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from df_mps import enhance as cli
from df_mps.audio import TEMP_SUFFIX

REPO = Path(__file__).resolve().parents[1]
SUFFIX = "DeepFilterNet3"
# (name, sample rate, channels, seconds, subtype): mixed rates, channels, formats.
CORPUS = [
    ("a48_mono.wav", 48000, 1, 1.0, "FLOAT"),
    ("b48_stereo.wav", 48000, 2, 1.2, "FLOAT"),
    ("c16_mono.wav", 16000, 1, 1.0, "FLOAT"),
    ("d44_stereo.flac", 44100, 2, 1.0, "PCM_16"),
    ("e22_mono.wav", 22050, 1, 1.5, "PCM_16"),
    ("f8_stereo.wav", 8000, 2, 1.0, "FLOAT"),
]


# -- without Ray or the model -------------------------------------------------------------------
def test_ray_address_refuses_a_file_name():
    parser = cli.build_parser()
    args = parser.parse_args(["x.wav", "--ray"])
    assert args.ray == "local" and args.noisy_audio_files == ["x.wav"]
    for address in ("auto", "ray://head:10001", "10.0.0.1:6379", "local"):
        assert parser.parse_args(["--ray", address, "x.wav"]).ray == address
    assert cli.main(["--ray", "x.wav", "y.wav"]) == 2  # x.wav is no address: a usage error


@pytest.mark.subprocess
def test_importing_df_mps_ray_does_not_import_ray(python_child):
    python_child(
        """
        import sys
        import df_mps.ray, df_mps.enhance
        df_mps.enhance.build_parser()
        assert "ray" not in sys.modules, "df_mps.ray imported ray at import time"
        """
    )


def test_remove_stale_temp_files_removes_only_that_targets(tmp_path):
    from df_mps.audio import discard, new_temp
    from df_mps.ray import remove_stale_temp_files

    target = tmp_path / "x_DeepFilterNet3.wav"
    stale = Path(new_temp(target))  # as a dead worker left it
    other = Path(new_temp(tmp_path / "y_DeepFilterNet3.wav"))
    target.write_bytes(b"x")
    assert discard and stale.exists()
    assert remove_stale_temp_files(target) == 1
    assert not stale.exists() and other.exists() and target.exists()


@pytest.mark.parametrize(
    "env, expected", [("cpu", "cpu"), ("auto", "cuda"), ("", "cuda"), ("mps", "cuda")]
)
def test_without_device_the_drivers_df_mps_device_decides(monkeypatch, tmp_path, env, expected):
    """No --device: DF_MPS_DEVICE in the driver decides where the actors run, as it does for
    the plain CLI (the engine's choice, or the cluster's GPUs where it says auto or nothing;
    mps is the driver's own machine's, a Mac joining a GPU cluster). On the H200 a
    DF_MPS_DEVICE=cpu run put its actors on the GPU."""
    from df_mps import ray as df_ray
    from df_mps import settings

    class Cluster:
        @staticmethod
        def cluster_resources():
            return {"CPU": 4, "GPU": 1}

    class Stop(Exception):
        pass

    sized = {}
    real_sizes = df_ray._sizes

    def sizes(ray, device, *args):
        sized["size"] = real_sizes(ray, device, *args)
        raise Stop  # sized: the rest would start actors

    monkeypatch.setenv("DF_MPS_DEVICE", env)
    settings.refresh()
    monkeypatch.setattr(df_ray, "_import_ray", lambda: Cluster)
    monkeypatch.setattr(df_ray, "_connect", lambda *a: False)
    monkeypatch.setattr(df_ray, "_sizes", sizes)
    try:
        with pytest.raises(Stop):
            list(df_ray.run_on_ray([(tmp_path / "a.wav", tmp_path / "b.wav")]))
    finally:
        monkeypatch.undo()
        settings.refresh()
    size = sized["size"]
    assert size.device == expected and (size.gpus > 0) == (expected == "cuda")


def test_actors_get_the_drivers_settings_but_not_its_paths(monkeypatch):
    from df_mps import ray as df_ray

    monkeypatch.setenv("DF_MPS_ENGINE_IO_THREADS", "3")
    monkeypatch.setenv("DF_MPS_CACHE_DIR", "/Users/alice/cache")
    monkeypatch.setenv("DF_MPS_DEVICE", "mps")  # decided in run_on_ray, passed explicitly
    env = df_ray._settings_env()
    assert env["DF_MPS_ENGINE_IO_THREADS"] == "3"
    assert "DF_MPS_CACHE_DIR" not in env and "DF_MPS_DEVICE" not in env


def test_default_batch_spreads_the_files():
    from df_mps.ray import default_files_per_batch

    assert default_files_per_batch(6, 2) == 1
    assert default_files_per_batch(100, 1) == 16
    assert default_files_per_batch(40, 2) == 5


def test_the_ray_path_gets_the_local_runs_enhancer_options(monkeypatch, tmp_path):
    import inspect

    import df_mps.ray as dray
    from df_mps.api import Enhancer

    args = cli.build_parser().parse_args(["x.wav", "--ray", "--whole-file", "--threads", "2"])
    options = cli.enhancer_options(args)
    # With no options given, the command asks for the Enhancer's own defaults; every Enhancer
    # keyword has an option, but the process's device and threads.
    defaults = {
        name: param.default
        for name, param in inspect.signature(Enhancer).parameters.items()
        if name not in ("device", "threads")
    }
    assert options == defaults

    seen = {}

    def run_on_ray(jobs, **kwargs):  # a generator, as the real one
        seen.update(kwargs)
        yield from ()

    monkeypatch.setattr(dray, "run_on_ray", run_on_ray)
    args = cli.build_parser().parse_args(
        ["x.wav", "--ray", "--batch", "3", "--precision", "bf16", "--no-cuda-graphs", "--pf"]
    )
    assert dray.run_cli([], args, tmp_path) == 0
    assert seen["enhancer_options"] == dict(
        cli.enhancer_options(args), device=None, threads=None, whole_file=False
    )
    assert seen["enhancer_options"]["batch"] == 3
    assert seen["enhancer_options"]["precision"] == "bf16"


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'df-mps[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            logging_level="WARNING",
            object_store_memory=200 * 1024 * 1024,
        )
    except Exception as exc:
        pytest.skip(f"a local Ray cluster could not start here: {type(exc).__name__}: {exc}")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def restore_logging():
    yield
    # main() sets up the command's logging for the process; give later tests loguru's default.
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, audio_dir) -> Path:
    import torch
    import torchaudio.functional as AF

    noisy, sr = sf.read(audio_dir / "noisy_white.wav", dtype="float32")
    pink, _ = sf.read(audio_dir / "noisy_pink.wav", dtype="float32")
    root = tmp_path_factory.mktemp("corpus")
    offset = 0
    for name, rate, channels, seconds, subtype in CORPUS:
        n = int(seconds * sr)
        parts = [noisy[offset : offset + n], pink[offset : offset + n]][:channels]
        x = torch.from_numpy(np.stack(parts))
        if rate != sr:
            x = AF.resample(x, sr, rate)
        sf.write(root / name, x.numpy().T, rate, subtype=subtype)
        offset += n
    return root


@pytest.fixture(scope="module")
def plain_outputs(corpus, dfn3_model_dir, tmp_path_factory) -> Path:
    """The plain command line's outputs for the corpus: the reference."""
    out = tmp_path_factory.mktemp("plain")
    rc = cli.main(["-i", str(corpus), "-o", str(out), "-m", str(dfn3_model_dir), "--threads", "1"])
    assert rc == 0
    return out


def output_name(name: str) -> str:
    stem, ext = os.path.splitext(name)
    return f"{stem}_{SUFFIX}{ext}"


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def temp_files(directory: Path) -> list:
    return sorted(p.name for p in Path(directory).iterdir() if p.name.endswith(TEMP_SUFFIX))


def finished_outputs(directory: Path) -> dict:
    """{name: mtime_ns} of the outputs in ``directory`` (not the hidden temporary files)."""
    found = {}
    for path in Path(directory).glob(f"*_{SUFFIX}.*"):
        if not path.name.startswith("."):
            with contextlib.suppress(FileNotFoundError):  # renamed or removed meanwhile
                found[path.name] = path.stat().st_mtime_ns
    return found


def read_report(path: Path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def assert_equals_plain(out: Path, plain: Path, names) -> None:
    for name in names:
        got, rate = sf.read(out / output_name(name), dtype="float32", always_2d=True)
        want, want_rate = sf.read(plain / output_name(name), dtype="float32", always_2d=True)
        assert rate == want_rate and got.shape == want.shape, name
        subtype = sf.info(str(out / output_name(name))).subtype
        assert subtype == sf.info(str(plain / output_name(name))).subtype
        # 1e-5 in float; a PCM output may also round to the next step where the two runs'
        # floats (1e-7 apart: other batches, other pieces) straddle a rounding boundary.
        bits = {"PCM_16": 16, "PCM_24": 24}.get(subtype)
        atol = 1e-5 + (2.0 ** (1 - bits) if bits else 0.0)
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


def cli_argv(corpus: Path, out: Path, model_dir: Path, *extra) -> list:
    return ["-i", str(corpus), "-o", str(out), "-m", str(model_dir), "--threads", "1", *extra]


# -- the runs ----------------------------------------------------------------------------------
pytestmark_slow = pytest.mark.slow
warnings_filter = pytest.mark.filterwarnings("ignore:.*resampling method name is being deprecated")


@pytestmark_slow
@warnings_filter
def test_ray_run_equals_plain_cli(cluster, corpus, plain_outputs, dfn3_model_dir, tmp_path):
    out = tmp_path / "out"
    argv = cli_argv(corpus, out, dfn3_model_dir, "--ray", "--ray-workers", "2")
    assert cli.main(argv) == 0
    names = [name for name, *_ in CORPUS]
    assert_equals_plain(out, plain_outputs, names)
    rows = read_report(out / "df-mps-report.jsonl")
    assert sorted(Path(row["src"]).name for row in rows) == sorted(names)  # one row per file
    assert {row["status"] for row in rows} == {"ok"}
    for row in rows:
        info = sf.info(row["dst"])
        assert row["frames"] == info.frames and row["sample_rate"] == info.samplerate
        assert row["audio_seconds"] == pytest.approx(info.frames / info.samplerate)
        assert row["rtf"] > 0 and row["error"] == "" and row["device"] == "cpu"
    assert temp_files(out) == []


@pytestmark_slow
@warnings_filter
def test_a_bad_file_is_one_error_row(cluster, corpus, plain_outputs, dfn3_model_dir, tmp_path):
    from df_mps.ray import run_on_ray

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.wav").write_bytes(os.urandom(4000))
    nan = np.zeros((4800, 1), dtype=np.float32)
    nan[100] = np.nan
    sf.write(bad / "nan.wav", nan, 48000, subtype="FLOAT")
    out = tmp_path / "out"
    jobs = [
        (corpus / "a48_mono.wav", out / output_name("a48_mono.wav")),
        (bad / "garbage.wav", out / "garbage_out.wav"),
        (bad / "nan.wav", out / "nan_out.wav"),
        (corpus / "c16_mono.wav", out / output_name("c16_mono.wav")),
    ]
    options = dict(model=str(dfn3_model_dir), threads=1)
    rows = list(
        run_on_ray(
            jobs,
            workers=1,
            enhancer_options=options,
            files_per_batch=4,  # the bad files share a batch with the good ones
            report_path=tmp_path / "report.jsonl",
        )
    )
    by_name = {Path(row["src"]).name: row for row in rows}
    assert len(rows) == 4 and len(read_report(tmp_path / "report.jsonl")) == 4
    assert by_name["a48_mono.wav"]["status"] == by_name["c16_mono.wav"]["status"] == "ok"
    for name, reason in (("garbage.wav", "not a readable audio file"), ("nan.wav", "NaN")):
        row = by_name[name]
        assert row["status"] == "error", row
        assert reason in row["error"] and name in row["error"] and "\n" not in row["error"]
        assert not Path(row["dst"]).exists()
    assert_equals_plain(out, plain_outputs, ["a48_mono.wav", "c16_mono.wav"])
    assert temp_files(out) == []


def _descendants(pid: int) -> list:
    """Processes under ``pid`` (this test's own: the local cluster it started, its workers)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _writers_of_temp_files(directory: Path) -> list:
    """This test's processes that hold a temporary output file in ``directory`` open: the
    actor mid-file (not an idle actor left from an earlier dataset)."""
    pids = []
    real_dir = os.path.realpath(directory)
    for pid in _descendants(os.getpid()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                path = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if path.endswith(TEMP_SUFFIX) and os.path.dirname(path) == real_dir:
                pids.append(pid)
                break
    return pids


@pytestmark_slow
@warnings_filter
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the actor's process in /proc")
def test_a_killed_actor_is_replaced_and_its_files_redone(
    cluster, corpus, plain_outputs, dfn3_model_dir, tmp_path
):
    from df_mps.ray import run_on_ray

    out = tmp_path / "out"
    out.mkdir()
    names = [name for name, *_ in CORPUS]
    jobs = [(corpus / name, out / output_name(name)) for name in names]
    options = dict(model=str(dfn3_model_dir), threads=1)
    result = {}

    def run():
        try:
            result["rows"] = list(
                run_on_ray(jobs, workers=1, enhancer_options=options, files_per_batch=3)
            )
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and runner.is_alive() and time.monotonic() < deadline:
        # Mid-work: the actor has finished a file and is writing another (its temporary file
        # exists), so its batch has a complete output and a partial one when it dies.
        finished = finished_outputs(out)
        if finished and temp_files(out):
            writers = _writers_of_temp_files(out)
            if writers:
                killed = writers[0]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.02)
    runner.join(timeout=300)
    assert not runner.is_alive(), "the run did not finish after its actor was killed"
    assert killed is not None, "never saw the actor mid-file"
    assert "error" not in result, result.get("error")
    rows = result["rows"]
    assert sorted(Path(row["src"]).name for row in rows) == sorted(names)
    assert {row["status"] for row in rows} <= {"ok", "skipped"}
    replacement = [row for row in rows if not row["worker"].endswith(f":{killed}")]
    assert replacement, "no row came from a replacement actor"
    for row in replacement:
        # What the dead actor had finished is complete: reported skipped, never rewritten.
        name = Path(row["dst"]).name
        if name in finished:
            assert row["status"] == "skipped", row
            assert (out / name).stat().st_mtime_ns == finished[name]
    assert_equals_plain(out, plain_outputs, names)
    assert temp_files(out) == []


@pytestmark_slow
@warnings_filter
@pytest.mark.subprocess
def test_an_interrupted_run_resumes_with_skip_existing(
    cluster, corpus, plain_outputs, dfn3_model_dir, tmp_path
):
    out = tmp_path / "out"
    names = [name for name, *_ in CORPUS]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env.update(DF_MPS_DEVICE="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    argv = cli_argv(corpus, out, dfn3_model_dir, "--ray", "--ray-workers", "1", "--ray-batch", "1")
    # Its own process, its own local cluster: SIGINT is what a preempted or stopped run gets.
    proc = subprocess.Popen(
        [sys.executable, "-m", "df_mps.enhance", *argv, "--log-level", "warning"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        done = []
        while proc.poll() is None and time.monotonic() < deadline:
            done = [n for n in names if (out / output_name(n)).exists()]
            if len(done) >= 2:
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.05)
        output = proc.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    assert "interrupted" in output
    assert temp_files(out) == [], output
    finished = {n: (out / output_name(n)) for n in names if (out / output_name(n)).exists()}
    assert 2 <= len(finished) < len(names), f"interrupt came too late to test resuming: {output}"
    before = {n: (p.stat().st_mtime_ns, sha(p)) for n, p in finished.items()}
    for n in finished:
        assert cli.output_is_complete(corpus / n, out / output_name(n))

    rc = cli.main(cli_argv(corpus, out, dfn3_model_dir, "--ray", "--skip-existing"))
    assert rc == 0
    after = {
        n: ((out / output_name(n)).stat().st_mtime_ns, sha(out / output_name(n))) for n in before
    }
    assert after == before  # the finished ones are untouched
    assert_equals_plain(out, plain_outputs, names)
    rows = read_report(out / "df-mps-report.jsonl")
    status = {Path(row["src"]).name: row["status"] for row in rows}
    assert len(rows) == len(names)
    assert status == {n: ("skipped" if n in finished else "ok") for n in names}
    assert temp_files(out) == []


@pytestmark_slow
@warnings_filter
def test_skip_existing_in_the_plain_cli(corpus, dfn3_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a48_mono.wav", "c16_mono.wav"):
        (two / name).write_bytes((corpus / name).read_bytes())
    assert cli.main(cli_argv(two, out, dfn3_model_dir)) == 0
    a, c = out / output_name("a48_mono.wav"), out / output_name("c16_mono.wav")
    stamp = (a.stat().st_mtime_ns, sha(a))
    # c's output cut short (a foreign or damaged file): not complete, so never skipped.
    data, rate = sf.read(c, dtype="float32")
    sf.write(c, data[: len(data) // 2], rate, subtype="FLOAT")
    assert not cli.output_is_complete(two / "c16_mono.wav", c)
    capsys.readouterr()
    assert cli.main(cli_argv(two, out, dfn3_model_dir, "--skip-existing")) == 1
    err = capsys.readouterr().err
    assert "1 file(s) skipped" in err and "not a complete output" in err
    assert (a.stat().st_mtime_ns, sha(a)) == stamp
    # --overwrite redoes the incomplete one; the complete one is still skipped.
    assert cli.main(cli_argv(two, out, dfn3_model_dir, "--skip-existing", "--overwrite")) == 0
    assert (a.stat().st_mtime_ns, sha(a)) == stamp
    assert cli.output_is_complete(two / "c16_mono.wav", c)


@pytestmark_slow
def test_an_actor_sets_up_its_own_process_only(cluster, dfn3_model_dir):
    """Inside a Ray actor, EnhanceFiles freezes what its model load left alive out of the
    garbage collector's sight and keeps large freed buffers for reuse (glibc); made in another
    process, it leaves that process alone."""
    import gc

    from df_mps import util
    from df_mps.ray import EnhanceFiles

    options = {"model": str(dfn3_model_dir), "threads": 1}
    remote = cluster.remote(num_cpus=1)(EnhanceFiles).remote(options, log_level=None)
    try:
        state = cluster.get(remote.process_state.remote(), timeout=300)
    finally:
        cluster.kill(remote)
    assert state["pid"] != os.getpid()
    assert state["gc_frozen_objects"] > 10_000, state
    # glibc on Linux, and no malloc settings of the user's (the actors get the driver's
    # environment)
    assert state["freed_buffers_kept"] is (util._mallopt() is not None)

    gc.unfreeze()  # whatever an earlier test in this process froze
    here = EnhanceFiles(options, log_level=None).process_state()
    assert here == {"pid": os.getpid(), "gc_frozen_objects": 0, "freed_buffers_kept": False}


# -- EnhanceFiles in this process (no cluster): the rows it makes ------------------------------
@pytestmark_slow
@warnings_filter
def test_enhance_files_rows_without_a_cluster(corpus, plain_outputs, dfn3_model_dir, tmp_path):
    from df_mps.ray import COLUMNS, EnhanceFiles

    out = tmp_path / "out"
    out.mkdir()
    done = out / output_name("c16_mono.wav")
    done.write_bytes((plain_outputs / output_name("c16_mono.wav")).read_bytes())
    stamp = done.stat().st_mtime_ns
    from df_mps.audio import new_temp

    stale = Path(new_temp(out / output_name("a48_mono.wav")))  # as a worker that died left it
    stale.write_bytes(b"left by a worker that died")
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not really")
    batch = {
        "src": np.array(
            [
                str(corpus / "a48_mono.wav"),
                str(tmp_path / "garbage.wav"),
                str(corpus / "c16_mono.wav"),
            ]
        ),
        "dst": np.array(
            [str(out / output_name("a48_mono.wav")), str(out / "garbage_out.wav"), str(done)]
        ),
    }
    actor = EnhanceFiles({"model": str(dfn3_model_dir), "threads": 1}, log_level=None)
    rows = actor(batch)
    assert set(rows) == set(COLUMNS) and all(len(rows[name]) == 3 for name in COLUMNS)
    assert list(rows["status"]) == ["ok", "error", "skipped"]  # in the batch's order
    assert "not a readable audio file" in rows["error"][1]
    assert rows["frames"][0] == sf.info(str(corpus / "a48_mono.wav")).frames
    assert done.stat().st_mtime_ns == stamp and not stale.exists()
    assert_equals_plain(out, plain_outputs, ["a48_mono.wav", "c16_mono.wav"])


@pytestmark_slow
@warnings_filter
def test_enhance_files_whole_file_without_a_cluster(
    corpus, plain_outputs, dfn3_model_dir, tmp_path
):
    from df_mps.ray import EnhanceFiles

    out = tmp_path / "out"
    names = ["a48_mono.wav", "b48_stereo.wav"]
    batch = {
        "src": np.array([str(corpus / name) for name in names]),
        "dst": np.array([str(out / output_name(name)) for name in names]),
    }
    options = {"model": str(dfn3_model_dir), "threads": 1, "whole_file": True}
    actor = EnhanceFiles(options, log_level=None)
    rows = actor(batch)
    assert list(rows["status"]) == ["ok", "ok"], list(rows["error"])
    assert list(rows["channels"]) == [1, 2]
    assert_equals_plain(out, plain_outputs, names)  # upstream's whole-file call, to rounding


def test_an_engine_that_fails_gives_error_rows(monkeypatch, tmp_path):
    import df_mps.ray as dray

    class FailingEngine:
        device = "cpu"

        def enhance_files(self, jobs, *, overwrite=False):
            raise RuntimeError("CUDA error: out of memory\nsecond line")
            yield  # a generator, as the real engine

    monkeypatch.setattr(dray, "make_engine", lambda options: FailingEngine())
    actor = dray.EnhanceFiles({}, log_level=None)
    rows = actor({"src": np.array(["a.wav", "b.wav"]), "dst": np.array(["x/a.wav", "x/b.wav"])})
    assert list(rows["status"]) == ["error", "error"]
    assert all("out of memory second line" in e and "\n" not in e for e in rows["error"])
