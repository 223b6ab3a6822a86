"""The one decision point: routes and device choice, as a matrix."""

import dataclasses

import pytest

from df_mps import routing
from df_mps.capabilities import PlatformFacts, build
from df_mps.routing import Route, choose_device_name, decide
from df_mps.settings import Settings, SettingsError

MAC13 = build(
    PlatformFacts(
        system="Darwin",
        machine="arm64",
        mac_ver="13.6",
        sysctl_product_version="13.6",
        mps_built=True,
        mps_available=True,
    )
)
MAC14 = build(
    PlatformFacts(
        system="Darwin",
        machine="arm64",
        mac_ver="14.0",
        sysctl_product_version="14.0",
        mps_built=True,
        mps_available=True,
    )
)
LINUX_CUDA = build(PlatformFacts(system="Linux", machine="x86_64", cuda_available=True))
LINUX_CPU = build(PlatformFacts(system="Linux", machine="x86_64"))
AUTO = Settings()


@pytest.mark.parametrize("op", ["deep_filter", "post_filter", "dfop", "stft"])
def test_complex_ops_on_mps_before_14_take_the_real_path(op):
    assert decide(op, "mps", MAC13, AUTO) is Route.REAL
    assert decide(op, "cpu", MAC13, AUTO) is Route.UPSTREAM
    assert decide(op, "mps", MAC14, AUTO) is Route.UPSTREAM
    assert decide(op, "cuda", LINUX_CUDA, AUTO) is Route.UPSTREAM
    assert decide(op, "cpu", LINUX_CPU, AUTO) is Route.UPSTREAM


def test_stoi_moves_to_the_cpu_where_complex_is_missing():
    assert decide("stoi", "mps", MAC13, AUTO) is Route.CPU
    assert decide("stoi", "mps", MAC14, AUTO) is Route.UPSTREAM
    assert decide("stoi", "cpu", MAC13, AUTO) is Route.UPSTREAM
    emulated_cpu = dataclasses.replace(MAC13, devices_without_complex=frozenset({"cpu"}))
    assert decide("stoi", "cpu", emulated_cpu, AUTO) is Route.CPU


def test_forced_real_applies_on_every_device():
    real = Settings(forward_method="real")
    for caps, dev in ((LINUX_CPU, "cpu"), (LINUX_CUDA, "cuda"), (MAC14, "mps")):
        assert decide("deep_filter", dev, caps, real) is Route.REAL
        assert decide("post_filter", dev, caps, real) is Route.REAL
    assert decide("stoi", "cuda", LINUX_CUDA, real) is Route.CPU
    assert decide("stoi", "cpu", LINUX_CPU, real) is Route.UPSTREAM


def test_forced_complex_keeps_upstream_even_where_it_will_fail():
    assert decide("deep_filter", "mps", MAC13, Settings(forward_method="complex")) is Route.UPSTREAM


def test_config_ini_method_applies_unless_settings_say_otherwise():
    assert decide("deep_filter", "cpu", LINUX_CPU, AUTO, config_method="real") is Route.REAL
    explicit = Settings(forward_method="complex")
    assert decide("deep_filter", "cpu", LINUX_CPU, explicit, "real") is Route.UPSTREAM


@pytest.mark.parametrize(
    "caps, settings, config, expected",
    [
        (LINUX_CUDA, AUTO, None, "cuda:0"),
        (MAC14, AUTO, None, "mps"),
        (MAC13, AUTO, None, "mps"),
        (LINUX_CPU, AUTO, None, "cpu"),
        (MAC14, Settings(device="cpu"), None, "cpu"),
        (MAC14, AUTO, "cpu", "cpu"),  # [train] DEVICE = cpu in config.ini
        (LINUX_CUDA, Settings(device="cpu"), "cuda:0", "cpu"),  # env beats config
        (LINUX_CUDA, Settings(device="auto"), "cpu", "cpu"),  # auto defers to config
        (LINUX_CUDA, Settings(device="cuda:1"), None, "cuda:1"),
        (LINUX_CPU, Settings(device="mps"), None, "cpu"),  # unavailable: warn, fall back
        (LINUX_CPU, AUTO, "cuda", "cpu"),
    ],
)
def test_device_choice(caps, settings, config, expected):
    assert choose_device_name(caps, settings, config) == expected


def test_rosetta_never_picks_mps():
    rosetta = build(
        PlatformFacts(
            system="Darwin",
            machine="x86_64",
            sysctl_product_version="14.2",
            proc_translated=True,
            mps_built=True,
            mps_available=True,
        )
    )
    assert choose_device_name(rosetta, AUTO) == "cpu"
    assert choose_device_name(rosetta, Settings(device="mps")) == "cpu"


def test_settings_from_env_and_validation():
    s = Settings.from_env(
        {"DF_MPS_DEVICE": "MPS", "DF_MPS_FORWARD_METHOD": "real", "DF_MPS_DISABLE": "1"}
    )
    assert (s.device, s.forward_method, s.disabled) == ("mps", "real", True)
    assert Settings.from_env({"DF_MPS_FORWARD_METHOD": "bogus"}).forward_method is None
    assert Settings.from_env({}, forward_method="complex").forward_method == "complex"
    with pytest.raises(SettingsError):
        Settings(forward_method="fast")
    with pytest.raises(SettingsError):
        Settings(device="tpu")


def test_route_reads_the_current_state(monkeypatch):
    from df_mps import capabilities, settings

    with capabilities.override(MAC13):
        assert routing.route("deep_filter", "mps") is Route.REAL
        assert routing.route("deep_filter", "cpu") is Route.UPSTREAM
        previous = settings.get()
        settings.set_current(Settings(forward_method="complex"))
        try:
            assert routing.route("deep_filter", "mps") is Route.UPSTREAM
        finally:
            settings.set_current(previous)
