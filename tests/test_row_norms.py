"""LayerNorm, RMSNorm and the fused add-norms against the float64 reference and torch.nn."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import addnorm.functional as AF
from addnorm import reference
from addnorm._backend import kernel
from helpers import R, as64, assert_close, grads, leaf, rstd_scale
from conftest import DTYPES

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def row_norm_cases(draw):
    batch = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    normalized = tuple(draw(st.lists(st.integers(1, 48), min_size=1, max_size=2)))
    dtype = draw(st.sampled_from(DTYPES))
    reduced = dtype in (torch.float16, torch.bfloat16)
    rms = draw(st.booleans())
    param_dtype = torch.float32 if reduced and draw(st.booleans()) else dtype
    if rms and draw(st.booleans()):  # torch.rms_norm takes a weight of any float dtype
        param_dtype = draw(st.sampled_from(DTYPES))
    return {
        "shape": batch + normalized,
        "normalized": normalized,
        "dtype": dtype,
        "param_dtype": param_dtype,
        "rms": rms,
        "residual": draw(st.booleans()),
        "affine": draw(st.sampled_from(["none", "weight", "weight+bias", "bias"])),
        "eps": draw(st.sampled_from([1e-5, 1e-6, 0.1, None])),
        "offset": draw(st.sampled_from([0.0, 0.0, 1.0])),
        "mean": draw(st.sampled_from([0.0, 3.0])),
        "seed": draw(st.integers(0, 2**16)),
        "transpose": draw(st.booleans()),
    }


def _make(case):
    g = torch.Generator().manual_seed(case["seed"])
    shape, d, dt, pdt = case["shape"], case["normalized"], case["dtype"], case["param_dtype"]

    def rand(shape, dtype, mean=0.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) + mean).to(dtype)

    x = rand(shape, dt, case["mean"])
    if case["transpose"] and x.ndim >= 2:  # a strided view of the same values
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    res = rand(shape, dt) if case["residual"] else None
    w = rand(d, pdt) if "weight" in case["affine"] else None
    b = rand(d, pdt) if "bias" in case["affine"] else None
    return x, res, w, b


def _torch_row_norm(case, x, res, w, b):
    """torch.nn.functional's spelling of the same thing (unfused: add, then norm)."""
    s = x if res is None else x + res
    if case["rms"]:
        # (w + offset in the dtype torch multiplies in: a weight in another dtype than the
        # input's is promoted with it, not rounded in its own)
        scale = w if w is None or not case["offset"] else w.to(torch.promote_types(w.dtype, s.dtype)) + case["offset"]
        y = F.rms_norm(s, case["normalized"], scale, case["eps"])
    else:
        if w is None and b is not None and b.dtype != s.dtype:
            # torch's CPU backward fails for a bias alone in another dtype than the input;
            # a weight of ones computes the same values and input and bias gradients
            w = torch.ones_like(b)
        y = F.layer_norm(s, case["normalized"], w, b, 1e-5 if case["eps"] is None else case["eps"])
    return (y, s) if res is not None else y


def _ours(case, x, res, w, b, fn_module=AF):
    n, eps, offset = case["normalized"], case["eps"], case["offset"]
    if case["rms"]:
        if res is None:
            return fn_module.rms_norm(x, n, w, eps, offset=offset)
        return fn_module.add_rms_norm(x, res, n, w, eps, offset=offset)
    eps = 1e-5 if eps is None else eps
    if res is None:
        return fn_module.layer_norm(x, n, w, b, eps)
    return fn_module.add_layer_norm(x, res, n, w, b, eps)


