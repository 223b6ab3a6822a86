"""Capability logic with faked platform and torch facts: no Mac needed."""

import dataclasses

import pytest

from df_mps import capabilities
from df_mps.capabilities import PlatformFacts, build, macos_version

APPLE_SILICON_TORCH = dict(torch_version="2.5.1", mps_built=True, mps_available=True)


def mac(product_version, mac_ver=None, **kw):
    facts = dict(
        system="Darwin",
        machine="arm64",
        mac_ver=mac_ver if mac_ver is not None else product_version,
        sysctl_product_version=product_version,
        **APPLE_SILICON_TORCH,
    )
    facts.update(kw)
    return PlatformFacts(**facts)


def test_macos_13_6_has_mps_but_no_complex():
    caps = build(mac("13.6.1"))
    assert caps.macos_version == (13, 6)
    assert caps.mps_available
    assert caps.mps_complex is False
    assert caps.mps_complex_source == "macOS rule"
    assert caps.devices_without_complex == frozenset({"mps"})
    assert not caps.supports_complex("mps")
    assert caps.supports_complex("cpu")


def test_macos_14_0_supports_complex():
    caps = build(mac("14.0"))
    assert caps.macos_version == (14, 0)
    assert caps.mps_complex is True
    assert caps.devices_without_complex == frozenset()
    assert caps.supports_complex("mps")


def test_compat_value_10_16_is_replaced_by_the_kernel_version():
    # Python built against an old SDK reports 10.16 on any macOS >= 11.
    caps = build(mac("14.4", mac_ver="10.16"))
    assert caps.macos_version == (14, 4)
    assert caps.mps_complex is True
    caps13 = build(mac("13.5", mac_ver="10.16"))
    assert caps13.macos_version == (13, 5)
    assert caps13.mps_complex is False


def test_compat_value_falls_back_to_the_plist_when_sysctl_fails():
    facts = mac(None, mac_ver="10.16", plist_product_version="13.2")
    assert macos_version(facts) == (13, 2)


def test_10_16_is_kept_only_when_nothing_better_is_known():
    facts = mac(None, mac_ver="10.16")
    assert macos_version(facts) == (10, 16)


def test_rosetta_has_no_usable_mps_even_if_torch_says_so():
    caps = build(mac("14.1", machine="x86_64", proc_translated=True))
    assert caps.rosetta
    assert caps.macos_version == (14, 1)
    assert not caps.mps_available
    assert caps.mps_complex is None
    assert caps.devices_without_complex == frozenset()
    assert "Rosetta" in caps.summary()


def test_linux_has_no_macos_and_no_mps():
    caps = build(
        PlatformFacts(system="Linux", machine="x86_64", torch_version="2.14.1", cuda_available=True)
    )
    assert caps.macos_version is None
    assert not caps.mps_available
    assert caps.mps_complex is None
    assert caps.cuda_available
    assert caps.supports_complex("cuda") and caps.supports_complex("cpu")


def test_runtime_probe_overrides_the_macos_rule():
    assert build(mac("13.6", mps_complex_probe=True)).mps_complex is True
    caps = build(mac("14.2", mps_complex_probe=False))
    assert caps.mps_complex is False
    assert caps.mps_complex_source == "runtime probe"
    assert not caps.supports_complex("mps")


def test_snapshot_is_frozen_and_summary_is_readable():
    caps = build(mac("13.6"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.mps_available = False
    text = caps.summary()
    assert "macOS version:       13.6" in text
    assert "MPS complex support: no (macOS rule)" in text


def test_detect_on_this_machine_and_override():
    real = capabilities.refresh()
    assert real.torch_version
    fake = build(mac("13.6"))
    with capabilities.override(fake):
        assert capabilities.get() is fake
    assert capabilities.get() is real


def test_probe_is_opt_in_and_cached(monkeypatch):
    calls = []

    def fake_probe():
        calls.append(1)
        return False

    monkeypatch.setattr(capabilities, "probe_mps_complex", fake_probe)
    monkeypatch.setattr(capabilities, "_probe_cache", None)
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    assert capabilities.read_facts(probe=False).mps_complex_probe is None
    assert calls == []
    assert capabilities.read_facts(probe=True).mps_complex_probe is False
    assert capabilities.read_facts(probe=True).mps_complex_probe is False
    assert calls == [1]
