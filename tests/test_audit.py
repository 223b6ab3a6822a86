"""df_mps.testing.audit: every aten op a call sends to a target device, checked offline.

- The registry: parsed from the installed wheel's native_functions.yaml (no network), equal to
  PyYAML's reading, and giving the facts verified in torch's sources.
- A planted model (float64, complex, torch.mode) is flagged as MPS on macOS 13.6 and 14 would
  fail it; host syncs are counted as warnings; unknown ops are never ok.
- DFN3: clean under df_mps on macOS 13.6 (with and without the post-filter); unpatched, its
  complex ops are flagged. ``doctor --audit`` exits 0 on it.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

import df_mps
from df_mps import __main__ as entry
from df_mps import audit as audit_module
from df_mps import capabilities, doctor, routing
from df_mps.audit import COMPOSITE, DECOMPOSED, KERNEL, NO_KERNEL, UNKNOWN, VIEW, classify
from df_mps.testing import AuditReport, audit

MAC13 = (13, 6)
MAC14 = (14, 0)


# -- the registry --------------------------------------------------------------------------------
def test_registry_parse_matches_pyyaml():
    yaml = pytest.importorskip("yaml")
    path = audit_module.native_functions_path()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        reference = yaml.load(f, Loader=loader)
    parsed = audit_module.registry()
    assert len(reference) > 2000
    for item in reference:
        name = item["func"].split("(", 1)[0]
        dispatch = {
            key.strip(): kernel
            for keys, kernel in (item.get("dispatch") or {}).items()
            for key in keys.split(",")
        }
        if "ufunc_inner_loop" in item:  # torchgen makes its CPU and CUDA kernels
            dispatch = {"CPU": "ufunc", "CUDA": "ufunc", **dispatch}
        assert parsed[name].dispatch == dispatch, name
        assert parsed[name].structured_delegate == item.get("structured_delegate"), name


def test_registry_is_read_from_the_wheel_once():
    path = audit_module.native_functions_path()
    assert path.is_file() and "torchgen" in path.parts
    assert audit_module.registry() is audit_module.registry()


@pytest.mark.parametrize(
    "op, kind, detail",
    [
        # aten/src/ATen/native/mps/operations/LinearAlgebra.mm: TORCH_IMPL_FUNC(addmm_out_mps)
        ("addmm", KERNEL, "addmm_out_mps (via addmm.out)"),
        ("sigmoid_", KERNEL, "via sigmoid.out"),
        ("tanh_", KERNEL, "via tanh.out"),
        ("cat", KERNEL, "cat_out_mps"),
        ("mul.Tensor", KERNEL, "via mul.out"),
        # CPU and CUDA (and XPU in newer torch) only (pytorch/pytorch#195275, "[MPS] Add
        # mode", still open); torch 2.11 lists no XPU kernel
        ("mode", NO_KERNEL, "CPU, CUDA"),
        ("linalg_eig", NO_KERNEL, "CPU, CUDA"),
        # aten/src/ATen/mps/MPSFallback.mm: always sent to the CPU
        ("linalg_svd", NO_KERNEL, "MPSFallback.mm"),
        ("col2im", NO_KERNEL, "MPSFallback.mm"),
        ("convolution", COMPOSITE, "CompositeExplicitAutograd"),
        ("gru.input", DECOMPOSED, "CompositeImplicitAutograd"),
        ("no_such_op.really", UNKNOWN, "not in"),
    ],
)
def test_classification_matches_torchs_sources(op, kind, detail):
    got_kind, got_detail = classify(op, "MPS")
    assert got_kind == kind and detail in got_detail, (got_kind, got_detail)


def test_other_backends_have_their_own_answer():
    assert classify("mode", "CUDA")[0] == KERNEL
    assert classify("add.Tensor", "CUDA")[0] == KERNEL  # add.out's ufunc kernels
    assert classify("linalg_svd", "CUDA")[0] != NO_KERNEL  # the MPS fallback list is MPS's


# -- planted model ------------------------------------------------------------------------------
class Planted(torch.nn.Module):
    """float64, a complex tensor and torch.mode: three ways to fail on MPS."""

    def forward(self, x):
        energy = x.double().pow(2).sum(-1)  # float64
        spectrum = torch.view_as_complex(torch.stack([x, x], -1))  # complex64
        majority = torch.mode(x, dim=-1).values  # no MPS kernel
        return energy.float() + spectrum.abs().sum(-1) + majority


def _kinds(report: AuditReport):
    return {(f.kind, f.op) for f in report.errors}


def test_planted_model_on_macos_13_6():
    report = audit(Planted(), torch.randn(3, 8), device="mps", macos=MAC13)
    assert not report.ok
    assert "float64" in report.missing_dtypes and "complex64" in report.missing_dtypes
    assert report.no_kernel == {"mode": 1}
    assert ("no kernel", "mode") in _kinds(report)
    assert "NOT OK" in str(report) and "mode" in report.summary()


def test_planted_model_on_macos_14_keeps_float64_and_mode_only():
    report = audit(Planted(), torch.randn(3, 8), device="mps", macos="14.0")
    assert not report.ok
    assert set(report.missing_dtypes) == {"float64"}
    assert report.no_kernel == {"mode": 1}
    assert not any("complex" in f.message for f in report.errors)


@pytest.mark.parametrize("macos, flagged", [(MAC13, True), (MAC14, False)])
def test_bfloat16_needs_macos_14(macos, flagged):
    report = audit(lambda x: x.to(torch.bfloat16) * 2, torch.ones(3), macos=macos)
    assert ("bfloat16" in report.missing_dtypes) is flagged
    assert report.ok is not flagged


def test_planted_model_is_fine_for_cuda():
    report = audit(Planted(), torch.randn(3, 8), device="cuda", macos=None)
    assert report.ok, str(report)


def test_host_syncs_are_warnings_and_counted():
    def fn(x):
        scalar = x.sum().item()
        rows = torch.nonzero(x > 0)
        picked = x[x > 0]
        host = x.cpu()
        return scalar, rows, picked, host.numpy(), x.to("cpu").tolist()

    report = audit(fn, torch.randn(4, 4))
    assert report.ok  # slow, not wrong
    syncs = {f.op for f in report.findings if f.kind == "sync"}
    assert {"_local_scalar_dense", "nonzero", "index.Tensor"} <= syncs
    assert {"Tensor.cpu", "Tensor.numpy", "Tensor.tolist", "Tensor.to(cpu)"} <= syncs
    assert report.syncs >= 7


def test_views_launch_nothing_and_kernels_are_counted():
    def fn(x):
        return (x.view(2, 8).t().unsqueeze(0) + 1).relu()

    report = audit(fn, torch.randn(4, 4))
    kinds = {r.op: r.kind for r in report.ops}
    assert kinds["view"] == kinds["t"] == kinds["unsqueeze"] == VIEW
    assert report.kernels == 2 == report.kernels_per_call  # add, relu


def test_composite_implicit_ops_are_decomposed_and_their_parts_checked():
    # Under inference mode, composite ops reach the trace whole; their parts are traced too.
    def fn(x):
        with torch.inference_mode():
            return torch.chunk(x, 2, dim=0)[0].mode(-1).values

    report = audit(fn, torch.randn(4, 4))
    kinds = {r.op: r.kind for r in report.ops}
    assert kinds["chunk"] == DECOMPOSED
    assert "split.Tensor" in kinds
    assert report.no_kernel == {"mode": 1}


def test_an_op_outside_the_registry_is_unknown_never_ok():
    lib = torch.library.Library("dfmps_audit_test", "DEF")  # noqa: TOR901 - a test-only op
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CPU")
    report = audit(lambda x: torch.ops.dfmps_audit_test.twice(x), torch.ones(3))
    assert not report.ok
    assert report.no_kernel == {"twice": 1}
    assert report.errors[0].kind == UNKNOWN


def test_bad_targets_are_refused():
    with pytest.raises(ValueError, match="unknown device"):
        audit(lambda: None, device="tpu")
    with pytest.raises(ValueError, match="like 13.6"):
        audit(lambda: None, macos="thirteen")
    with pytest.raises(ValueError, match="registry_path"):
        audit(lambda: None, torch_version="1.13.1")


def test_routes_are_the_targets_only_during_the_audit():
    before = capabilities.get()
    seen = {}

    def fn():
        seen["13"] = routing.route("deep_filter", "cpu")

    audit(fn, macos=MAC13)
    assert seen["13"] is routing.Route.REAL
    audit(lambda: seen.update({"14": routing.route("deep_filter", "cpu")}), macos=MAC14)
    assert seen["14"] is routing.Route.UPSTREAM
    assert capabilities.get() is before


# -- DFN3 ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def features(dfn3):
    import numpy as np
    from df.enhance import df_features

    from df_mps.models import synthesize_noisy_speech

    model, df_state = dfn3
    noisy, _ = synthesize_noisy_speech(1.0)  # 1 s: 100 frames
    audio = torch.from_numpy(noisy.astype(np.float32))[None]
    return df_features(audio, df_state, model.nb_df, device="cpu")


@contextlib.contextmanager
def post_filter(model, on):
    previous = model.post_filter
    model.post_filter = on
    try:
        yield
    finally:
        model.post_filter = previous


def _forward(model):
    def forward(spec, erb_feat, spec_feat):
        with torch.no_grad():
            return model(spec.clone(), erb_feat, spec_feat)

    return forward


@pytest.mark.slow
@pytest.mark.parametrize("pf", [False, True], ids=["no-pf", "pf"])
def test_dfn3_under_df_mps_is_clean_on_macos_13_6(dfn3, features, pf):
    model, _ = dfn3
    with post_filter(model, pf):
        report = audit(_forward(model), *features, device="mps", macos=MAC13)
    assert report.ok, str(report)
    assert not report.missing_dtypes and not report.no_kernel
    assert report.syncs == 0  # nothing in the per-frame path waits for the device
    frames = features[0].shape[2]
    gru_layers = sum(m.num_layers for m in model.modules() if isinstance(m, torch.nn.GRU))
    # nn.GRU runs a generic cell per step on MPS: one addmm per layer and frame, at least.
    assert report.count("addmm") >= frames * gru_layers
    assert report.kernels > 10 * frames * gru_layers


@pytest.mark.slow
def test_unpatched_dfn3_on_macos_13_6_flags_its_complex_ops(dfn3, features):
    model, _ = dfn3
    df_mps.unpatch()
    try:
        report = audit(_forward(model), *features, device="mps", macos=MAC13)
        on_14 = audit(_forward(model), *features, device="mps", macos=MAC14)
    finally:
        df_mps.patch()
    assert not report.ok
    assert "complex64" in report.missing_dtypes
    assert {"view_as_complex", "bmm"} <= set(report.missing_dtypes["complex64"])
    assert on_14.ok, str(on_14)  # the same ops are fine where MPS has complex


@pytest.mark.slow
@pytest.mark.parametrize("pf", [[], ["--pf"]], ids=["no-pf", "pf"])
def test_doctor_audit_exits_0_on_dfn3(dfn3_model_dir, capsys, pf):
    argv = ["doctor", "--audit", "--device", "mps", "--macos", "13.6", "--seconds", "1"]
    argv += ["--batch", "2", "-m", str(dfn3_model_dir)] + pf
    assert entry.main(argv) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith("OK: clean for mps on macOS 13.6"), out
    assert re.search(r"kernels per second:\s+\d+ at batch 1; \d+ per file at batch 2", out)
    assert re.search(r"ops without a kernel:\s+none", out)
    assert re.search(r"dtypes lacking:\s+none", out)
    assert re.search(r"host syncs per second:\s+0 ", out)
    assert "deep_filter real" in out and "post_filter real" in out


def test_doctor_audit_refuses_bad_options_in_one_line(capsys):
    assert doctor.main(["--audit", "--macos", "soon"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--macos" in err
    assert doctor.main(["--audit", "--seconds", "0"]) == 2
