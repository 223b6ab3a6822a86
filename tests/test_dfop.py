"""DFN1/DFN2 paths: ``df.modules.DfOp`` (incl. the torch.jit.script'ed one in DFN1) and DFN2's
complex deep filter, with random weights, under the no-complex emulation.

Each model runs in a fresh interpreter: DeepFilterNet's config is process-global, and
TorchScript caches the compiled DfOp class by type for the rest of the process.
"""

import pytest

from conftest import run_python

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

BUILD = """
import sys, importlib, contextlib, torch
torch.set_num_threads(1)
import df_mps
from df_mps import capabilities
from df_mps.testing import ComplexNotSupportedError, emulate_no_complex, no_complex_capabilities
from df.config import config
from df.enhance import enhance
from libdf import DF
# Imported while patched: without DeepFilterLib (Python >= 3.12) libdf is df_mps's stand-in,
# which unpatch() takes away again.
import df.deepfilternet, df.deepfilternet2, df.deepfilternet3

def build(modname, method, **extra):
    m = importlib.import_module("df." + modname)
    config.use_defaults(allow_reload=True)
    config.set("DFOP_METHOD", method, str, m.ModelParams.section)
    for k, v in extra.items():
        config.set(k, v, str, m.ModelParams.section)
    p = m.ModelParams()
    state = DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb,
               min_nb_erb_freqs=p.min_nb_freqs)
    torch.manual_seed(0)
    return m.init_model(state).eval(), state

torch.manual_seed(1)
audio = torch.randn(1, 48000) * 0.1
"""


def test_dfn2_complex_deep_filter_fails_unpatched_and_passes_patched():
    proc = run_python(
        BUILD
        + """
model, state = build("deepfilternet2", "complex_strided", DF_OUTPUT_LAYER="groupedlinear")
assert type(model.df_op).__name__ == "DF"  # DFN2 filters with df.multiframe.DF here
reference = enhance(model, state, audio)
df_mps.unpatch()
try:
    with emulate_no_complex(model):
        enhance(model, state, audio)
    raise SystemExit("unpatched DFN2 did not fail under emulation")
except ComplexNotSupportedError:
    pass
df_mps.patch()
with emulate_no_complex(model):
    out = enhance(model, state, audio)
print("DIFF", (out - reference).abs().max().item())
"""
    )
    assert float(proc.stdout.split("DIFF")[1]) <= 1e-5


def test_dfn2_with_dfop_real_unfold_runs_under_emulation():
    # DFN2's DfOp uses real_unfold: no complex at all, patched or not.
    run_python(
        BUILD
        + """
model, state = build("deepfilternet2", "real_unfold", DF_OUTPUT_LAYER="groupedlinear")
assert type(model.df_op).__name__ == "DfOp"
with emulate_no_complex(model):
    enhance(model, state, audio)
"""
    )


def test_dfop_complex_strided_is_routed_per_call():
    proc = run_python(
        BUILD
        + """
from df.modules import DfOp
torch.manual_seed(0)
spec = torch.randn(2, 1, 40, 481, 2)
coefs = torch.randn(2, 40, 5, 96, 2)
alpha = torch.rand(2, 40, 1)
op = DfOp(96, 5, 2, method="complex_strided")   # built on a complex-capable CPU
reference = op(spec, coefs, alpha)               # upstream's complex path
assert "complex_strided" in op.forward.__name__
df_mps.unpatch()
legacy = DfOp(96, 5, 2, method="complex_strided")
try:
    with emulate_no_complex(legacy):
        legacy(spec, coefs, alpha)
    raise SystemExit("unpatched DfOp did not fail under emulation")
except ComplexNotSupportedError:
    pass
df_mps.patch()
with emulate_no_complex(op):                      # the stored bound forward is routed per call
    out = op(spec, coefs, alpha)
print("DIFF", (out - reference).abs().max().item())
"""
    )
    assert float(proc.stdout.split("DIFF")[1]) <= 1e-5


def test_dfn1_scripted_dfop_chooses_real_before_scripting():
    proc = run_python(
        BUILD
        + """
with capabilities.override(no_complex_capabilities()):
    model, state = build("deepfilternet", "complex_strided")
code = model.df_op.code
assert "view_as_complex" not in code, code
with emulate_no_complex(model):
    out = enhance(model, state, audio)
print("SHAPE", tuple(out.shape))
"""
    )
    assert "SHAPE (1, 48000)" in proc.stdout


def test_dfn1_scripted_dfop_fails_unpatched_under_emulation():
    run_python(
        BUILD
        + """
df_mps.unpatch()
with capabilities.override(no_complex_capabilities()):
    model, state = build("deepfilternet", "complex_strided")
assert "view_as_complex" in model.df_op.code
try:
    with emulate_no_complex(model):
        enhance(model, state, audio)
    raise SystemExit("unpatched DFN1 did not fail under emulation")
except RuntimeError:  # TorchScript re-raises the guard's error without its message
    from df_mps.testing import violations
    assert violations() and "view_as_complex" in violations()[-1], violations()
"""
    )
