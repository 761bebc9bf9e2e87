"""RMSNorm's casting modes: each rounds float16 / bfloat16 results the way a model family's
own norm does, written out here in plain torch as the families write it (Llama's
``weight * xhat.to(dtype)``, Gemma's ``(xhat * (1 + w.float())).to(dtype)``, a plain
half-precision chain for "none")."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import addnorm
from addnorm import functional as AF

REDUCED = (torch.bfloat16, torch.float16)
BACKENDS = [b for b, ok in addnorm.backends().items() if ok and b != "triton"]


def _xhat(x: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def llama(x, w, eps):
    return w * _xhat(x, eps).to(x.dtype)


def gemma(x, w, eps):
    return (_xhat(x, eps) * (1.0 + w.float())).to(x.dtype)


def torch_order(x, w, eps):
    return (_xhat(x, eps) * w.float()).to(x.dtype)


def plain_half(x, w, eps):
    """Every op in x's dtype but the mean, which torch accumulates in float32 anyway."""
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)
    return (x * rstd) * w


FAMILIES = {  # casting_mode -> (the family's own code, offset)
    "llama": (llama, 0.0),
    "gemma": (gemma, 1.0),
    "torch": (torch_order, 0.0),
    "none": (plain_half, 0.0),
}


def _inputs(dtype, rows=48, d=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, d, generator=g) * 3).to(dtype)
    w = (torch.randn(d, generator=g) * 0.4 + 0.8).to(dtype)
    return x, w


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of a's dtype lie between a and b (same signs)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}[a.dtype]
    return (a.view(bits).to(torch.int64) - b.view(bits).to(torch.int64)).abs()


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("mode", sorted(FAMILIES))
def test_reference_rounds_as_the_family_does(mode, dtype):
    """The reference backend computes the statistic with torch's own reduction, so each
    mode's output is bit-identical to the family's code."""
    family, offset = FAMILIES[mode]
    x, w = _inputs(dtype)
    with addnorm.backend("torch"):
        y = AF.rms_norm(x, x.shape[-1], w, 1e-6, offset=offset, casting_mode=mode)
    assert y.dtype == dtype
    assert torch.equal(y, family(x, w, 1e-6))


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["gemma", "llama", "none"])
def test_every_backend_rounds_as_the_family_does(mode, backend, dtype):
    """In the families' modes every backend sums the squares in torch's own order too
    (the numba kernel emulates torch's vector width and cascade), so the outputs are
    bit-identical."""
    family, offset = FAMILIES[mode]
    for rows, d in ((256, 1024), (3, 4133), (5, 7), (1, 20000)):
        x, w = _inputs(dtype, rows=rows, d=d)
        with addnorm.backend(backend):
            y = AF.rms_norm(x, d, w, 1e-6, offset=offset, casting_mode=mode)
        assert torch.equal(y, family(x, w, 1e-6)), (rows, d)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    d=st.integers(1, 6000),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_is_torch_rms_norm_bit_for_bit(rows, d, dtype, scale, seed):
    """"gemma" without an offset is torch.rms_norm's own result, every bit, in every
    dtype; "torch", summed in the kernel's faster order, within rounding of it."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, d, generator=g) * scale).to(dtype)
    w = torch.randn(d, generator=g).to(dtype)
    expected = torch.rms_norm(x, (d,), w, 1e-6)
    with addnorm.backend("numba"):
        assert torch.equal(AF.rms_norm(x, d, w, 1e-6, casting_mode="gemma"), expected)
        fast = AF.rms_norm(x, d, w, 1e-6)
    torch.testing.assert_close(fast, expected)  # torch's default tolerances per dtype


@pytest.mark.parametrize("dtype", REDUCED)
def test_the_modes_are_different_functions(dtype):
    """Where the weight is not 1, rounding xhat first (Llama) differs from rounding once."""
    x, w = _inputs(dtype)
    once = AF.rms_norm(x, x.shape[-1], w, 1e-6, casting_mode="torch")
    twice = AF.rms_norm(x, x.shape[-1], w, 1e-6, casting_mode="llama")
    each = AF.rms_norm(x, x.shape[-1], w, 1e-6, casting_mode="none")
    assert (once != twice).float().mean() > 0.05
    assert (twice != each).float().mean() > 0.01
    with addnorm.backend("torch"):  # the same rounding; the kernel's "torch" sums in its own order
        assert torch.equal(AF.rms_norm(x, x.shape[-1], w, 1e-6), AF.rms_norm(x, x.shape[-1], w, 1e-6, casting_mode="gemma"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_mode_with_a_float32_weight_returns_float32(backend):
    """``weight * xhat.to(bfloat16)`` with a float32 weight promotes, as Llama's norm under
    autocast does; in the other modes the output keeps the input's dtype, as torch's."""
    x, w = _inputs(torch.bfloat16)
    w = w.float()
    with addnorm.backend(backend):
        y = AF.rms_norm(x, x.shape[-1], w, 1e-6, casting_mode="llama")
        once = AF.rms_norm(x, x.shape[-1], w, 1e-6)
    assert y.dtype == torch.float32 and once.dtype == torch.bfloat16
    assert (_ulps(y, llama(x, w, 1e-6)) <= 2).all()


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["llama", "gemma", "none"])
def test_gradients_follow_the_family(mode, backend, dtype):
    """Gradients through our kernel against autograd through the family's own code: the
    same rounding of the gradient reaching xhat; sums over rows in a different order, so
    close, not bit-equal."""
    family, offset = FAMILIES[mode]
    x, w = _inputs(dtype, rows=64, d=256)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    with addnorm.backend(backend):
        AF.rms_norm(x1, x.shape[-1], w1, 1e-6, offset=offset, casting_mode=mode).backward(dy)
    family(x2, w2, 1e-6).backward(dy)
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(x1.grad, x2.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=tol, atol=tol * 8)


@pytest.mark.parametrize("mode", ["llama", "none"])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_add_uses_the_same_casting(mode, residual):
    x, w = _inputs(torch.bfloat16)
    r = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype)
    y, s = AF.add_rms_norm(x, r, x.shape[-1], w, 1e-6, casting_mode=mode)
    assert torch.equal(s, x + r)
    assert torch.equal(y, AF.rms_norm(x + r, x.shape[-1], w, 1e-6, casting_mode=mode))


@pytest.mark.parametrize("mode", sorted(FAMILIES))
def test_every_mode_is_exact_in_float64(mode):
    """In float64 (and float32) no mode rounds anything: one function (up to the order of
    the sum of squares), gradcheck'ed."""
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    f = lambda x, w: AF.rms_norm(x, 7, w, 1e-6, offset=0.5, casting_mode=mode)  # noqa: E731
    torch.testing.assert_close(f(x, w), AF.rms_norm(x, 7, w, 1e-6, offset=0.5), rtol=1e-15, atol=0)
    assert gradcheck(f, (x, w)) and gradgradcheck(f, (x, w))


