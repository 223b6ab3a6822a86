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
        # the sitecustomize this interpreter has besides ours (a distribution's, as Ubuntu's
        # /usr/lib/python3.X/sitecustomize.py), which the bootstrap chains to
        "other_sitecustomize": getattr(__import__("importlib.machinery").machinery.PathFinder
            .find_spec("sitecustomize", [p for p in sys.path if "_bootstrap" not in p]),
            "origin", None),
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
    # ours, or the next one it chained to (where the interpreter has one of its own)
    ours = os.path.join(launcher.BOOTSTRAP_DIR, "sitecustomize.py")
    assert report["sitecustomize"] == (report["other_sitecustomize"] or ours)


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


def test_bootstrap_env_keeps_empty_entries_and_drops_every_bootstrap(tmp_path):
    # #13 items 12 and 13: an empty entry is the current directory; a bootstrap reached through
    # a symlink, or another install's copy, is still a bootstrap.
    link = tmp_path / "link"
    link.symlink_to(launcher.BOOTSTRAP_DIR, target_is_directory=True)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "sitecustomize.py").write_text(
        Path(launcher.BOOTSTRAP_DIR, "sitecustomize.py").read_text()
    )
    sep = os.pathsep
    cases = {
        "": [launcher.BOOTSTRAP_DIR],
        sep: [launcher.BOOTSTRAP_DIR, "", ""],
        f"/a{sep}": [launcher.BOOTSTRAP_DIR, "/a", ""],
        sep.join([str(link), "/a", str(copy), "", "/b"]): [launcher.BOOTSTRAP_DIR, "/a", "", "/b"],
    }
    for given, expected in cases.items():
        assert launcher.bootstrap_env({"PYTHONPATH": given})["PYTHONPATH"].split(sep) == expected
    assert launcher.is_bootstrap_dir(str(link)) and launcher.is_bootstrap_dir(str(copy))
    assert not launcher.is_bootstrap_dir(str(tmp_path)) and not launcher.is_bootstrap_dir("/a")


def _python_under_launcher(tmp_path: Path, pythonpath: str, script: Path, cwd: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DF_MPS_")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = pythonpath
    env["DF_MPS_DISABLE"] = "1"  # the chain is what is tested, not the patches
    env.setdefault("OMP_NUM_THREADS", "1")
    # The launcher under test, wherever pytest imported it from (a checkout's src/ or an install):
    # PYTHONPATH is what is tested, so it can't point there.
    root = str(Path(launcher.__file__).resolve().parents[1])
    start = f"import sys; sys.path.insert(0, {root!r}); import df_mps.run as r; sys.exit(r.main())"
    return subprocess.run(
        [sys.executable, "-c", start, "python", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        cwd=cwd,
    )


@pytest.mark.subprocess
@pytest.mark.parametrize("second", ["symlink", "copy"])
def test_a_second_bootstrap_on_pythonpath_still_chains_to_the_users_sitecustomize(tmp_path, second):
    # #13 item 12: the chain recursed between two bootstraps and never reached the user's.
    other = tmp_path / "other_bootstrap"
    if second == "symlink":
        other.symlink_to(launcher.BOOTSTRAP_DIR, target_is_directory=True)
    else:
        other.mkdir()
        (other / "sitecustomize.py").write_text(
            Path(launcher.BOOTSTRAP_DIR, "sitecustomize.py").read_text()
        )
    user = tmp_path / "user_site"
    user.mkdir()
    (user / "sitecustomize.py").write_text("import sys\nsys.user_site_ran = True\n")
    script = tmp_path / "s.py"
    script.write_text("import sys\nprint('user ran:', getattr(sys, 'user_site_ran', False))\n")
    proc = _python_under_launcher(
        tmp_path, os.pathsep.join([str(other), str(user)]), script, tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "RecursionError" not in proc.stderr and "failed" not in proc.stderr, proc.stderr
    assert "user ran: True" in proc.stdout
    # The child's own PYTHONPATH is checked directly too: a bootstrap already there, met again
    # inside Python (sys.path), must be skipped by the bootstrap's own chain.
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("DF_MPS_")},
            "DF_MPS_DISABLE": "1",
            "PYTHONPATH": os.pathsep.join([launcher.BOOTSTRAP_DIR, str(other), str(user)]),
        },
        timeout=180,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "user ran: True" in proc.stdout, proc.stderr


@pytest.mark.subprocess
def test_an_empty_pythonpath_entry_keeps_the_current_directory(tmp_path):
    # #13 item 13: PYTHONPATH=: means the current directory; the launcher dropped it.
    here = tmp_path / "cwd"
    here.mkdir()
    (here / "cwd_module.py").write_text("VALUE = 42\n")
    elsewhere = tmp_path / "scripts"
    elsewhere.mkdir()
    script = elsewhere / "s.py"
    script.write_text("import cwd_module\nprint('value', cwd_module.VALUE)\n")
    proc = _python_under_launcher(tmp_path, os.pathsep, script, here)
    assert proc.returncode == 0, proc.stderr
    assert "value 42" in proc.stdout
