"""Edge cases: D=1, empty batches, strides, huge D, large means, float16 overflow, NaN/Inf."""

import pytest
import torch
import torch.nn.functional as F

import addnorm
import addnorm.functional as AF
from conftest import DTYPES
from helpers import R, assert_close, grads, leaf, max_err, rstd_scale

ROW_NORMS = {
    "layer_norm": (lambda x, w, b: AF.layer_norm(x, x.shape[-1:], w, b),
                   lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b),
                   lambda x, w, b: R.layer_norm(x, x.shape[-1:], w, b)),
    "rms_norm": (lambda x, w, b: AF.rms_norm(x, x.shape[-1:], w, 1e-6),
                 lambda x, w, b: F.rms_norm(x, x.shape[-1:], w, 1e-6),
                 lambda x, w, b: R.rms_norm(x, x.shape[-1:], w, 1e-6)),
}


def _compare(kind, x, dtype, with_grads=True):
    ours_fn, torch_fn, ref_fn = ROW_NORMS[kind]
    d = x.shape[-1]
    g = torch.Generator().manual_seed(3)
    w = torch.randn(d, generator=g).to(dtype)
    b = torch.randn(d, generator=g).to(dtype)
    ins = [leaf(t) for t in (x, w, b)]
    tins = [leaf(t) for t in (x, w, b)]
    rins = [leaf(t.double()) for t in (x, w, b)]
    ours, theirs, ref = ours_fn(*ins), torch_fn(*tins), ref_fn(*rins)
    assert_close(ours, theirs, ref, dtype)
    if with_grads:
        rows = max(1, x.numel() // d)
        amplified = rstd_scale(x.reshape(-1, d), centered=kind == "layer_norm", eps=1e-6)
        for name, a, t, r in zip(("dx", "dw", "db"), grads(ours, ins, dtype), grads(theirs, tins, dtype),
                                 grads(ref, rins, dtype)):
            if kind == "rms_norm" and name == "db":
                continue
            ulps = 2.0 if name == "dx" else 2.0 * rows
            assert_close(a, t, r, dtype, what=name, floor_ulps=ulps, scale=amplified)
    return ours


@pytest.mark.parametrize("kind", ROW_NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_d_equals_one(backend, kind, dtype):
    _compare(kind, torch.randn(6, 1).to(dtype), dtype)


@pytest.mark.parametrize("kind", ROW_NORMS)
def test_empty_batch(backend, kind):
    y = _compare(kind, torch.randn(0, 3, 8), torch.float32)
    assert y.shape == (0, 3, 8)


def test_empty_batch_channel_norms(backend):
    x = torch.randn(0, 4, 5)
    assert AF.group_norm(x, 2).shape == x.shape
    assert AF.instance_norm(x).shape == x.shape
    bn = addnorm.BatchNorm1d(4)
    assert bn(x).shape == x.shape
    assert torch.equal(bn.running_mean, torch.zeros(4)) and torch.equal(bn.running_var, torch.ones(4))


@pytest.mark.parametrize("kind", ROW_NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_input(backend, kind, dtype):
    base = torch.randn(6, 40, 9).to(dtype)
    _compare(kind, base.transpose(1, 2), dtype)  # rows strided
    _compare(kind, base[:, ::2, :], dtype)  # rows skipped
    _compare(kind, torch.randn(1, 32).to(dtype).expand(5, 32), dtype)  # stride 0


@pytest.mark.parametrize("kind", ROW_NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_d(backend, kind, dtype):
    _compare(kind, torch.randn(3, 65_536 + 17).to(dtype), dtype)


# rows around mean 0 and std ~1: noise; a sorted ramp, whose first values lie far off the
# row's mean (the statistics' first pass, over the first of them, is then re-centred);
# noise with one large value first
_LARGE_MEAN_ROWS = {
    "noise": lambda d: torch.randn(16, d, dtype=torch.float64),
    "ramp": lambda d: torch.linspace(-1.7, 1.7, d, dtype=torch.float64) + 0.01 * torch.randn(16, d, dtype=torch.float64),
    "outlier first": lambda d: torch.randn(16, d, dtype=torch.float64).index_fill(1, torch.tensor([0]), 30.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [64, 512, 4096])
@pytest.mark.parametrize("rows", _LARGE_MEAN_ROWS)
def test_large_mean_keeps_precision(backend, dtype, d, rows):
    """Rows of mean 1e4 and std ~1.  Here torch's own CPU LayerNorm is off by ~4e-3 in
    float32, so the relative rule would be lax: ours must be within a few ulps."""
    x = (_LARGE_MEAN_ROWS[rows](d) + 1e4).to(dtype)
    w, b = torch.randn(d).to(dtype), torch.randn(d).to(dtype)
    ins = [leaf(t) for t in (x, w, b)]
    rins = [leaf(t.double()) for t in (x, w, b)]
    y, ref = AF.layer_norm(ins[0], (d,), *ins[1:]), R.layer_norm(rins[0], (d,), *rins[1:])
    eps = torch.finfo(dtype).eps
    scale = float(ref.detach().abs().max())
    assert max_err(y, ref) <= 4 * eps * scale
    g = grads(y, ins, dtype)
    g_ref = grads(ref, rins, dtype)
    for name, a, r in zip(("dx", "dw", "db"), g, g_ref):
        assert max_err(a, r) <= 8 * eps * max(1.0, float(r.abs().max())) * (1 if name == "dx" else 16), name


@pytest.mark.parametrize("mean", [0.5, 1.8])
@pytest.mark.parametrize("d", [32, 64, 128, 512, 513])
def test_layer_norm_values_near_the_mean_keep_their_bits(backend, d, mean):
    """Float32 outputs off the float64 result by more than 2 ulps of their own size: at
    most 3/4 as many as torch's own (the reference's two passes: ~0.6 as many).  The
    outputs near 0 (values near the row's mean) are where a rough mean costs bits:
    centring on the mean of a row's first 16 values left 0.74-0.87 as many as torch's.
    The numba kernel sums rows of up to ``_BLOCK`` values in float64 lanes
    (``cpu._moments``), a mean exact to float32's last bit: ~0.001 as many as torch's at
    mean 0.5, 0.03-0.08 at 1.8 (std 2: near the bound of that one pass, mean^2 <= var,
    whose cancellation costs var a bit); its two passes, at all lengths before, left
    0.16-0.65 as many."""
    x = torch.randn(4000, d, generator=torch.Generator().manual_seed(d)) * 2 + mean
    ref = torch.nn.functional.layer_norm(x.double(), (d,))
    ulp = (ref.abs() * 2.0**-23).clamp_min(2.0**-126)

    def off(y):
        return float(((y.double() - ref).abs() > 2 * ulp).double().mean())

    ours, torchs = off(AF.layer_norm(x, (d,))), off(torch.nn.functional.layer_norm(x, (d,)))
    assert ours <= (0.1 if backend == "numba" and d <= 512 else 0.75) * torchs


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_large_mean_in_channel_norms(backend, layout):
    """Channels of mean 1e4 and std 1 keep float32 precision too, in both layouts."""
    x = (torch.randn(4, 6, 8, 8, dtype=torch.float64) + 1e4).float().contiguous(memory_format=layout)
    x64 = x.double()
    eps = torch.finfo(torch.float32).eps
    for ours, ref in (
        (AF.group_norm(x, 3), R.group_norm(x64, 3)),
        (AF.instance_norm(x), R.instance_norm(x64)),
        (AF.batch_norm(x, None, None, training=True), R.batch_norm(x64, None, None, training=True)),
    ):
        assert max_err(ours, ref) <= 8 * eps * float(ref.abs().max())


@pytest.mark.parametrize("kind", ROW_NORMS)
def test_float16_squares_overflow(backend, kind):
    """300^2 overflows float16 (max 65504): statistics must accumulate in float32."""
    x = (torch.randn(8, 64) * 300).to(torch.float16)
    y = _compare(kind, x, torch.float16)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("kind", ROW_NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_stay_in_their_row(backend, kind, dtype):
    ours_fn, torch_fn, _ = ROW_NORMS[kind]
    x = torch.randn(4, 16).to(dtype)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    w, b = torch.ones(16, dtype=dtype), torch.zeros(16, dtype=dtype)
    ours, theirs = ours_fn(x, w, b), torch_fn(x, w, b)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.isfinite(ours[[0, 3]]).all(), "NaN/Inf leaked into other rows"
    assert ours[1].isnan().all()


CHANNEL_NORMS = {
    "group_norm": lambda f, x, w, b: f.group_norm(x, 4, w, b),
    "batch_norm_train": lambda f, x, w, b: f.batch_norm(x, None, None, w, b, True),
    "batch_norm_eval": lambda f, x, w, b: f.batch_norm(x, w.new_zeros(8), w.new_ones(8), w, b, False),
    "instance_norm": lambda f, x, w, b: f.instance_norm(x, None, None, w, b),
}


@pytest.mark.parametrize("kind", [  # on the xdist worker that compiles the same kernels
    pytest.param(k, marks=pytest.mark.xdist_group("batch_norm_kernels" if k.startswith("batch") else "group_norm_kernels"))
    for k in CHANNEL_NORMS
])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_stay_where_torch_puts_them_in_channel_norms(backend, kind, layout, dtype):
    """A NaN or an Inf in x, a NaN weight and a bias that a half dtype rounds to Inf: ours
    is NaN, Inf and finite where torch's is, and close to it elsewhere.  The NaN weight is
    a float32 one with the bits 0x7FFFFFFF, which a bfloat16 rounding without its NaN case
    carries into -0 (the channels-last kernels round without it where the map's
    coefficients, from x's own statistics, are finite)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 4, 4, generator=g)
    x[0, 1, 2, 3] = float("nan")
    x[1, 5, 0, 0] = float("inf")
    x = x.to(dtype).contiguous(memory_format=layout)
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    w[6] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)
    b[7] = 3.397e38  # above bfloat16's largest value and the next one's midpoint: Inf
    w, b = w.to(pdt), b.to(pdt)
    ours, theirs = CHANNEL_NORMS[kind](AF, x, w, b), CHANNEL_NORMS[kind](F, x, w, b)
    assert torch.equal(ours.isnan(), theirs.isnan())
    inf = theirs.isinf()
    assert torch.equal(ours.isinf(), inf) and torch.equal(ours[inf], theirs[inf])  # the same signs
    assert ours[:, 6].isnan().all()
    assert ours[:, 7].isinf().any() == (dtype in (torch.float16, torch.bfloat16))
    finite = theirs.isfinite()
    assert finite.any()
    torch.testing.assert_close(ours[finite].double(), theirs[finite].double(), rtol=2e-2, atol=2e-2)


def test_nan_in_add_norm_residual(backend):
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    r[0, 0] = float("nan")
    y, s = AF.add_rms_norm(x, r, 8)
    assert y[0].isnan().all() and torch.isfinite(y[1:]).all() and s[0, 0].isnan()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dyt_and_scale_norm_dtypes(backend, dtype):
    x = torch.randn(5, 12).to(dtype)
    a = torch.tensor([0.5], dtype=dtype)
    w, b = torch.randn(12).to(dtype), torch.randn(12).to(dtype)
    eager = (w.float() * torch.tanh(0.5 * x.float()) + b.float()).to(dtype)
    assert AF.dyt(x, a, w, b).dtype == dtype
    torch.testing.assert_close(AF.dyt(x, a, w, b), eager, rtol=1e-2, atol=1e-2)
    g = torch.tensor([2.0], dtype=dtype)
    y = AF.scale_norm(x, g)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float().norm(dim=-1), torch.full((5,), 2.0), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("make", [
    lambda m: m.GroupNorm(2, 4),
    lambda m: m.InstanceNorm2d(4, affine=True),
    lambda m: m.BatchNorm2d(4),
    lambda m: m.LayerNorm((4, 3, 3)),
], ids=["group_norm", "instance_norm", "batch_norm", "layer_norm"])
def test_empty_batch_parameter_grads_are_zero(backend, make, layout):
    """An empty batch has zero parameter gradients (torch.nn's), never uninitialised memory."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ours, theirs = make(addnorm), make(torch.nn)
    for trial in range(3):  # dirty the allocator between runs, so garbage would show
        torch.randn(4096).mul_(1e30)
        x = torch.randn(0, 4, 3, 3).contiguous(memory_format=fmt)
        xo, xt = leaf(x), leaf(x)
        ours(xo).sum().backward()
        try:
            theirs(xt).sum().backward()
        except IndexError:  # torch's InstanceNorm cannot take an empty batch at all
            assert isinstance(theirs, torch.nn.InstanceNorm2d)
            theirs = None
        for name, p in ours.named_parameters():
            assert torch.equal(p.grad, torch.zeros_like(p)), f"{name}.grad is {p.grad}"
            if theirs is not None:
                assert torch.equal(p.grad, dict(theirs.named_parameters())[name].grad), name
        assert xo.grad.shape == x.shape
        ours.zero_grad()
        theirs = make(torch.nn)


LONG_REDUCTIONS = {
    # (what, make x, the op on (x, w, b) for a given functional module, parameter shape)
    "layer_norm row of 2^22": (lambda g: torch.randn(2, 1 << 22, generator=g),
                               lambda m, x, w, b: m.layer_norm(x, x.shape[-1:], w, b), (1 << 22,)),
    "rms_norm row of 2^22": (lambda g: torch.randn(2, 1 << 22, generator=g) + 1,
                             lambda m, x, w, b: m.rms_norm(x, x.shape[-1:], w, 1e-6), (1 << 22,)),
    "group_norm group of 2^21": (lambda g: torch.randn(1, 4, 64, 64, 256, generator=g),
                                 lambda m, x, w, b: m.group_norm(x, 2, w, b), (4,)),
    "group_norm channels-last": (
        lambda g: torch.randn(2, 8, 512, 512, generator=g).contiguous(memory_format=torch.channels_last),
        lambda m, x, w, b: m.group_norm(x, 2, w, b), (8,)),
    "batch_norm channel of 2^21": (lambda g: torch.randn(32, 2, 256, 256, generator=g),
                                   lambda m, x, w, b: m.batch_norm(x, None, None, w, b, True), (2,)),
    "batch_norm channels-last": (
        lambda g: torch.randn(32, 2, 256, 256, generator=g).contiguous(memory_format=torch.channels_last),
        lambda m, x, w, b: m.batch_norm(x, None, None, w, b, True), (2,)),
}


@pytest.mark.parametrize("case", LONG_REDUCTIONS)
def test_long_reductions_keep_precision(backend, case):
    """Sums over millions of values: a single float32 accumulator drifts with the count
    (5e-5 over a 9.4M row); blocked sums must stay within the rule of torch's error."""
    make, op, pshape = LONG_REDUCTIONS[case]
    g = torch.Generator().manual_seed(5)
    x = make(g)
    w, b = torch.randn(pshape, generator=g), torch.randn(pshape, generator=g)
    dy = torch.randn(x.shape, generator=g)
    results = []
    for m, dtype in ((AF, torch.float32), (F, torch.float32), (F, torch.float64)):
        ins = [leaf(t.to(dtype)) for t in (x, w, b)]
        y = op(m, *ins)
        y.backward(dy.to(dtype))
        results.append([y] + [t.grad for t in ins])
    names = ("y", "dx", "dweight", "dbias")
    eps32 = torch.finfo(torch.float32).eps
    for name, ours, theirs, ref in zip(names, *results):
        if case.startswith("rms_norm") and name == "dbias":
            continue
        # torch's own channels-last GroupNorm drifts here (1e-4): then hold ours to a few
        # ulps of the result's scale, tighter than twice torch's error would be
        scale = float(ref.abs().max())
        if max_err(theirs, ref) > 16 * eps32 * scale:
            assert max_err(ours, ref) <= 16 * eps32 * scale, f"{case}: {name}"
        else:
            assert_close(ours, theirs, ref, torch.float32, what=f"{case}: {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_layer_norm_of_one_value_has_zero_gradient(backend, dtype, eps):
    """Over one value LayerNorm returns its bias whatever x is: dx is exactly 0, and with
    a fused residual d(x) is exactly the residual output's gradient (no rounding noise
    amplified by rstd = 1/sqrt(eps))."""
    g = torch.Generator().manual_seed(0)
    x = leaf(torch.randn(64, 1, generator=g).to(dtype))
    r = leaf(torch.randn(64, 1, generator=g).to(dtype))
    w = leaf(torch.randn(1, generator=g).to(dtype))
    b = leaf(torch.randn(1, generator=g).to(dtype))
    y = AF.layer_norm(x, (1,), w, b, eps)
    y.backward(torch.randn(y.shape, generator=g).to(dtype))
    assert torch.equal(x.grad, torch.zeros_like(x)), x.grad.abs().max()
    assert torch.equal(y, b.expand_as(y).detach())
    x.grad = None
    y, s = AF.add_layer_norm(x, r, (1,), w, b, eps)
    ds = torch.randn(s.shape, generator=g).to(dtype)
    torch.autograd.backward([y, s], [torch.randn(y.shape, generator=g).to(dtype), ds])
    assert torch.equal(x.grad, ds) and torch.equal(r.grad, ds)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_group_of_one_value_has_zero_gradient(backend, dtype, layout):
    """GroupNorm with one value per group (C = G, 1x1 spatial): the output is the bias,
    dx is exactly 0, in both layouts."""
    g = torch.Generator().manual_seed(1)
    x = leaf(torch.randn(8, 6, 1, 1, generator=g).to(dtype).contiguous(memory_format=layout))
    w = leaf(torch.randn(6, generator=g).to(dtype))
    b = leaf(torch.randn(6, generator=g).to(dtype))
    y = AF.group_norm(x, 6, w, b, eps=1e-12)
    y.backward(torch.randn(y.shape, generator=g).to(dtype))
    assert torch.equal(x.grad, torch.zeros_like(x)), x.grad.abs().max()
