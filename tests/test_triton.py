"""The triton backend's kernels, run on CPU tensors through Triton's interpreter: values
and gradients against the float64 reference, so GPU code cannot rot unseen on a machine
without a GPU.  With ``ADDNORM_TEST_DEVICE=cuda`` the same tests run the compiled kernels
on a GPU instead (and ``tests/test_cuda.py`` what only a GPU can check).

The interpreter rounds float32 to bfloat16 by truncation where a GPU rounds to nearest
even, so bfloat16 results are compared within two bfloat16 steps, not bit for bit.
"""

import os

DEVICE = os.environ.get("ADDNORM_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before addnorm's Triton kernels are defined

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import addnorm  # noqa: E402
import addnorm.functional as AF  # noqa: E402
from addnorm.kernels import gpu  # noqa: E402
from helpers import assert_relative  # noqa: E402

pytestmark = pytest.mark.skipif(
    not gpu._INTERPRETED if DEVICE == "cpu" else not torch.cuda.is_available(),
    reason="TRITON_INTERPRET was set to something else before this module" if DEVICE == "cpu"
    else f"ADDNORM_TEST_DEVICE={DEVICE}, and torch sees no GPU",
)


def _on(tensors):
    """The tests' inputs (drawn on the CPU, from a seeded generator) on the tested device."""
    return [t.to(DEVICE) for t in tensors]


def _side(t, side, dtype):
    """A copy of a (CPU) input for one side of a comparison: the kernels' on the tested
    device, the float64 reference's on the CPU (torch's CUDA float64 kernels are no
    exact reference: GroupNorm's one-pass variance loses ~1e-11 where a group's values
    are close)."""
    return t.to("cpu" if side == "torch" else DEVICE, dtype, copy=True)

# per dtype: tolerance relative to the reference's largest value
_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _call(rms, fused, x, res, w, b):
    """(y, r or None) of the functional op the flags name."""
    d = x.shape[-1]
    if rms:
        return AF.add_rms_norm(x, res, d, w, 1e-5) if fused else (AF.rms_norm(x, d, w, 1e-5), None)
    return AF.add_layer_norm(x, res, d, w, b, 1e-5) if fused else (AF.layer_norm(x, d, w, b, 1e-5), None)


def _close(ours, ref, dtype, what, terms=1.0):
    # ``terms`` about 1 unless given: RMSNorm's dx for a row of one value is a difference
    # of two terms of size |dy| that cancel to ~eps / x^3
    assert_relative(ours, ref, _TOL[dtype], what, terms)


@pytest.mark.parametrize("d, max_block", [(1, 4096), (7, 4096), (64, 4096), (100, 4096), (100, 16), (33, 8)])
@pytest.mark.parametrize("rms", [True, False])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_values_and_gradients_match_the_float64_reference(monkeypatch, d, max_block, rms, fused, dtype):
    """Rows that fit one block and rows walked in several (``_MAX_BLOCK`` lowered), widths
    that are and are not powers of two, 1 included."""
    monkeypatch.setattr(gpu, "_MAX_BLOCK", max_block)
    g = torch.Generator().manual_seed(d)
    n = 5
    base = [torch.randn(n, d, generator=g) * 2 + 0.5, torch.randn(n, d, generator=g),
            torch.randn(d, generator=g), torch.randn(d, generator=g)]
    cot = [torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)]
    outs = {}
    for side, dt in (("triton", dtype), ("torch", torch.float64)):
        x, res, w, b = (_side(t, side, dt).requires_grad_() for t in base)
        with addnorm.backend(side):
            y, r = _call(rms, fused, x, res if fused else None, w, None if rms else b)
        loss = (y.double() * cot[0].to(y.device, torch.float64)).sum()
        if r is not None:
            loss = loss + (r.double() * cot[1].to(y.device, torch.float64)).sum()
        loss.backward()
        grads = [x.grad, res.grad if fused else None, w.grad, None if rms else b.grad]
        outs[side] = [y, r] + grads
    # dx is rstd * (terms of size |dy * w|) that cancel: a row of one value (RMSNorm) or
    # of close values has rstd up to 1/sqrt(eps); a GPU's fused multiply-adds round such
    # differences apart from the CPU's separate products and sums
    r64 = base[0].double() + (base[1].double() if fused else 0)
    var = r64.square().mean(-1) if rms else r64.var(-1, unbiased=False)
    rstd = (var + 1e-5).rsqrt().max().item()
    terms = {"dx": rstd * cot[0].abs().max().item() * base[2].abs().max().item()}
    terms["dresidual"] = terms["dx"]
    names = ["y", "r", "dx", "dresidual", "dweight", "dbias"]
    for name, ours, ref in zip(names, outs["triton"], outs["torch"]):
        assert (ours is None) == (ref is None), name
        if ours is not None:
            assert ours.dtype == dtype, name
            _close(ours.detach(), ref.detach(), dtype, name, terms.get(name, 1.0))