def test_a_bad_casting_mode_names_the_argument_and_the_choices():
    x = torch.randn(2, 4)
    for bad in ("Llama", None, 1):
        with pytest.raises(ValueError, match="casting_mode must be one of 'torch', 'gemma', 'llama', 'none'"):
            AF.rms_norm(x, 4, casting_mode=bad)
    with pytest.raises(ValueError, match="casting_mode"):
        addnorm.RMSNorm(4, casting_mode="bf16")


def test_module_carries_its_casting_mode():
    m = addnorm.RMSNorm(256, eps=1e-6, casting_mode="llama").to(torch.bfloat16)
    with torch.no_grad():
        m.weight.copy_(_inputs(torch.bfloat16, d=256)[1])
    x = _inputs(torch.bfloat16, d=256)[0]
    assert "casting_mode='llama'" in repr(m)
    assert (_ulps(m(x), llama(x, m.weight, 1e-6)) <= 2).all()
    fused = addnorm.AddRMSNorm(256, eps=1e-6, casting_mode="llama").to(torch.bfloat16)
    fused.load_state_dict(m.state_dict())
    assert torch.equal(fused(x, torch.zeros_like(x))[0], m(x))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 24),
    d=st.integers(1, 3000),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    mode=st.sampled_from(["gemma", "llama", "none"]),
    offset=st.sampled_from([0.0, 1.0]),
    fused=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_numba_kernel_is_the_reference_bit_for_bit(rows, d, dtype, mode, offset, fused, seed):
    """Every mode, offset and the fused add: the numba kernel's output is the reference's
    (plain torch ops) to the last bit, and its gradients agree within rounding."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, d, generator=g) * 2).to(dtype)
    r = torch.randn(rows, d, generator=g).to(dtype)
    w = (torch.rand(d, generator=g) + 0.5).to(dtype)
    dy = torch.randn(rows, d, generator=g).to(dtype)
    out = {}
    for backend in ("torch", "numba"):
        xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
        with addnorm.backend(backend):
            if fused:
                y, _ = AF.add_rms_norm(xb, r, d, wb, 1e-6, offset=offset, casting_mode=mode)
            else:
                y = AF.rms_norm(xb, d, wb, 1e-6, offset=offset, casting_mode=mode)
            y.backward(dy.to(y.dtype))
        out[backend] = (y.detach(), xb.grad, wb.grad)
    assert torch.equal(out["numba"][0], out["torch"][0])
    tol = {torch.float32: 1e-4, torch.bfloat16: 4e-2, torch.float16: 4e-3}[dtype]
    for ours, ref in zip(out["numba"][1:], out["torch"][1:]):
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))