@pytest.mark.xdist_group("row_norm_kernels")  # one xdist worker compiles them (as test_eager_cpp)
@fixture_ok
@given(case=row_norm_cases())
def test_row_norm_forward_and_backward(backend, case):
    if case["rms"] and case["affine"] == "bias":
        case["affine"] = "weight"  # RMSNorm has no bias
    if case["rms"]:
        case["affine"] = case["affine"].replace("+bias", "")
    x, res, w, b = _make(case)
    if not case["rms"]:
        case["offset"] = 0.0
    ours_in = [leaf(t) if t is not None else None for t in (x, res, w, b)]
    torch_in = [leaf(t) if t is not None else None for t in (x, res, w, b)]
    ref_in = as64(x, res, w, b)
    # float64 reference with the eps the low-precision call resolves to (RMSNorm's None is
    # the input dtype's epsilon; LayerNorm's None is the 1e-5 every call here uses)
    ref_case = dict(case, eps=R.rms_eps(case["eps"], case["dtype"]) if case["rms"] else case["eps"])

    ours = _ours(case, *ours_in)
    theirs = _torch_row_norm(case, *torch_in)
    ref = _ours(ref_case, *ref_in, fn_module=R)
    outs = lambda o: o if isinstance(o, tuple) else (o,)
    for name, a, t, r in zip(("y", "residual_out"), outs(ours), outs(theirs), outs(ref)):
        assert_close(a, t, r, case["dtype"], what=name)
        assert a.shape == x.shape

    dt = case["dtype"]
    g_ours = grads(ours, ours_in, dt)
    g_torch = grads(theirs, torch_in, dt)
    g_ref = grads(ref, ref_in, dt)
    for name, a, t, r in zip(("dx", "dresidual", "dweight", "dbias"), g_ours, g_torch, g_ref):
        if r is None:
            assert a is None
            continue
        # parameter grads sum over rows: scale the floor with the row count
        d = math.prod(case["normalized"])
        rows = max(1, x.numel() // d)
        s = x if res is None else x.double() + res.double()
        scale = rstd_scale(s.reshape(-1, d), not case["rms"], ref_case["eps"] or 1e-5)
        param = name in ("dweight", "dbias")
        ulps = 2.0 * rows if param else 2.0
        # a parameter's gradient is rounded to its own dtype, the coarser of the two sets the floor
        coarser = max(dt, case["param_dtype"], key=lambda t: torch.finfo(t).eps) if param else dt
        assert_close(a, t, r, coarser, what=name, floor_ulps=ulps, scale=scale)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck_float64(backend, rms, residual):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    if rms:
        f = (lambda x, r, w: AF.add_rms_norm(x, r, (4, 6), w, 1e-5, offset=0.5)) if residual else (
            lambda x, w: AF.rms_norm(x, (4, 6), w, 1e-5, offset=0.5))
        args = (x, r, w) if residual else (x, w)
    else:
        f = (lambda x, r, w, b: AF.add_layer_norm(x, r, (4, 6), w, b)) if residual else (
            lambda x, w, b: AF.layer_norm(x, (4, 6), w, b))
        args = (x, r, w, b) if residual else (x, w, b)
    assert torch.autograd.gradcheck(f, args)


def test_gradcheck_only_some_outputs_used(backend):
    """The residual output unused, or only it used: the unused one's grad is zero."""
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    r = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r: AF.add_layer_norm(x, r, 8)[0], (x, r))
    assert torch.autograd.gradcheck(lambda x, r: AF.add_rms_norm(x, r, 8)[1] * 2, (x, r))


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frozen", ["x", "inputs", "weight", "bias", "params"])
def test_backward_computes_only_what_autograd_asks_for(backend, rms, residual, dtype, frozen):
    """An input that needs no gradient (frozen parameters, data fed to a first norm) gets
    none, and the backward skips its work; the gradients it does compute are bit-equal to
    those of the backward that computes all of them.  70 rows: several row blocks."""
    g = torch.Generator().manual_seed(3)
    x, res = (torch.randn(70, 300, generator=g).to(dtype) + 2.0 for _ in range(2))
    w, b = (torch.randn(300, generator=g).to(dtype) for _ in range(2))
    names = ("x", "residual", "weight", "bias")
    frozen_names = {"inputs": ("x", "residual"), "params": ("weight", "bias")}.get(frozen, (frozen,))

    def run(frozen_names):
        ins = [t.clone().requires_grad_(name not in frozen_names) for name, t in zip(names, (x, res, w, b))]
        if rms:
            out = AF.add_rms_norm(*ins[:2], 300, ins[2]) if residual else AF.rms_norm(ins[0], 300, ins[2])
        else:
            out = AF.add_layer_norm(*ins[:2], 300, *ins[2:]) if residual else AF.layer_norm(ins[0], 300, *ins[2:])
        grads(out, ins if residual else ins[:1] + ins[2:], dtype)
        return [t.grad for t in ins]

    full, partial = run(()), run(frozen_names)
    for name, a, p in zip(names, full, partial):
        used = (residual or name != "residual") and not (rms and name == "bias")
        if name in frozen_names or not used:
            assert p is None, name
        else:
            assert torch.equal(a, p), name


