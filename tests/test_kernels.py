"""Real-valued kernels against upstream's complex math, op by op."""

import pytest
import torch

from df_mps.kernels import deep_filter_real, magnitude


def _upstream_df(num_freqs, frame_size, lookahead, conj):
    from df.multiframe import DF

    import df_mps  # noqa: F401  (df.multiframe imports through df_mps's torchaudio stand-in)

    op = DF(num_freqs=num_freqs, frame_size=frame_size, lookahead=lookahead, conj=conj).eval()
    return op


@pytest.mark.parametrize(
    "b, t, f, nf, order, lookahead, conj",
    [(1, 50, 481, 96, 5, 2, False), (3, 17, 64, 32, 3, 0, True), (2, 8, 40, 40, 1, 0, False)],
)
def test_deep_filter_real_matches_complex_einsum(b, t, f, nf, order, lookahead, conj):
    torch.manual_seed(0)
    spec = torch.randn(b, 1, t, f, 2)
    coefs = torch.randn(b, order, t, nf, 2)
    op = _upstream_df(nf, order, lookahead, conj)
    # Upstream's forward runs unpatched here: call the original through the wrapper's __wrapped__.
    forward = type(op).__dict__["forward"]
    upstream = getattr(forward, "__wrapped__", forward)
    expected = upstream(op, spec.clone(), coefs)
    got = spec.clone()
    got[..., :nf, :] = deep_filter_real(spec, coefs, nf, order, lookahead, conj)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-5
    # Bins above num_freqs are untouched.
    assert torch.equal(got[..., nf:, :], spec[..., nf:, :])


def test_magnitude_matches_complex_abs():
    # The post-filter's only complex op; the patch runs upstream's formula over this.
    torch.manual_seed(1)
    spec = torch.randn(2, 1, 30, 481, 2)
    assert torch.allclose(magnitude(spec), torch.view_as_complex(spec).abs(), atol=1e-6)


def test_kernels_make_no_complex_and_no_float64():
    from df_mps.testing import NoComplexMode

    spec = torch.randn(1, 1, 10, 100, 2)
    coefs = torch.randn(1, 5, 10, 96, 2)
    with NoComplexMode():
        out = deep_filter_real(spec, coefs, 96, 5, 2)
        mag = magnitude(spec)
    assert out.dtype == torch.float32 and mag.dtype == torch.float32
