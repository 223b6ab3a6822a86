"""df_mps.audio's one atomic writer: temporary names, permissions, stale temporaries (#13).

The permission tests run in a child that drops to uid 65534 (nobody) where the suite runs as
root: root's writes ignore permission bits, so only an unprivileged user shows them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from df_mps import audio
from df_mps.patches import audio_io

SR = 48000
NOBODY = 65534
LONGEST_NAME = 255  # NAME_MAX on Linux and macOS


def _silence(frames: int = 480) -> np.ndarray:
    return np.zeros((frames, 1), np.float32)


# -- item 8: the temporary name does not grow with the output's ------------------------------------
def test_the_longest_legal_output_name_is_written_whole(tmp_path):
    name = "n" * (LONGEST_NAME - 4) + ".wav"
    audio_io.write_audio(tmp_path / name, _silence(), SR)
    assert os.listdir(tmp_path) == [name]
    assert sf.info(str(tmp_path / name)).frames == 480


def test_the_longest_legal_output_name_is_written_streamed(tmp_path):
    name = "m" * (LONGEST_NAME - 5) + ".flac"
    with audio.AudioFileWriter(tmp_path / name, SR, 1, "PCM_16") as writer:
        writer.write(_silence())
        writer.commit()
    assert os.listdir(tmp_path) == [name]
    assert sf.info(str(tmp_path / name)).frames == 480


def test_streamed_samples_reach_the_disk_as_they_are_written(tmp_path, monkeypatch):
    """Every SYNC_BYTES of samples written, the temporary file is flushed to disk (libsndfile's
    flush: an fsync), so that a commit writes out only the rest; the file is whole after."""
    flushed = []
    flush = sf.SoundFile.flush

    def counting_flush(self):
        flushed.append(os.path.getsize(self.name))
        flush(self)

    monkeypatch.setattr(sf.SoundFile, "flush", counting_flush)
    block = np.full((audio.AudioFileWriter.SYNC_BYTES // 4, 1), 0.25, np.float32)  # PCM_16
    with audio.AudioFileWriter(tmp_path / "x.wav", SR, 1, "PCM_16") as writer:
        for _ in range(5):
            writer.write(block)
        # after the 2nd and the 4th block, each half of SYNC_BYTES
        assert len(flushed) == 2 and flushed[1] >= 2 * audio.AudioFileWriter.SYNC_BYTES
        writer.commit()
    data, _ = sf.read(str(tmp_path / "x.wav"), dtype="float32")
    assert data.shape == (5 * block.shape[0],) and np.all(data == 0.25)


def test_temporary_names_are_short_hidden_and_recognised(tmp_path):
    tmp = audio.new_temp(tmp_path / ("x" * 250 + ".wav"))
    name = os.path.basename(tmp)
    assert len(name) <= 32 and name.startswith(".") and name.endswith(audio.TEMP_SUFFIX)
    assert audio.is_temp_name(name) and not audio.is_temp_name("take.wav")


# -- items 9 and 10: modes, as an unprivileged user ------------------------------------------------
PERMISSIONS_CHILD = """
import os, stat, sys
import numpy as np
import soundfile  # imported before the user changes: nobody may not read root's Python
from df_mps.patches import audio_io

d = sys.argv[1]
if os.geteuid() == 0:
    os.setgid({nobody})
    os.setuid({nobody})
assert os.geteuid() != 0
x = np.zeros((480, 1), np.float32)

def mode(name):
    return oct(stat.S_IMODE(os.stat(os.path.join(d, name)).st_mode))

{body}
print("OK")
"""


def _as_nobody(body: str) -> str:
    """Run ``body`` (after PERMISSIONS_CHILD's set-up) as an unprivileged user; its stdout."""
    if os.geteuid() == 0:
        scratch = tempfile.mkdtemp(prefix="df-mps-perm-")  # /tmp: reachable by nobody
        os.chown(scratch, NOBODY, NOBODY)
    else:
        scratch = tempfile.mkdtemp(prefix="df-mps-perm-")
    code = PERMISSIONS_CHILD.format(nobody=NOBODY, body=body)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, scratch],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            cwd=scratch,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr
    return proc.stdout


@pytest.mark.subprocess
def test_overwrite_keeps_the_replaced_files_mode():
    _as_nobody(
        """
os.umask(0o022)
for name in ("private.wav", "shared.wav"):
    audio_io.write_audio(os.path.join(d, name), x, 48000)
os.chmod(os.path.join(d, "private.wav"), 0o600)
os.chmod(os.path.join(d, "shared.wav"), 0o664)
audio_io.write_audio(os.path.join(d, "private.wav"), x, 48000, overwrite=True)
audio_io.write_audio(os.path.join(d, "shared.wav"), x, 48000, overwrite=True)
assert mode("private.wav") == oct(0o600), mode("private.wav")
assert mode("shared.wav") == oct(0o664), mode("shared.wav")
"""
    )


