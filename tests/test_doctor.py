"""`python -m df_mps doctor` and `python -m df_mps`."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import df_mps
from df_mps import __main__ as entry
from df_mps import capabilities, doctor, routing, settings
from df_mps.patches import PATCH_MODULES
from df_mps.registry import REGISTRY


def _route_of(text: str, op: str) -> str:
    match = re.search(rf"route {op}:\s+(\w+)", text)
    assert match, text
    return match.group(1)


def test_doctor_names_every_patch_route_and_setting(capsys):
    assert doctor.main() == 0
    text = capsys.readouterr().out
    for name in set(PATCH_MODULES) | {p.name for p in REGISTRY.patches}:
        assert re.search(rf"^  {name}:", text, re.M), f"patch {name} missing:\n{text}"
    device = doctor.chosen_device()
    assert re.search(rf"chosen device:\s+{re.escape(device)}$", text, re.M)
    for op in routing.OPS:
        assert _route_of(text, op) == routing.route(op, device).value
    for var in settings.ENV_VARS:
        assert f"  {var}=" in text
    for dist in ("torch", "torchaudio", "deepfilternet", "DeepFilterLib", "soundfile"):
        assert re.search(rf"^  {dist}:\s+\S", text, re.M)
    assert "MPS built:" in text and "MPS available:" in text and "MPS complex support:" in text
    assert "macOS version:" in text
    # The bindings df_mps replaced are listed under their patch.
    assert "df.io.load_audio" in text and "df.utils.get_device" in text


def test_doctor_shows_the_routes_the_settings_give(capsys):
    previous = settings.get()
    try:
        df_mps.patch(forward_method="real")
        doctor.main()
        text = capsys.readouterr().out
        device = doctor.chosen_device()
        expected = routing.route("deep_filter", device).value
    finally:
        settings.set_current(previous)
    assert _route_of(text, "deep_filter") == expected
    if device == "cpu":
        assert _route_of(text, "deep_filter") == "real"
    assert re.search(r"forward method:\s+real", text)


def test_doctor_says_whether_the_real_time_hop_would_be_compiled(monkeypatch, tmp_path):
    from df_mps import hopgraph

    monkeypatch.setenv("DF_MPS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DF_MPS_REALTIME_COMPILE", "0")
    assert "real-time hop (CPU): eager - DF_MPS_REALTIME_COMPILE=0" in doctor.report()
    monkeypatch.delenv("DF_MPS_REALTIME_COMPILE")
    monkeypatch.setattr(hopgraph, "_compiler", lambda: None)
    assert re.search(r"real-time hop \(CPU\): eager - no C\+\+ compiler", doctor.report())
    monkeypatch.setattr(hopgraph, "_compiler", lambda: "c++")
    monkeypatch.setattr(hopgraph, "_no_openmp", lambda compiler: None)
    (tmp_path / "realtime").mkdir()
    (tmp_path / "realtime" / "hop-0123.pt2").write_bytes(b"")
    line = re.search(r"real-time hop \(CPU\): (.*)", doctor.report()).group(1)
    assert line.startswith("compiled - ") and f"1 package(s) in {tmp_path / 'realtime'}" in line


def test_capability_summary_without_a_command(capsys):
    assert entry.main([]) == 0
    assert capsys.readouterr().out.strip() == capabilities.get().summary()
    assert entry.main(["bogus"]) == 2


@pytest.mark.subprocess
def test_doctor_exits_0_even_with_df_mps_disabled():
    env = {k: v for k, v in os.environ.items() if not k.startswith("DF_MPS_")}
    env["DF_MPS_DISABLE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "df_mps", "doctor"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "DF_MPS_DISABLE is set" in proc.stdout
    assert "DF_MPS_DISABLE='1'" in proc.stdout
    for name in PATCH_MODULES:
        assert re.search(rf"^  {name}:", proc.stdout, re.M), proc.stdout