def test_gemmas_offset_and_no_weight():
    x, w = _on([torch.randn(3, 40), torch.randn(40)])
    with addnorm.backend("triton"):
        y = AF.rms_norm(x, 40, w, 1e-6, offset=1.0)
        y0 = AF.rms_norm(x, 40, None, 1e-6)
    with addnorm.backend("torch"):
        ref, ref0 = AF.rms_norm(x, 40, w, 1e-6, offset=1.0), AF.rms_norm(x, 40, None, 1e-6)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y0, ref0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_rows_of_any_leading_shape(rms, fused):
    """The kernels normalize the last dim of an input of any leading shape, as
    ``functional`` hands a (batch, tokens, d) input over: outputs in its shape,
    statistics (N,), and the values and gradients of the same rows given as (N, d)."""
    g = torch.Generator().manual_seed(4)
    x, res, dy = _on([torch.randn(2, 3, 24, generator=g) for _ in range(3)])
    w, b = _on([torch.randn(24, generator=g), torch.randn(24, generator=g)])
    res, b = res if fused else None, None if rms else b

    def run(x, res, dy):
        y, r, mean, rstd = gpu.row_norm_forward(x, res, w, b, 1e-5, 0.0, rms)
        return [y, r, mean, rstd, *gpu.row_norm_backward(dy, None, x if r is None else r, w, mean, rstd, 0.0, rms, 0, b)]

    got = run(x, res, dy)
    expected = run(*(None if t is None else t.reshape(6, 24) for t in (x, res, dy)))
    for name, a, e in zip(["y", "r", "mean", "rstd", "dx", "dweight", "dbias"], got, expected):
        assert (a is None) == (e is None), name
        if a is not None:
            assert a.shape == (x.shape if e.shape == (6, 24) else e.shape), name
            torch.testing.assert_close(a.reshape(e.shape), e, rtol=1e-6, atol=1e-6, msg=name)


def test_only_the_gradients_autograd_asks_for():
    x, w, b = _on([torch.randn(4, 24), torch.randn(24), torch.randn(24)])
    x.requires_grad_(), b.requires_grad_()  # w frozen
    with addnorm.backend("triton"):
        AF.layer_norm(x, 24, w, b).sum().backward()
    ref_x, ref_b = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.nn.functional.layer_norm(ref_x, (24,), w, ref_b).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, ref_b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["gemma", "llama", "none"])
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("max_block", [4096, 16])
def test_casting_modes_round_where_the_family_rounds(monkeypatch, mode, weight_dtype, fused, max_block):
    """Each mode's rounding in the kernel, forward and backward, against the reference
    backend's (torch ops) in float16, whose rounding the interpreter does as a GPU does
    (to nearest even).  The inputs are multiples of 1/8, so every order of summing the
    squares gives the same statistic and the forward must match bit for bit; the
    gradients are sums in another order, so they match within a few roundings, where
    skipping a rounding misses by a hundred times more."""
    monkeypatch.setattr(gpu, "_MAX_BLOCK", max_block)
    g = torch.Generator().manual_seed(3)
    n, d = 6, 48
    base = [torch.randint(-16, 17, (n, d), generator=g) / 8, torch.randint(-16, 17, (n, d), generator=g) / 8,
            torch.randn(d, generator=g) + 1]
    cot = [torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)]
    base, cot = _on(base), _on(cot)
    outs = {}
    for side in ("triton", "torch"):
        x, res = (t.to(torch.float16).requires_grad_() for t in base[:2])
        w = base[2].to(weight_dtype, copy=True).requires_grad_()  # a leaf of its own per side
        with addnorm.backend(side):
            if fused:
                y, r = AF.add_rms_norm(x, res, d, w, 1e-6, casting_mode=mode)
            else:
                y, r = AF.rms_norm(x, d, w, 1e-6, casting_mode=mode), None
        loss = (y.double() * cot[0].double()).sum() + (0 if r is None else (r.double() * cot[1].double()).sum())
        loss.backward()
        outs[side] = y, r, x.grad, w.grad
    (y, r, dx, dw), (ref_y, ref_r, ref_dx, ref_dw) = outs["triton"], outs["torch"]
    assert y.dtype == ref_y.dtype  # "llama" beside a float32 weight: float32, as w * xhat.to(float16)
    assert torch.equal(y, ref_y), (y.double() - ref_y.double()).abs().max()
    if fused:
        assert torch.equal(r, ref_r)
    torch.testing.assert_close(dx, ref_dx, rtol=2e-3, atol=2e-3)
    # most of dx bit for bit (its sums may round apart in a last bit); without the
    # rounding of dy * w to float16, 17-32% of it moved by a float16 step (measured)
    same = (dx == ref_dx).double().mean().item()
    assert same >= 0.95, f"dx: {same:.0%} bit-equal"
    # the weight's gradient sums dy * xhat; xhat unrounded would move it by ~1e-3
    torch.testing.assert_close(dw.double(), ref_dw.double(), rtol=2e-5 if weight_dtype is torch.float32 else 2e-3,
                               atol=1e-5)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors")
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(gpu, "_INTERPRETED", False)
    with addnorm.backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        AF.rms_norm(torch.randn(2, 8), 8)


