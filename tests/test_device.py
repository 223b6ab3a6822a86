"""get_device in every binding, and the real DFN3 model landing on the chosen device."""

import copy
import sys

import pytest
import torch

from df_mps import capabilities, routing, settings
from df_mps.capabilities import PlatformFacts, build
from df_mps.settings import Settings


def test_every_loaded_binding_answers_with_the_chosen_device():
    import contextlib
    import importlib

    from df_mps.registry import loaded_modules, submodule_names

    # df.train, df.evaluation_utils and some df.scripts need training-only packages (their import
    # fails here); test_patching covers them with stand-ins.
    for name in submodule_names("df"):
        if not name.startswith("df.scripts."):
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
    loaded = [module for module in loaded_modules("df") if "get_device" in vars(module)]
    assert len(loaded) >= 9
    chosen = routing.choose_device()
    for module in loaded:
        assert module.get_device is sys.modules["df.utils"].get_device, module.__name__
        assert module.get_device() == chosen, module.__name__


@pytest.fixture
def auto_device(monkeypatch):
    """No device setting (the suite pins DF_MPS_DEVICE and DEVICE to the CPU; these tests are
    about the choice itself)."""
    monkeypatch.delenv("DEVICE", raising=False)
    # Upstream's own get_device (called by unpatched tests) writes DEVICE from the environment
    # into the loaded config's [train] section; start from a config without it.
    config = sys.modules["df.config"].config
    if config.parser is not None and config.parser.has_option("train", "device"):
        monkeypatch.setattr(config, "parser", copy.deepcopy(config.parser))
        config.parser.remove_option("train", "device")
    previous = settings.get()
    settings.set_current(previous.replace(device="auto"))
    yield
    settings.set_current(previous)


def test_get_device_prefers_mps_on_a_mac_and_honours_overrides(auto_device):
    import df.utils

    mac = build(
        PlatformFacts(
            system="Darwin",
            machine="arm64",
            sysctl_product_version="14.5",
            mps_built=True,
            mps_available=True,
        )
    )
    previous = settings.get()
    with capabilities.override(mac):
        assert df.utils.get_device() == torch.device("mps")
        settings.set_current(Settings(device="cpu"))  # DF_MPS_DEVICE=cpu
        try:
            assert df.utils.get_device() == torch.device("cpu")
        finally:
            settings.set_current(previous)


def test_get_device_works_before_any_config_is_loaded(monkeypatch):
    # Upstream's get_device raises "No configuration loaded" there.
    import df.utils

    config = sys.modules["df.config"].config  # (the attribute df.config is the object itself)
    monkeypatch.setattr(config, "parser", None)
    assert df.utils.get_device() == routing.choose_device()


def test_train_device_in_config_is_honoured(monkeypatch, auto_device):
    import df.utils

    config = sys.modules["df.config"].config
    monkeypatch.setattr(config, "parser", config.parser)  # put the loaded config back afterwards
    config.use_defaults(allow_reload=True)
    config.set("DEVICE", "cpu", str, "train")
    cuda_box = build(PlatformFacts(system="Linux", machine="x86_64", cuda_available=True))
    with capabilities.override(cuda_box):
        assert df.utils.get_device() == torch.device("cpu")
        monkeypatch.setenv("DEVICE", "cuda:0")  # DeepFilterNet's own env override
        assert df.utils.get_device() == torch.device("cuda:0")


@pytest.mark.slow
def test_real_dfn3_loads_on_the_chosen_device(dfn3_model_dir, python_child):
    proc = python_child(
        f"""
import df_mps, torch
from df.enhance import init_df
from df.utils import get_device
model, df_state, suffix = init_df({str(dfn3_model_dir)!r}, log_file=None, log_level="ERROR")
devices = {{p.device for p in model.parameters()}}
print("DEVICES", devices, "CHOSEN", get_device(), "SUFFIX", suffix)
assert devices == {{get_device()}}
assert df_mps.is_patched()
""",
        env={"DF_MPS_DEVICE": "cpu"},
    )
    assert "SUFFIX DeepFilterNet3" in proc.stdout