@pytest.mark.subprocess
def test_streamed_overwrite_keeps_the_replaced_files_mode():
    _as_nobody(
        """
from df_mps.audio import AudioFileWriter

os.umask(0o022)
target = os.path.join(d, "s.flac")
audio_io.write_audio(target, x, 48000)
os.chmod(target, 0o640)
with AudioFileWriter(target, 48000, 1, "PCM_16", overwrite=True) as w:
    w.write(x)
    w.commit()
assert mode("s.flac") == oct(0o640), mode("s.flac")
"""
    )


@pytest.mark.subprocess
def test_new_files_take_the_umask_of_the_moment_without_reading_it():
    _as_nobody(
        """
os.umask(0o022)
audio_io.write_audio(os.path.join(d, "a.wav"), x, 48000)
os.umask(0o077)
audio_io.write_audio(os.path.join(d, "b.wav"), x, 48000)
assert (mode("a.wav"), mode("b.wav")) == (oct(0o644), oct(0o600)), (mode("a.wav"), mode("b.wav"))

def no_umask(mask):  # reading the umask means setting it: racy with other threads
    raise AssertionError("os.umask called")

real_umask, os.umask = os.umask, no_umask
audio_io.write_audio(os.path.join(d, "c.wav"), x, 48000)
assert mode("c.wav") == oct(0o600)

from df_mps.audio import AudioFileWriter

real_umask(0o027)
with AudioFileWriter(os.path.join(d, "d.wav"), 48000, 1) as w:
    w.write(x)
    w.commit()
assert mode("d.wav") == oct(0o640), mode("d.wav")
"""
    )


# -- item 15 (the helper; the killed build itself is in test_models.py) ---------------------------
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / f".{_dead_pid()}-a1b2c3{audio.TEMP_SUFFIX}"
    old = tmp_path / f".{os.getpid()}-d4e5f6{audio.TEMP_SUFFIX}"
    live = Path(audio.new_temp(tmp_path / "x", directory=True))
    (dead / "checkpoints").mkdir(parents=True)
    (dead / "checkpoints" / "model.ckpt").write_bytes(b"partial")
    old.write_bytes(b"partial")
    hour_ago = time.time() - audio.STALE_TEMP_SECONDS - 60
    os.utime(old, (hour_ago, hour_ago))
    user = tmp_path / ".1-abcdef.wav"  # not a name the writer makes: never touched
    user.write_bytes(b"mine")
    removed = audio.remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([str(dead), str(old)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, user.name])


def test_a_failed_publish_leaves_only_the_old_file(tmp_path):
    target = tmp_path / "keep.wav"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        with audio.atomic_output(target) as tmp:
            Path(tmp).write_bytes(b"new")
    assert os.listdir(tmp_path) == ["keep.wav"] and target.read_bytes() == b"old"


def test_the_command_line_skips_the_writers_temporaries(tmp_path):
    from df_mps import enhance

    audio_io.write_audio(tmp_path / "take.wav", _silence(), SR)
    audio.new_temp(tmp_path / "other.wav")  # as an interrupted run leaves it
    found = enhance.collect_inputs([], str(tmp_path), False, tmp_path / "out")
    assert [source.name for source, _ in found] == ["take.wav"]


@pytest.mark.parametrize("subtype, bits", [("PCM_16", 16), ("PCM_24", 24), ("PCM_32", 32)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_rounds_as_float64_does(subtype, bits, dtype):
    """PCM samples are rounded once, as in float64, for float32 and float64 input alike (float32
    samples are rounded in float32 up to 24 bits, where that is exact; narrowing float64 input
    first would round twice: 1 LSB off in 17% of 24-bit samples)."""
    from df_mps.audio import quantize

    rng = np.random.default_rng(bits)
    x = rng.uniform(-1.2, 1.2, 200_000).astype(dtype)
    x[:6] = [0.0, -0.0, 1.0, -1.0, 0.5 / 2 ** (bits - 1), 1.5 / 2 ** (bits - 1)]
    scale = float(1 << (bits - 1))
    expected = np.clip(np.round(x.astype(np.float64) * scale), -scale, scale - 1)
    expected = (
        expected.astype(np.int16)
        if bits == 16
        else (expected.astype(np.int64) << (32 - bits)).astype(np.int32)
    )
    assert np.array_equal(quantize(x, subtype), expected)