_GROUP_CASES = [((2, 6, 5, 7), 3, None), ((2, 6, 5, 7), 3, torch.channels_last), ((3, 4, 10), 2, None),
                ((2, 140, 3, 1), 2, None), ((2, 140, 3, 1), 2, torch.channels_last), ((4, 8), 4, None),
                ((2, 5, 4, 3), 5, torch.channels_last), ((2, 4, 3, 2, 2), 2, torch.channels_last_3d)]


@pytest.mark.parametrize("shape, groups, layout", _GROUP_CASES)
@pytest.mark.parametrize("tile", [4096, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_group_norm_matches_the_float64_reference(monkeypatch, shape, groups, layout, tile, dtype):
    """Groups walked in one tile and in many (``_GROUP_TILE`` lowered; 70 channels a group
    is more than one tile's 64), contiguous and channels-last, G = C (InstanceNorm's
    statistics), values and gradients."""
    monkeypatch.setattr(gpu, "_GROUP_TILE", tile)
    g = torch.Generator().manual_seed(len(shape) * 7 + groups)
    c = shape[1]
    base = [torch.randn(shape, generator=g) * 3 + 1, torch.randn(c, generator=g), torch.randn(c, generator=g)]
    cot = torch.randn(shape, generator=g)
    outs = {}
    for side, dt in (("triton", dtype), ("torch", torch.float64)):
        x, w, b = (_side(t, side, dt) for t in base)
        if layout is not None:
            x = x.contiguous(memory_format=layout)
        x, w, b = (t.requires_grad_() for t in (x, w, b))
        with addnorm.backend(side):
            y = AF.group_norm(x, groups, w, b, 1e-5)
        if layout is not None:
            assert y.is_contiguous(memory_format=layout)
        (y.double() * cot.to(y.device, torch.float64)).sum().backward()
        outs[side] = [y, x.grad, w.grad, b.grad]
    # dx is rstd * (terms of size |dy * w|) that cancel: in a group of two close values
    # rstd reaches ~1/sqrt(eps), and float32's error with it
    x64 = base[0].double().reshape(shape[0], groups, -1)
    rstd = (x64.var(-1, unbiased=False) + 1e-5).rsqrt().max().item()
    terms = {"dx": rstd * cot.abs().max().item() * base[1].abs().max().item()}
    for name, ours, ref in zip(["y", "dx", "dweight", "dbias"], outs["triton"], outs["torch"]):
        assert ours.dtype == dtype, name
        _close(ours.detach(), ref.detach(), dtype, name, terms.get(name, 1.0))


@pytest.mark.parametrize("d, max_block", [(1, 4096), (37, 4096), (100, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dyt_matches_the_float64_reference(monkeypatch, d, max_block, dtype):
    monkeypatch.setattr(gpu, "_MAX_BLOCK", max_block)
    g = torch.Generator().manual_seed(d)
    n = 11
    base = [torch.randn(n, d, generator=g) * 4, torch.tensor([0.7]), torch.randn(d, generator=g),
            torch.randn(d, generator=g)]
    cot = torch.randn(n, d, generator=g)
    outs = {}
    for side, dt in (("triton", dtype), ("torch", torch.float64)):
        x, alpha, w, b = (_side(t, side, dt).requires_grad_() for t in base)
        with addnorm.backend(side):
            y = AF.dyt(x, alpha, w, b)
        (y.double() * cot.to(y.device, torch.float64)).sum().backward()
        outs[side] = [y, x.grad, alpha.grad, w.grad, b.grad]
    # dalpha sums n * d terms that cancel: its error is relative to their absolute sum
    x64, w64 = base[0].double(), base[2].double()
    t = torch.tanh(0.7 * x64)
    terms = {"dalpha": (cot.double() * w64 * (1 - t * t) * x64).abs().sum().item()}
    for name, ours, ref in zip(["y", "dx", "dalpha", "dweight", "dbias"], outs["triton"], outs["torch"]):
        assert ours.dtype == dtype, name
        _close(ours.detach(), ref.detach(), dtype, name, terms.get(name, 1.0))


@pytest.mark.parametrize("n, max_rows", [(70, 64), (10, 4), (3, 1)])
@pytest.mark.parametrize("rms", [True, False])
def test_narrow_rows_share_a_program(monkeypatch, n, max_rows, rms):
    """Several rows per forward program, the last program's rows partly past the end."""
    monkeypatch.setattr(gpu, "_MAX_ROWS", max_rows)
    g = torch.Generator().manual_seed(n)
    x, res, w = _on([torch.randn(n, 24, generator=g), torch.randn(n, 24, generator=g), torch.randn(24, generator=g)])
    with addnorm.backend("triton"):
        y, r = AF.add_rms_norm(x, res, 24, w, 1e-5) if rms else AF.add_layer_norm(x, res, 24, w, None, 1e-5)
    with addnorm.backend("torch"):
        y_ref, r_ref = AF.add_rms_norm(x, res, 24, w, 1e-5) if rms else AF.add_layer_norm(x, res, 24, w, None, 1e-5)
    torch.testing.assert_close(y, y_ref, rtol=2e-6, atol=2e-6)
    assert torch.equal(r, r_ref)


@pytest.mark.parametrize("rms", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_no_rows_give_zero_parameter_gradients(rms, fused):
    """An empty batch launches no program: the parameter gradients are zeros (as torch's),
    not whatever the partial-sum buffer held."""
    x, res, w, b = (t.requires_grad_() for t in _on([torch.randn(0, 8), torch.randn(0, 8), torch.randn(8),
                                                      torch.randn(8)]))
    for _ in range(3):  # fresh buffers land where freed ones were, with their bytes
        torch.full((64, 8), float("nan"), device=DEVICE)
        w.grad = b.grad = None
        with addnorm.backend("triton"):
            y, r = _call(rms, fused, x, res if fused else None, w, None if rms else b)
        y.sum().backward()
        assert y.shape == (0, 8) and torch.equal(w.grad, torch.zeros_like(w))
        if not rms:
            assert torch.equal(b.grad, torch.zeros_like(b))


def test_no_samples_give_zero_group_norm_parameter_gradients():
    x, w, b = (t.requires_grad_() for t in _on([torch.randn(0, 4, 3, 3), torch.randn(4), torch.randn(4)]))
    with addnorm.backend("triton"):
        AF.group_norm(x, 2, w, b, 1e-5).sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("eps", [-0.5, 0.0, float("nan")], ids=["-0.5", "0", "nan"])
def test_eps_as_torch_takes_it(eps):
    """A negative, zero or NaN eps gives torch's result (NaN where var + eps < 0), not a
    division error, in the row norms and GroupNorm alike."""
    import torch.nn.functional as F

    x = torch.cat([torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0)) * 3, torch.zeros(2, 6, 8)])
    with addnorm.backend("triton"):
        ours = [AF.layer_norm(*_on([x]), 8, eps=eps), AF.rms_norm(*_on([x]), 8, eps=eps),
                AF.group_norm(*_on([x]), 2, eps=eps)]
    theirs = [F.layer_norm(x, (8,), eps=eps), torch.rms_norm(x, (8,), eps=eps), F.group_norm(x, 2, eps=eps)]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.cpu(), b, equal_nan=True)


@pytest.mark.parametrize("params", ["weight and bias", "weight", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_or_sample_gives_its_parameter_gradients(params, dtype):
    """A single row (a decoding step) or a single GroupNorm sample runs its backward in
    one program, whose partial row is the parameter gradient itself (no column sum):
    each parameter gets its own, in its dtype, with the other absent or present."""
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(1, 40, generator=g), torch.randn(40, generator=g), torch.randn(40, generator=g),
            torch.randn(1, 8, 3, 3, generator=g), torch.randn(8, generator=g), torch.randn(8, generator=g)]
    cots = [torch.randn(1, 40, generator=g), torch.randn(1, 8, 3, 3, generator=g)]
    outs = {}
    for side, dt in (("triton", dtype), ("torch", torch.float64)):
        x, w, b, xg, wg, bg = (_side(t, side, dt).requires_grad_() for t in base)
        w, wg = (None, None) if params == "bias" else (w, wg)
        b, bg = (None, None) if params == "weight" else (b, bg)
        with addnorm.backend(side):
            ys = [AF.layer_norm(x, 40, w, b, 1e-5), AF.group_norm(xg, 2, wg, bg, 1e-5)]
        for y, cot in zip(ys, cots):
            (y.double() * cot.to(y.device, torch.float64)).sum().backward()
        outs[side] = [t.grad for t in (w, b, wg, bg) if t is not None]
    for ours, ref in zip(outs["triton"], outs["torch"], strict=True):
        assert ours.dtype == dtype and ours.shape == ref.shape
        _close(ours, ref, dtype, "parameter gradient")