def test_reference_gradcheck():
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: R.add_layer_norm(*a[:2], 7, *a[2:]), (x, r, w, b))
    assert torch.autograd.gradcheck(lambda x, r, w: R.add_rms_norm(x, r, 7, w, offset=1.0), (x, r, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms_level", [0.003, 0.03, 0.3])
@pytest.mark.parametrize("fused", [False, True])
def test_rms_norm_default_eps_is_torchs(backend, dtype, rms_level, fused):
    """eps=None: at small RMS eps decides the output.  Compared with torch.nn.RMSNorm
    itself (not only our reference, which could share a wrong default)."""
    import addnorm

    g = torch.Generator().manual_seed(int(rms_level * 1000))
    x = (torch.randn(6, 512, generator=g, dtype=torch.float64) * rms_level / 2).to(dtype)
    res = (torch.randn(6, 512, generator=g, dtype=torch.float64) * rms_level / 2).to(dtype)
    theirs = torch.nn.RMSNorm(512, dtype=dtype)
    ours = (addnorm.AddRMSNorm if fused else addnorm.RMSNorm)(512, dtype=dtype)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(512, generator=g).to(dtype))
        ours.weight.copy_(theirs.weight)
    s = x + res if fused else x
    expected = theirs(s)
    got = ours(x, res)[0] if fused else ours(x)
    functional = (AF.add_rms_norm(x, res, (512,), ours.weight)[0] if fused
                  else AF.rms_norm(x, (512,), ours.weight))
    # the float64 reference with torch's eps, as the rule of helpers.assert_close wants
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    ref = R.rms_norm(s.double(), (512,), ours.weight.double(), eps)
    assert_close(got, expected, ref, dtype)
    assert_close(functional, expected, ref, dtype)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("cast", [reference.CAST_ONCE, reference.CAST_EACH | reference.TORCH_ORDER])
@pytest.mark.parametrize("shape", [(2, 3, 40), (40,)])
def test_kernels_take_rows_of_any_leading_shape(backend, rms, residual, cast, shape):
    """A row norm's kernels normalize the last dim of an input of any leading shape, none
    included (``functional`` hands a (batch, tokens, d) input over as it is, without
    reshapes): outputs in the input's shape, statistics (N,) for its N rows, and the
    values and gradients of the same rows given as (N, d)."""
    g = torch.Generator().manual_seed(0)
    x, res, dy, dr = (torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(4))
    n = x.numel() // 40
    w = torch.randn(40, generator=g).to(torch.bfloat16)
    b = None if rms else torch.randn(40, generator=g).to(torch.bfloat16)
    res, dr = (res, dr) if residual else (None, None)
    forward, backward = kernel(backend, "row_norm_forward"), kernel(backend, "row_norm_backward")

    def rows(t):
        return None if t is None else t.reshape(n, 40)

    def run(x, res, dy, dr):
        y, r, mean, rstd = forward(x, res, w, b, 1e-5, 0.5, rms, cast)
        grads = backward(dy, dr, x if r is None else r, w, mean, rstd, 0.5, rms, cast, b)
        return [y, r, mean, rstd, *grads]

    got, expected = run(x, res, dy, dr), run(rows(x), rows(res), rows(dy), rows(dr))
    names = ["y", "r", "mean", "rstd", "dx", "dweight", "dbias"]
    shapes = [x.shape, x.shape, (n,), (n,), x.shape, (40,), (40,)]
    for name, a, e, shape in zip(names, got, expected, shapes):
        assert (a is None) == (e is None), name
        if a is not None:
            assert a.shape == shape, name
            assert_close(a, e.reshape(shape), e.reshape(shape).double(), a.dtype, what=name)


@pytest.mark.native_rule
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape", [(1,), (3, 8), (2, 3, 8)])
def test_layer_norm_of_a_half_input_with_a_float32_bias_alone(fused, shape):
    """torch's CPU LayerNorm backward fails for a bfloat16 input with a float32 bias and no
    weight (at every size), so the small inputs that run torch's kernel (the backend left
    to addnorm) run ours there: gradients as with a weight of ones, which torch computes."""
    g = torch.Generator().manual_seed(3)
    d = shape[-1]
    base = [torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(d, generator=g)]
    x, res = (t.to(torch.bfloat16).requires_grad_() for t in base[:2])
    b = base[2].clone().requires_grad_()
    if fused:
        y, r = AF.add_layer_norm(x, res, d, None, b)
        outs, ins = (y, r), (x, res, b)
    else:
        outs, ins = (AF.layer_norm(x, d, None, b),), (x, b)
    got = torch.autograd.grad(outs, ins, [torch.ones_like(o) for o in outs])
    x2, res2, b2 = (t.detach().requires_grad_() for t in (x, res, b))
    s = x2 + res2 if fused else x2
    y2 = F.layer_norm(s, (d,), torch.ones(d), b2)
    outs2, ins2 = ((y2, s), (x2, res2, b2)) if fused else ((y2,), (x2, b2))
    expected = torch.autograd.grad(outs2, ins2, [torch.ones_like(o) for o in outs2])
    for name, a, e in zip(("dx", "dresidual", "dbias") if fused else ("dx", "dbias"), got, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        torch.testing.assert_close(a, e, atol=2e-2, rtol=2e-2, msg=name)


@pytest.mark.parametrize("rms", [False, True])
def test_double_backward_of_rows_of_any_leading_shape(backend, rms):
    """gradgradcheck of a (batch, tokens, d) input normalized over its last dim, whose
    rows the ops take as they are: the recorded backward's statistics reshaped to them."""
    g = torch.Generator().manual_seed(2)
    x, res = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    if rms:
        f = lambda x, res, w: AF.add_rms_norm(x, res, 5, w, 1e-5)  # noqa: E731
    else:
        f = lambda x, res, w: AF.add_layer_norm(x, res, 5, w, w * 0.5)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (x, res, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rms", [False, True])
def test_output_bits_do_not_depend_on_autograd_or_the_batch(backend, dtype, rms):
    """The same row gives the same bits whether autograd records (the kernel then also
    stores statistics) or not, and alone or among other rows."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 48, generator=g) + 3).to(dtype)
    w = torch.randn(48, generator=g).to(dtype).requires_grad_()
    b = None if rms else torch.randn(48, generator=g).to(dtype)
    f = (lambda t: AF.rms_norm(t, 48, w)) if rms else (lambda t: AF.layer_norm(t, 48, w, b))
    recorded = f(x)
    with torch.no_grad():
        assert torch.equal(recorded, f(x))
        assert torch.equal(recorded[:3], f(x[:3]))
        assert torch.equal(recorded, f(torch.cat([x, torch.randn(40, 48, generator=g).to(dtype)]))[:16])
