"""DyT and ScaleNorm against the float64 reference and their torch spelling."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import addnorm.functional as AF
from conftest import DTYPES
from helpers import R, as64, assert_close, grads, leaf

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@fixture_ok
@given(
    batch=st.lists(st.integers(0, 5), max_size=2),
    d=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    affine=st.booleans(),
    alpha=st.sampled_from([0.5, 2.0, -1.3]),
    spread=st.sampled_from([1.0, 30.0]),  # 30: deep into tanh's saturation
    seed=st.integers(0, 2**16),
)
def test_dyt(backend, batch, d, dtype, affine, alpha, spread, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*batch, d, generator=g, dtype=torch.float64) * spread).to(dtype)
    a = torch.tensor([alpha], dtype=dtype)
    w = torch.randn(d, generator=g, dtype=torch.float64).to(dtype) if affine else None
    b = torch.randn(d, generator=g, dtype=torch.float64).to(dtype) if affine else None

    def torch_dyt(x, a, w, b):  # what torch users write, in float32 (float64), cast once
        acc = R.acc_dtype(x.dtype)
        y = torch.tanh(a.to(acc) * x.to(acc))
        return (y if w is None else w.to(acc) * y + b.to(acc)).to(x.dtype)

    ins = [leaf(t) if t is not None else None for t in (x, a, w, b)]
    tins = [leaf(t) if t is not None else None for t in (x, a, w, b)]
    rins = as64(x, a, w, b)
    ours, theirs, ref = AF.dyt(*ins), torch_dyt(*tins), R.dyt(*rins)
    assert_close(ours, theirs, ref, dtype)
    rows = max(1, x.numel() // d)
    names = ("dx", "dalpha", "dweight", "dbias")
    for name, o, t, r in zip(names, grads(ours, ins, dtype), grads(theirs, tins, dtype),
                             grads(ref, rins, dtype)):
        if r is None:
            assert o is None
            continue
        ulps = 4.0 * (1 if name == "dx" else rows * (d if name == "dalpha" else 1))
        assert_close(o, t, r, dtype, what=name, floor_ulps=ulps, scale=abs(alpha) * 4)


@pytest.mark.parametrize("dtype, affine", [(torch.float32, True), (torch.bfloat16, False)])
@fixture_ok
@given(rows=st.integers(1, 70), d=st.integers(1, 300), threads=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_dyt_backward_split_over_columns_gives_the_serial_bits(monkeypatch, dtype, affine, rows, d, threads, seed):
    """numba's DyT backward across threads runs a task per block of rows and, where
    there are fewer blocks than threads (a few wide rows), per range of its columns:
    every sum still runs over its block's rows in order, so each gradient has the bits
    of the one-thread kernel, which ``test_dyt`` holds to the reference and torch."""
    from addnorm.kernels import cpu

    g = torch.Generator().manual_seed(seed)
    x, dy = (torch.randn(rows, d, generator=g, dtype=torch.float64).mul(2).to(dtype) for _ in range(2))
    a = torch.tensor([0.7], dtype=dtype)
    w, b = (torch.randn(d, generator=g, dtype=torch.float64).to(dtype) if affine else None for _ in range(2))
    serial = cpu.dyt_backward(dy, x, a, w, b)
    monkeypatch.setattr(cpu, "_ONE_THREAD_BELOW", 0)
    monkeypatch.setattr(cpu, "_threads", lambda work: threads)
    split = cpu.dyt_backward(dy, x, a, w, b)
    for name, s, p in zip(("dx", "dalpha", "dweight", "dbias"), serial, split):
        assert (s is None) == (p is None), name
        if s is not None:
            assert torch.equal(s.view(torch.int16 if dtype is torch.bfloat16 else torch.int32),
                               p.view(torch.int16 if dtype is torch.bfloat16 else torch.int32)), name


@pytest.mark.skipif("not __import__('addnorm.kernels.cpu').kernels.cpu.TORCH_FLOAT32_TANH",
                    reason="torch here has no MKL vsTanh: numba's float32 DyT has its own tanh")
@pytest.mark.parametrize("shape", [(1, 1), (3, 70), (1, 2048), (2, 2049), (1, 5000), (33, 64), (700, 3),
                                   (64, 1024), (5, 20000), (3000, 40)])
@pytest.mark.parametrize("affine", [True, False])
def test_float32_dyt_is_torchs_formula_bit_for_bit(shape, affine):
    """numba's float32 DyT forward takes torch's own tanh (MKL's vsTanh) on chunks of its
    rows and rounds the affine as torch does: whatever the chunks (rows shorter and longer
    than one, a call's rows split over threads, the C++ eager path's small calls), y is
    torch's ``tanh(alpha * x) * w + b``, bit for bit, with or without a graph recorded,
    NaN, infinities, signed zeros and subnormals included."""
    import addnorm

    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    x = torch.randn(shape, generator=g) * 3
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-41])
    every = x.view(-1)[::97]  # a view: one value in 97 made special
    every.copy_(special[torch.arange(len(every)) % len(special)])
    a = torch.tensor([0.7])
    w, b = (torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)) if affine else (None, None)
    expected = torch.tanh(a * x) if w is None else torch.tanh(a * x) * w + b
    with addnorm.backend("numba"):
        with torch.no_grad():
            plain = AF.dyt(x, a, w, b)
        recorded = AF.dyt(x.clone().requires_grad_(), a, w, b)
    for y in (plain, recorded.detach()):
        assert torch.equal(y.view(torch.int32), expected.view(torch.int32))


def test_float32_tanh_without_mkl_is_ours():
    """Where torch has no vsTanh, the float32 DyT's chunks call our own ``tanh`` (a C
    function of vsTanh's signature): within 0.5 ulp, as the kernels' inline tanh."""
    import ctypes

    from addnorm.kernels import cpu

    own = ctypes.CFUNCTYPE(None, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p)(cpu._own_float32_tanh())
    x = _float32_spread()
    y = torch.empty_like(x)
    own(len(x), x.data_ptr(), y.data_ptr())
    exact = torch.tanh(x.double()).float()
    apart = (y.view(torch.int32) - exact.view(torch.int32)).abs()
    assert apart.max() <= 1 and (apart > 0).sum() <= len(x) // 10**4
    assert torch.equal(torch.signbit(y), torch.signbit(exact))


def test_dyt_saturates_and_propagates_nan(backend):
    x = torch.tensor([[0.0, -0.0, 1e-30, 50.0, -50.0, float("inf"), float("-inf"), float("nan")]])
    y = AF.dyt(x, torch.tensor([1.0]))
    assert y[0, 0] == 0 and torch.signbit(y[0, 1]) and y[0, 2] == 1e-30
    assert y[0, 3] == 1 and y[0, 4] == -1 and y[0, 5] == 1 and y[0, 6] == -1
    assert y[0, 7].isnan()


def _float32_spread():
    """2^16 finite float32 values over every exponent: each high half of 16 bits, with a
    random low half."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32)
    low = torch.randint(0, 2**16, bits.shape, generator=torch.Generator().manual_seed(0))
    x = ((bits << 16) | low).view(torch.float32)
    return x[x.isfinite()].contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dyt_tanh_of_every_value(backend, dtype):
    """tanh, DyT without affine, of every finite float16 and bfloat16 value (and of 2^16
    float32 ones spread over every exponent) against tanh correctly rounded: the same
    value, or (in float16/bfloat16, whose kernels compute tanh in float32) its neighbour
    one ulp away, in at most 1 of 10^4 values; signed zeros and subnormals kept.  A
    float32 DyT on torch's tanh (the torch backend's, and numba's where torch has MKL's
    vsTanh: ``cpu.TORCH_FLOAT32_TANH``) is torch.tanh itself, bit for bit, held to
    torch's own bound of 1 ulp: how many values it misses depends on the CPU (MKL picks
    its code by CPU: 31 of these 98,048 on an Intel Xeon, fewer than 10 on an AMD EPYC)."""
    from addnorm.kernels import cpu

    if dtype == torch.float32:
        x = _float32_spread()
    else:
        x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        x = x[x.isfinite()]
    y = AF.dyt(x[None], torch.ones(1, dtype=dtype))[0]
    exact = torch.tanh(x.double()).to(dtype)
    assert torch.equal(torch.signbit(y), torch.signbit(exact))
    ints = {torch.float32: torch.int32}.get(dtype, torch.int16)
    apart = (y.view(ints).int() - exact.view(ints).int()).abs()  # in ulps: tanh keeps the sign
    assert apart.max() <= 1
    if dtype == torch.float32 and (backend == "torch" or cpu.TORCH_FLOAT32_TANH):
        assert torch.equal(y, torch.tanh(x))
    else:  # float32: the halfway cases of a 0.5-ulp tanh
        assert (apart > 0).sum() <= len(x) // 10**4, (x[apart > 0], y[apart > 0])


@fixture_ok
@given(d=st.integers(1, 40), dtype=st.sampled_from(DTYPES), tiny=st.booleans(),
       seed=st.integers(0, 2**16))
def test_scale_norm(backend, d, dtype, tiny, seed):
    assume(not (tiny and dtype == torch.float16))  # dx ~ g / eps = 2e5 overflows float16
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(6, d, generator=g, dtype=torch.float64) * (1e-7 if tiny else 3.0)).to(dtype)
    w = torch.tensor([1.7], dtype=dtype)

    def torch_scale_norm(x, w):
        acc = R.acc_dtype(x.dtype)
        xf = x.to(acc)
        return (w.to(acc) * xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-5)).to(x.dtype)

    ins, tins, rins = [leaf(x), leaf(w)], [leaf(x), leaf(w)], as64(x, w)
    ours, theirs, ref = AF.scale_norm(*ins), torch_scale_norm(*tins), R.scale_norm(*rins)
    assert_close(ours, theirs, ref, dtype)
    for name, o, t, r in zip(("dx", "dweight"), grads(ours, ins, dtype), grads(theirs, tins, dtype),
                             grads(ref, rins, dtype)):
        scale = 1e5 * 4 if tiny else None  # rnorm up to 1/eps amplifies rounding
        assert_close(o, t, r, dtype, what=name, floor_ulps=4.0 * (6 * d if name == "dweight" else 1),
                     scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_norm_puts_nan_where_torch_does(backend, dtype):
    """A NaN in a row makes the row NaN, an Inf its own place (the others times 1 / Inf),
    as torch's ops do; a NaN g every value, also a float32 g with the bits 0x7FFFFFFF,
    which a bfloat16 rounding without its NaN case carries into -0 (the stores skip that
    case only in rows whose norm, and g, are finite)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 300, generator=g).to(dtype)  # 300: several vectors and a tail
    x[1, 7] = float("nan")
    x[2, 250] = float("inf")
    w = torch.tensor([1.5], dtype=dtype)
    acc = R.acc_dtype(dtype)
    nan_g = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32).to(acc)
    for weight in (w, nan_g):
        y = AF.scale_norm(x, weight)
        expected = (x.to(acc) * (weight.to(acc) / x.to(acc).norm(dim=-1, keepdim=True).clamp_min(1e-5))).to(dtype)
        assert torch.equal(y.isnan(), expected.isnan())
        if weight is w:
            assert y[1].isnan().all() and y[2, 250].isnan() and not y[2, :250].isnan().any()
            assert torch.isfinite(y[[0, 3]]).all()
        else:
            assert y.isnan().all()
