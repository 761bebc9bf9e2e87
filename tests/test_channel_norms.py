"""BatchNorm, InstanceNorm and GroupNorm against the float64 reference and torch.nn."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import addnorm
import addnorm.functional as AF
from addnorm.ops import memory_format
from conftest import DTYPES
from helpers import R, as64, assert_close, grads, leaf, rstd_scale

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
# The GroupNorm kernels (InstanceNorm runs them too) compile on their first calls, ~1 min
# cold for the dtypes and layouts below: these tests run on one pytest-xdist worker
# (``make test``: --dist loadgroup), so that the other does not compile the same kernels
# beside it.
gn_kernels = pytest.mark.xdist_group("group_norm_kernels")
bn_kernels = pytest.mark.xdist_group("batch_norm_kernels")  # the same for BatchNorm's


@st.composite
def channel_cases(draw):
    spatial = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=3)))
    groups = draw(st.integers(1, 3))
    channels = groups * draw(st.integers(1, 3))
    n = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(DTYPES))
    reduced = dtype in (torch.float16, torch.bfloat16)
    return {
        "shape": (n, channels) + spatial,
        "groups": groups,
        "dtype": dtype,
        "param_dtype": torch.float32 if reduced and draw(st.booleans()) else dtype,
        "affine": draw(st.booleans()),
        "layout": draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
        "mean": draw(st.sampled_from([0.0, 5.0])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _make(case):
    g = torch.Generator().manual_seed(case["seed"])
    shape, dt, pdt = case["shape"], case["dtype"], case["param_dtype"]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + case["mean"]).to(dt)
    if case["layout"] == "channels_last" and x.ndim in (4, 5):
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    elif case["layout"] == "strided":
        x = torch.cat([x, x], dim=1)[:, ::2]  # every other channel: not contiguous
        x.copy_((torch.randn(shape, generator=g, dtype=torch.float64) + case["mean"]).to(dt))
    c = shape[1]
    w = torch.randn(c, generator=g, dtype=torch.float64).to(pdt) if case["affine"] else None
    b = torch.randn(c, generator=g, dtype=torch.float64).to(pdt) if case["affine"] else None
    return x, w, b


def _check(case, ours_fn, torch_fn, ref_fn, x, *params, stat_view=None):
    """stat_view: x (float64) viewed so its statistics reduce over the last dim; with it,
    dx's tolerance scales with the largest rstd, which amplifies rounding (a group of
    one value has rstd = 1/sqrt(eps) and a dx of exactly 0)."""
    dt = case["dtype"]
    ours_in = [leaf(x)] + [None if p is None else leaf(p) for p in params]
    torch_in = [leaf(x)] + [None if p is None else leaf(p) for p in params]
    ref_in = as64(x, *params)
    ours, theirs, ref = ours_fn(*ours_in), torch_fn(*torch_in), ref_fn(*ref_in)
    assert_close(ours, theirs, ref, dt, what="y")
    # channels-last in, channels-last out (torch's InstanceNorm drops it); else contiguous
    assert ours.is_contiguous(memory_format=memory_format(x))
    per_param = max(1, x.numel() // x.shape[1])
    amplified = None if stat_view is None else rstd_scale(stat_view(x))
    for name, a, t, r in zip(("dx", "dweight", "dbias"), grads(ours, ours_in, dt),
                             grads(theirs, torch_in, dt), grads(ref, ref_in, dt)):
        if r is None:
            assert a is None
            continue
        ulps = 4.0 if name == "dx" else 4.0 * per_param
        assert_close(a, t, r, dt, what=name, floor_ulps=ulps, scale=amplified)


@gn_kernels
@fixture_ok
@given(case=channel_cases())
def test_group_norm(backend, case):
    x, w, b = _make(case)
    G = case["groups"]
    # torch refuses exactly this shape ("more than 1 value per channel"); see test_errors
    assume(x.numel() // G != 1)
    _check(case, lambda x, w, b: AF.group_norm(x, G, w, b), lambda x, w, b: F.group_norm(x, G, w, b),
           lambda x, w, b: R.group_norm(x, G, w, b), x, w, b,
           stat_view=lambda x: x.reshape(x.shape[0], G, -1))


@gn_kernels
@fixture_ok
@given(case=channel_cases(), threads=st.integers(2, 5))
def test_group_norm_split_over_threads(monkeypatch, case, threads):
    """numba's channels-last GroupNorm with fewer samples than threads splits each
    sample's rows into chunks, one per thread (``cpu._CL_SPLIT_FROM``, down to every size
    here; chunks without rows where a sample has fewer rows than threads): the same
    checks as ``test_group_norm``."""
    from addnorm.kernels import cpu

    monkeypatch.setattr(cpu, "_CL_SPLIT_FROM", 0)
    monkeypatch.setattr(cpu, "_threads", lambda work: threads)
    assume(case["shape"][0] < threads and len(case["shape"]) in (4, 5))
    case = dict(case, layout="channels_last")
    with addnorm.backend("numba"):
        test_group_norm.hypothesis.inner_test(None, case)


@bn_kernels
@fixture_ok
@given(case=channel_cases(), training=st.booleans())
def test_batch_norm(backend, case, training):
    x, w, b = _make(case)
    if training and x.numel() // x.shape[1] == 1:
        training = False
    c = x.shape[1]
    g = torch.Generator().manual_seed(7)
    pdt = case["param_dtype"]
    stats = (torch.randn(c, generator=g, dtype=torch.float64).to(pdt),
             torch.rand(c, generator=g, dtype=torch.float64).add(0.5).to(pdt))
    ours_stats, torch_stats = [s.clone() for s in stats], [s.clone() for s in stats]
    ref_stats = [s.double() for s in stats]
    _check(case,
           lambda x, w, b: AF.batch_norm(x, *ours_stats, w, b, training, 0.3),
           lambda x, w, b: F.batch_norm(x, *torch_stats, w, b, training, 0.3),
           lambda x, w, b: R.batch_norm(x, *ref_stats, w, b, training, 0.3), x, w, b,
           stat_view=lambda x: x.transpose(0, 1).reshape(x.shape[1], -1))
    for ours, theirs, ref in zip(ours_stats, torch_stats, ref_stats):
        assert_close(ours, theirs, ref, case["dtype"], what="running stat", floor_ulps=4)


@gn_kernels
@fixture_ok
@given(case=channel_cases(), use_input_stats=st.booleans(), track=st.booleans())
def test_instance_norm(backend, case, use_input_stats, track):
    x, w, b = _make(case)
    if x[0, 0].numel() == 1:
        use_input_stats = False
    if not use_input_stats:
        track = True
    c = x.shape[1]
    pdt = case["param_dtype"]
    stats = (torch.zeros(c, dtype=pdt), torch.ones(c, dtype=pdt)) if track else (None, None)
    ours_s, torch_s = [s if s is None else s.clone() for s in stats], [s if s is None else s.clone() for s in stats]
    ref_s = [s if s is None else s.double() for s in stats]
    _check(case,
           lambda x, w, b: AF.instance_norm(x, *ours_s, w, b, use_input_stats, 0.2),
           lambda x, w, b: F.instance_norm(x, *torch_s, w, b, use_input_stats, 0.2),
           lambda x, w, b: R.instance_norm(x, *ref_s, w, b, use_input_stats, 0.2), x, w, b,
           stat_view=lambda x: x.reshape(x.shape[0], x.shape[1], -1))
    if track:
        for ours, theirs, ref in zip(ours_s, torch_s, ref_s):
            assert_close(ours, theirs, ref, case["dtype"], what="running stat", floor_ulps=4)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_gradcheck(backend, training):
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    f = lambda x, w, b: AF.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_group_and_instance_norm_gradcheck(backend, groups):
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: AF.group_norm(x, groups, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: AF.instance_norm(x, None, None, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x: AF.group_norm(x, groups), (x,))


def _hard_statistics(pattern: str, n: int) -> torch.Tensor:
    """float32 (n, 64, 32, 32) channels-last data whose variance float32 sums get wrong
    unless they are taken around a shift near each run's mean."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, 32, 32, generator=g)
    if pattern == "offset":  # mean 1e4, std 1: E[x^2] - E[x]^2 in float32 loses every digit
        x += 1e4
    elif pattern == "block_outliers":  # every 64th position (a channels-last block's first row)
        x.view(n, 64, -1)[:, :, ::64] += 1e3
    elif pattern == "one_outlier":  # the very first value of every channel
        x[:, :, 0, 0] = 1e6
    elif pattern == "bimodal":
        x += 1e4 * (torch.rand(x.shape, generator=g) > 0.5)
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not addnorm.backends()["numba"], reason="numba not installed")
@pytest.mark.parametrize("pattern", ["offset", "block_outliers", "one_outlier", "bimodal"])
@pytest.mark.parametrize("n", [1, 4])
def test_channels_last_statistics_survive_offsets_and_outliers(monkeypatch, pattern, n):
    """numba's channels-last statistics (GroupNorm, InstanceNorm, BatchNorm in training;
    one sample split over threads) stay within a few float32 ulps of float64 on data
    where torch's own channels-last GroupNorm (E[x^2] - E[x]^2) is off by 100x its output
    and a shift taken from a block's first value lost ~40 ulps."""
    from addnorm.kernels import cpu

    monkeypatch.setattr(cpu, "_CL_SPLIT_FROM", 0)  # one sample: split over the threads
    x = _hard_statistics(pattern, n)
    w, b = torch.randn(64), torch.randn(64)
    x64, w64, b64 = as64(x, w, b)
    cases = [
        (lambda x, w, b: AF.group_norm(x, 32, w, b), lambda x, w, b: F.group_norm(x, 32, w, b)),
        (lambda x, w, b: AF.instance_norm(x, None, None, w, b), lambda x, w, b: F.instance_norm(x, None, None, w, b)),
        (lambda x, w, b: AF.batch_norm(x, None, None, w, b, True), lambda x, w, b: F.batch_norm(x, None, None, w, b, True)),
    ]
    with addnorm.backend("numba"), torch.no_grad():
        for ours, reference in cases:
            ref = reference(x64, w64, b64)
            err = ((ours(x, w, b).double() - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-6, (pattern, err)


@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [0, 1, 3])  # 0: BatchNorm's per-channel stats (C,); else InstanceNorm's (N, C)
@pytest.mark.parametrize("n, momentum", [(1, 0.1), (50, 0.3), (7, 1.0), (2, 0.0)])
def test_running_stats_kernel_matches_the_reference(stat_dtype, rows, n, momentum):
    """The CPU kernel's in-place update of the running statistics: the reference's torch
    ops to the bit for per-channel statistics (within a few ulps of the values where it
    averages samples, in float64 against their float32 mean), counted as an in-place
    write."""
    from addnorm import reference
    from addnorm.kernels import cpu

    acc = torch.float64 if stat_dtype is torch.float64 else torch.float32
    g = torch.Generator().manual_seed(rows * 100 + n)
    shape = (37,) if rows == 0 else (rows, 37)
    mean = torch.randn(shape, generator=g, dtype=acc) * 3
    var = torch.rand(shape, generator=g, dtype=acc) * 2
    running = [torch.randn(37, generator=g, dtype=acc).to(stat_dtype), torch.rand(37, generator=g).to(stat_dtype)]
    ours, ref = [r.clone() for r in running], [r.clone() for r in running]
    versions = [r._version for r in ours]
    cpu.update_running_stats(*ours, mean, var, n, momentum)
    reference.update_running_stats(*ref, mean, var, n, momentum)
    assert [r._version for r in ours] > versions
    for a, b in zip(ours, ref):
        if rows <= 1:
            assert torch.equal(a, b), (a - b).abs().max()
        else:
            scale = max(float(t.abs().max()) for t in (mean, var, *running))
            torch.testing.assert_close(a, b, rtol=0, atol=4 * torch.finfo(stat_dtype).eps * scale)
