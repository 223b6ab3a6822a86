"""df-mps-run: an unmodified program that imports df runs patched (fresh interpreters)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from df_mps import run as launcher

# The program never imports df_mps; the lines after `import df.enhance` only look at what the
# interpreter holds, to report it to the test.
PROGRAM = textwrap.dedent(
    """
    import json, os, sys
    try:
        import df.enhance
        from df.io import load_audio
        audio, meta = load_audio(os.environ["NOISY_WAV"])
        loaded = [list(audio.shape), meta.sample_rate]
    except Exception as exc:
        loaded = f"{type(exc).__name__}: {exc}"
    m = sys.modules.get("df_mps")
    utils = sys.modules.get("df.utils")
    print(json.dumps({
        "df_mps_imported": m is not None,
        "patched": bool(m and m.is_patched()),
        "get_device_wrapped": bool(
            m and utils and m.registry.REGISTRY.is_wrapper(utils.get_device)
        ),
        "loaded": loaded,
        "user_site_mark": os.environ.get("USER_SITE_MARK"),
        "sitecustomize": getattr(sys.modules.get("sitecustomize"), "__file__", None),
    }))
    """
)


def run_launched(tmp_path: Path, audio_dir: Path, env_extra: dict) -> dict:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    assert "df_mps" not in PROGRAM.split("m = sys.modules")[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DF_MPS_")}
    env.pop("PYTHONPATH", None)
    # "python" is looked up on PATH, as a user would type it.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["NOISY_WAV"] = str(audio_dir / "noisy_white.wav")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra)
    proc = subprocess.run(
        [sys.executable, "-m", "df_mps.run", "python", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.subprocess
def test_program_that_imports_df_is_patched(tmp_path, audio_dir):
    report = run_launched(tmp_path, audio_dir, {})
    assert report["df_mps_imported"] and report["patched"] and report["get_device_wrapped"]
    # df.io reads through soundfile: no torchaudio backend, torchcodec or FFmpeg involved.
    assert report["loaded"] == [[1, 480000], 48000]
    assert report["sitecustomize"] == os.path.join(launcher.BOOTSTRAP_DIR, "sitecustomize.py")


@pytest.mark.subprocess
def test_users_sitecustomize_still_runs(tmp_path, audio_dir):
    user_dir = tmp_path / "user_site"
    user_dir.mkdir()
    (user_dir / "sitecustomize.py").write_text(
        "import os, sys\nos.environ['USER_SITE_MARK'] = 'ran'\nassert __name__ == 'sitecustomize'\n"
    )
    report = run_launched(tmp_path, audio_dir, {"PYTHONPATH": str(user_dir)})
    assert report["user_site_mark"] == "ran"
    assert report["sitecustomize"] == str(user_dir / "sitecustomize.py")
    assert report["patched"] and report["get_device_wrapped"]


@pytest.mark.subprocess
def test_df_mps_disable_turns_every_patch_off(tmp_path, audio_dir):
    report = run_launched(tmp_path, audio_dir, {"DF_MPS_DISABLE": "1"})
    assert report["df_mps_imported"]
    assert not report["patched"] and not report["get_device_wrapped"]


def test_unknown_command_is_one_line(capsys):
    assert launcher.main(["df-mps-no-such-command-xyz", "arg"]) == 127
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "command not found" in err
    assert launcher.main(["./no/such/file"]) == 127
    assert launcher.main([]) == 2
    assert "usage:" in capsys.readouterr().err
    assert launcher.main(["--help"]) == 0


def test_bootstrap_env_puts_the_bootstrap_first_once():
    env = launcher.bootstrap_env({"PYTHONPATH": os.pathsep.join(["/a", launcher.BOOTSTRAP_DIR])})
    assert env["PYTHONPATH"].split(os.pathsep) == [launcher.BOOTSTRAP_DIR, "/a"]
    assert launcher.bootstrap_env({})["PYTHONPATH"] == launcher.BOOTSTRAP_DIR
