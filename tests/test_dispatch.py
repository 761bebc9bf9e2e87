"""Which implementation a call takes: the custom op where anything traces, the same
kernels without the dispatcher in plain eager, and torch's own kernel for small inputs
where the rule in ``functional`` (``_NATIVE_BELOW``) says torch's is the faster one."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import addnorm
import addnorm.functional as AF
from addnorm import ops
from helpers import SeenOps


def _ours(name, monkeypatch):
    """Count the calls of ops' eager functions for ``name`` (the kernels' entries: with
    and without a gradient to record)."""
    entry = getattr(ops, name)
    calls = []
    for attr in ("eager", "lean"):
        real = getattr(entry, attr)
        monkeypatch.setattr(entry, attr, lambda *a, real=real: calls.append(1) or real(*a))
    # the C++ eager path: ours too, where it serves the call (found here: the entry's own
    # first lookup would put the function in the spy's place)
    real_cpp = entry.cpp and ops._cpp_function(entry.cpp_name)
    if real_cpp is not None:
        monkeypatch.setattr(entry, "cpp", _counting(real_cpp, calls))
    return calls


def _counting(real, calls):
    """A C++ eager path function ``real`` that counts in ``calls`` the calls it served."""

    def spy(*args):
        out = real(*args)
        if out is not None:
            calls.append(1)
        return out

    return spy


def test_eager_calls_skip_the_dispatcher_and_match_the_op(monkeypatch):
    x = torch.randn(5, 16)
    w = torch.randn(16, requires_grad=True)
    xe = x.clone().requires_grad_()

    def dispatched(*args):
        raise AssertionError("plain eager went through the custom op")

    with monkeypatch.context() as m:
        m.setattr(ops.row_norm, "op", dispatched)
        m.setattr(ops, "row_norm_bwd", dispatched)
        ye = AF.rms_norm(xe, (16,), w)
        ye.sum().backward()
    with SeenOps() as mode:  # a dispatch mode counts as tracing: the op runs
        xt = x.clone().requires_grad_()
        yt = AF.rms_norm(xt, (16,), w)
    assert "addnorm.row_norm_fwd.default" in mode.seen
    torch.testing.assert_close(ye, yt, rtol=0, atol=0)
    gw = w.grad.clone()
    w.grad = None
    yt.sum().backward()
    torch.testing.assert_close(xe.grad, xt.grad, rtol=0, atol=0)
    torch.testing.assert_close(gw, w.grad, rtol=0, atol=0)


def test_eager_no_grad_runs_no_autograd_node():
    x = torch.randn(4, 8, requires_grad=True)
    with torch.no_grad():
        y = AF.rms_norm(x, (8,))
        y_add, r = AF.add_layer_norm(x, x, (8,))
    assert y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(y, F.rms_norm(x, (8,), eps=torch.finfo(torch.float32).eps))
    torch.testing.assert_close(r, 2 * x)
    torch.testing.assert_close(y_add, F.layer_norm(2 * x, (8,)))


def _served(path, monkeypatch):
    """Count the calls a C++ eager path function of ``ops`` (``ops.layer_norm_cpp``)
    served."""
    calls = []
    monkeypatch.setattr(path, "function", _counting(ops._cpp_function(path.name), calls))
    return calls


@pytest.mark.native_rule
def test_small_layer_norm_runs_our_forward_with_torchs_backward(monkeypatch):
    """Below the rule's bounds a LayerNorm that records its graph runs our forward kernel
    and torch's backward kernel (given our statistics), not our Python path's node."""
    calls, rule = _ours("row_norm", monkeypatch), _served(ops.layer_norm_cpp, monkeypatch)
    x = torch.randn(8, 64, requires_grad=True)
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    y = AF.layer_norm(x, (64,), w, b)
    assert not calls and rule == [1] and y.grad_fn.name() == "LayerNormBackward"
    expected = F.layer_norm(x, (64,), w, b)
    torch.testing.assert_close(y, expected)
    dy = torch.randn_like(y)
    ours, theirs = torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(expected, (x, w, b), dy)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e)


@pytest.mark.native_rule
def test_small_add_layer_norm_runs_our_fused_forward_with_torchs_backward(monkeypatch):
    calls, rule = _ours("row_norm", monkeypatch), _served(ops.layer_norm_cpp, monkeypatch)
    x, res = torch.randn(8, 64, requires_grad=True), torch.randn(8, 64).to(torch.bfloat16)
    w, b = torch.randn(64), torch.randn(64)
    y, r = AF.add_layer_norm(x.to(torch.bfloat16), res, (64,), w.bfloat16(), b.bfloat16())
    assert not calls and rule == [1] and y.grad_fn.name() == "LayerNormBackward"
    r_torch = x.to(torch.bfloat16) + res
    torch.testing.assert_close(r, r_torch, rtol=0, atol=0)
    torch.testing.assert_close(y, F.layer_norm(r_torch, (64,), w.bfloat16(), b.bfloat16()))
    (y.float().sum() + r.float().square().sum()).backward()
    expected = torch.autograd.grad(
        F.layer_norm(r_torch, (64,), w.bfloat16(), b.bfloat16()).float().sum() + r_torch.float().square().sum(), x
    )[0]
    torch.testing.assert_close(x.grad, expected)
    with pytest.raises(AF.ArgumentError, match="residual must have the shape of x"):
        AF.add_layer_norm(x, torch.randn(1, 64), (64,))  # x + residual would broadcast


@pytest.mark.native_rule
def test_off_the_cpu_a_twin_runs_where_the_default_backend_has_no_kernel(monkeypatch):
    """A device whose default backend is the reference (here the meta device; on a GPU
    without Triton, cuda) runs torch's twins at every size; beside the triton backend only
    BatchNorm does (cuDNN's on CUDA), the rest run our Triton kernels."""
    x = torch.empty(2, 4, 3, device="meta")
    w, b = torch.empty(4, device="meta"), torch.empty(3, device="meta")
    calls = []
    for name in ("layer_norm", "batch_norm", "group_norm"):  # torch's ops, as the twins run them
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    assert AF.layer_norm(x, (3,), b, b).shape == x.shape
    assert AF.batch_norm(x, w, w + 1, w, w, training=True).shape == x.shape
    assert AF.group_norm(x, 2, w, w).shape == x.shape
    assert calls == ["layer_norm", "batch_norm", "group_norm"]
    monkeypatch.setitem(AF._DEFAULT, "meta", "triton")
    assert AF._native("batch_norm", x, (w, w, w, w))
    assert not AF._native("layer_norm", x, (b, b)) and not AF._native("group_norm", x, (w, w))
    assert not AF._native("batch_norm", torch.empty(0, 4, device="meta"), (None, None, None, None))
    with addnorm.backend("torch"):  # a backend the user chose runs everywhere
        assert not AF._native("batch_norm", x, (w, w, w, w))


@pytest.mark.native_rule
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_rms_norm_runs_ours_at_every_size_and_autograd_state(monkeypatch, dtype):
    """RMSNorm has a twin but the rule leaves it out: ours is as fast forward with
    autograd and faster everywhere else (the comment above ``_NATIVE_BELOW``)."""
    calls = _ours("row_norm", monkeypatch)
    x, res = torch.randn(1, 64, dtype=dtype, requires_grad=True), torch.randn(1, 64, dtype=dtype)
    w = torch.randn(64, dtype=dtype, requires_grad=True)
    y = AF.rms_norm(x, 64, w, 1e-6)
    y_add, r = AF.add_rms_norm(x, res, 64, w, 1e-6)
    with torch.no_grad():
        AF.rms_norm(x, 64, w)
    assert len(calls) == 3
    torch.testing.assert_close(y, F.rms_norm(x, (64,), w, 1e-6))
    torch.testing.assert_close(r, x + res, rtol=0, atol=0)
    torch.testing.assert_close(y_add, F.rms_norm(x + res, (64,), w, 1e-6))
    (y.sum() + y_add.sum()).backward()
    assert x.grad is not None and w.grad is not None
    with pytest.raises(AF.ArgumentTypeError, match="weight must have dtype"):
        AF.rms_norm(x, 64, w.detach().long())  # (torch's takes an integer weight: docs/design.md)
    with pytest.raises(AF.ArgumentError, match="residual must have the shape of x"):
        AF.add_rms_norm(x, torch.randn(64, dtype=dtype), 64, w)  # x + residual would broadcast


@pytest.mark.native_rule
def test_the_rule_stays_out_of_traces_forced_backends_and_large_inputs(monkeypatch):
    calls = _ours("row_norm", monkeypatch)
    x = torch.randn(8, 64)
    with addnorm.backend("numba" if addnorm.backends()["numba"] else "torch"):
        AF.layer_norm(x, (64,))
    assert calls
    graph = make_fx(lambda t: AF.layer_norm(t, (64,)))(x)
    assert "addnorm.row_norm_fwd" in str(graph.code)
    monkeypatch.setitem(AF._NATIVE_BELOW, "layer_norm", x.numel())
    monkeypatch.setitem(AF._NATIVE_BELOW, "layer_norm_float", x.numel())
    calls.clear()
    AF.layer_norm(x, (64,))
    assert calls


@pytest.mark.native_rule
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_layer_norm_runs_ours_from_its_dtypes_bound(monkeypatch, dtype):
    """Where autograd records the graph, LayerNorm runs our Python path's node (our
    backward kernel) from 2^20 elements in float16/bfloat16 and add+LayerNorm from 2^19;
    in float32/float64 both from 2^23 (``_NATIVE_BELOW``); below, our forward kernel on
    the C++ eager path with torch's backward kernel, below 32 MB (a float64 input of
    more: torch's kernel).  Where autograd records nothing, the C++ path below 32 MB at
    every size.  The result is torch's either side of the bound."""
    calls, rule = _ours("row_norm", monkeypatch), _served(ops.layer_norm_cpp, monkeypatch)
    half = dtype in (torch.float16, torch.bfloat16)

    def ran(rows, d, add):
        x = torch.randn(rows, d, dtype=dtype, requires_grad=torch.is_grad_enabled())
        w, b = torch.randn(d, dtype=dtype), torch.randn(d, dtype=dtype)
        before = len(calls), len(rule)
        if add:
            res = torch.randn(rows, d, dtype=dtype)
            y, r = AF.add_layer_norm(x, res, (d,), w, b)
            torch.testing.assert_close(r, x + res, rtol=0, atol=0)
            torch.testing.assert_close(y, F.layer_norm(x + res, (d,), w, b))
        else:
            y = AF.layer_norm(x, (d,), w, b)
            torch.testing.assert_close(y, F.layer_norm(x, (d,), w, b))
        ours, cpp = len(calls) > before[0], len(rule) > before[1]
        assert not (ours and cpp)
        if cpp and y.grad_fn is not None:
            assert y.grad_fn.name() == "LayerNormBackward"
        return "ours" if ours else "cpp" if cpp else "torch"

    assert ran(1023, 1024, add=False) == "cpp"  # below 2^20
    assert ran(1024, 1024, add=False) == ("ours" if half else "cpp")
    assert ran(64, 16384, add=False) == ("ours" if half else "cpp")
    assert ran(1023, 512, add=True) == "cpp"  # below 2^19
    assert ran(1024, 512, add=True) == ("ours" if half else "cpp")
    assert ran(1024, 1024, add=True) == ("ours" if half else "cpp")
    # below 2^23 (float64: 64 MB, the C++ path's limit is 32 MB)
    assert ran(8191, 1024, add=False) == ("ours" if half else "torch" if dtype is torch.float64 else "cpp")
    assert ran(8192, 1024, add=False) == "ours"
    assert ran(8192, 1024, add=True) == "ours"
    with torch.no_grad():  # autograd off: ours at every size, every dtype (the C++ eager path's)
        assert ran(1, 64, add=False) == ran(1, 64, add=True) == "cpp"
        assert ran(1023, 1024, add=False) == ran(1023, 512, add=True) == "cpp"
    with torch.inference_mode():
        assert ran(8, 64, add=False) == "cpp"


@pytest.mark.native_rule
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_channel_norms_run_our_kernel_where_torchs_cpu_kernel_is_slow(monkeypatch, dtype):
    """InstanceNorm runs ours from 2^11 elements (float32/float64: with 48 values or more
    per (sample, channel)); BatchNorm in training on a contiguous float32/float64 input
    from 2^17, with 48 values or more per (sample, channel); every other BatchNorm runs
    torch's kernel at every size (``_NATIVE_BELOW``)."""
    gn, bn = _ours("group_norm", monkeypatch), _ours("batch_norm", monkeypatch)
    half = dtype in (torch.float16, torch.bfloat16)

    def ran(fn, shape, layout=torch.contiguous_format):
        x = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
        before = len(gn) + len(bn)
        fn(x)
        return len(gn) + len(bn) > before

    def inorm(x):
        return AF.instance_norm(x)

    def train(x):
        return AF.batch_norm(x, torch.zeros(x.shape[1]).to(dtype), torch.ones(x.shape[1]).to(dtype), training=True)

    def eval_(x):
        return AF.batch_norm(x, torch.zeros(x.shape[1]).to(dtype), torch.ones(x.shape[1]).to(dtype))

    cl = torch.channels_last
    assert not ran(inorm, (1, 8, 255))  # 2,040 elements: below 2^11
    assert ran(inorm, (1, 8, 256))  # 2^11
    assert ran(inorm, (2, 16, 8, 8), cl)
    assert ran(inorm, (4, 64, 32, 32))
    assert not ran(train, (8, 64, 15, 16))
    assert ran(train, (8, 64, 16, 16)) is not half  # 2^17
    assert not ran(train, (8, 64, 32, 32), cl)
    assert not ran(eval_, (8, 64, 32, 32))
    assert ran(train, (128, 64, 64)) is not half  # BatchNorm1d's (N, C, L), 64 values per run
    assert not ran(train, (8192, 64))  # BatchNorm1d's (N, C): one value per (sample, channel)
    assert not ran(train, (4096, 64, 2))
    assert ran(inorm, (4096, 8, 47)) is half  # 47 values per (sample, channel): torch's in float32
    assert ran(inorm, (64, 8, 4)) is half
    assert ran(inorm, (4096, 8, 48))


@pytest.mark.native_rule
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_group_norm_runs_ours_where_torchs_channels_last_kernel_is_slow(monkeypatch, dtype):
    """Channels-last GroupNorm (``_group_norm_rule``), G = 32: where torch's kernel's vector
    loops miss D = C / G (float16/bfloat16: D % 16; float32: D < 8, and D % 8 from 2^14
    positions below 1024 spatial positions), from 2^12 (sample, group, position)s
    (float32: 2^13, and 2^14 recording a graph), both passes run ours below 1024 spatial
    positions; at 1024 and more torch's forward runs, with our backward where autograd
    records the graph, but float16/bfloat16 recording a graph runs ours at every spatial
    size.  From 8M elements ours runs, but for one sample (torch's forward).  Everything
    else runs torch's kernel."""
    ours = _ours("group_norm_y", monkeypatch)
    hybrid = _ours("group_norm_aten_forward", monkeypatch)
    half = dtype is not torch.float32

    def ran(shape, grad=True, param_grad=False, layout=torch.channels_last):
        x = torch.randn(shape).to(dtype).contiguous(memory_format=layout).requires_grad_(grad)
        w = torch.randn(shape[1]).to(dtype).requires_grad_(param_grad)
        before = len(ours), len(hybrid)
        y = AF.group_norm(x, 32, w)
        if y.requires_grad:
            y.sum().backward()
        return {(1, 0): "ours", (0, 1): "torch forward, our backward", (0, 0): "torch"}[
            len(ours) - before[0], len(hybrid) - before[1]
        ]

    assert ran((2, 64, 16, 16), grad=False) == "ours"  # D = 2, 2^14 positions
    assert ran((2, 64, 16, 16)) == "ours"  # float32 recording a graph: from 2^14
    assert ran((4, 64, 16, 16)) == "ours"
    assert ran((4, 64, 16, 16), grad=False, param_grad=True) == "ours"  # the weight's gradient alone
    assert ran((4, 64, 32, 32)) == ("ours" if half else "torch forward, our backward")  # 1024 positions
    assert ran((4, 64, 32, 32), grad=False) == "torch"
    assert ran((2, 64, 8, 8), grad=False) == ("ours" if half else "torch")  # 2^12 positions
    assert ran((4, 64, 8, 8), grad=False) == "ours"  # 2^13
    assert ran((4, 64, 8, 8)) == ("ours" if half else "torch")
    assert ran((1, 64, 8, 8)) == "torch"  # 2^11
    # contiguous: float16 from 2^16 elements (torch's float16 kernel is slow), bfloat16 from
    # 2^20 where autograd records nothing, else torch's
    contiguous, f16 = torch.contiguous_format, dtype is torch.float16
    assert ran((4, 64, 16, 16), layout=contiguous) == ("ours" if f16 else "torch")
    assert ran((4, 64, 16, 16), grad=False, layout=contiguous) == ("ours" if f16 else "torch")
    assert ran((4, 64, 16, 15), layout=contiguous) == "torch"  # 61,440 elements
    assert ran((2, 64, 2048), layout=contiguous) == ("ours" if f16 else "torch")  # (N, C, L)
    assert ran((4, 256, 32, 32), layout=contiguous) == ("ours" if f16 else "torch")  # 2^20, recording
    assert ran((4, 256, 32, 32), grad=False, layout=contiguous) == ("torch" if dtype is torch.float32 else "ours")
    assert ran((4, 256, 32, 31), grad=False, layout=contiguous) == ("ours" if f16 else "torch")
    with torch.no_grad():
        assert ran((2, 320, 32, 32), layout=contiguous) == ("ours" if f16 else "torch")
        assert ran((4, 256, 32, 32), param_grad=True, layout=contiguous) == ("torch" if dtype is torch.float32 else "ours")
    assert ran((4, 256, 32, 32), grad=False, param_grad=True, layout=contiguous) == ("ours" if f16 else "torch")
    before = len(ours), len(hybrid)  # strided, neither contiguous nor channels-last: as contiguous
    AF.group_norm(torch.randn(4, 64, 16, 16).to(dtype).transpose(2, 3).requires_grad_(), 32).sum().backward()
    assert (len(ours), len(hybrid)) == before
    assert ran((2, 64, 4, 8, 8), layout=torch.channels_last_3d) == "ours"
    assert ran((2, 320, 16, 16)) == "ours"  # D = 10, 2^14 positions
    assert ran((4, 640, 8, 8)) == ("ours" if half else "torch")  # D = 20, 2^13 positions
    assert ran((8, 320, 16, 16)) == "ours"  # 2^16 positions: float32's D % 8 too
    assert ran((8, 320, 16, 16), grad=False) == "ours"
    assert ran((8, 256, 16, 16)) == ("ours" if half else "torch")  # D = 8
    assert ran((2, 320, 32, 32), grad=False) == "torch"  # 1024 spatial positions
    assert ran((2, 320, 32, 32)) == ("ours" if half else "torch")
    assert ran((2, 320, 64, 64)) == ("ours" if half else "torch")
    assert ran((2, 512, 16, 16)) == "torch"  # D = 16: torch's vector loops cover it
    assert ran((2, 1280, 16, 16)) == ("ours" if half else "torch")  # D = 40
    assert ran((1, 1280, 16, 16)) == ("ours" if half else "torch")  # one sample
    with torch.no_grad():
        assert ran((4, 64, 32, 32)) == "torch"
    with addnorm.backend("numba"):  # a forced backend runs ours everywhere
        assert ran((4, 64, 32, 32)) == "ours"
    # from 8M elements (here 2^14) ours runs, but one sample keeps torch's forward
    monkeypatch.setitem(AF._NATIVE_BELOW, "group_norm", 1 << 14)
    assert ran((2, 512, 4, 4)) == "ours"
    assert ran((1, 64, 16, 16)) == ("torch forward, our backward" if half else "torch")
    assert ran((1, 64, 16, 16), grad=False) == "torch"
    assert ran((1, 512, 8, 4)) == "torch"  # D = 16


@pytest.mark.native_rule
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])  # a bias alone runs ours
@pytest.mark.parametrize("shape", [(3, 64, 32, 32), (2, 64, 2, 25, 25)])
def test_group_norm_on_torchs_forward_and_our_backward_is_right(monkeypatch, dtype, affine, shape):
    """Where torch's forward runs with our backward: y is torch's, bit for bit (float16:
    its kernel, given float32 parameters, rounds a few values the other way: within an
    ulp, and as close to float64); the gradients are as close to float64 as torch's own.
    float16/bfloat16 take this path for one sample from 8M elements (and a frozen input,
    below): forced here."""
    x64 = torch.randn(shape, dtype=torch.float64) * 3 + 1.5
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    w64 = torch.randn(shape[1], dtype=torch.float64) if affine in ("both", "weight") else None
    b64 = torch.randn(shape[1], dtype=torch.float64) if affine == "both" else None
    dy = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)

    def run(fn, dt):
        leaves = [t.to(dt).requires_grad_() if t is not None else None for t in (x64, w64, b64)]
        leaves[0] = leaves[0].detach().contiguous(memory_format=fmt).requires_grad_()
        y = fn(*leaves[:1], 32, *leaves[1:])
        grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(dt))
        return y, grads

    if dtype is torch.float32:
        assert AF._group_norm_rule(x64.to(dtype).contiguous(memory_format=fmt).requires_grad_(), 32, None, None) == (
            "group_norm_torch_forward"
        )
    else:
        monkeypatch.setattr(AF, "_group_norm_rule", lambda *args: "group_norm_torch_forward")
    y, grads = run(AF.group_norm, dtype)
    ty, tgrads = run(F.group_norm, dtype)
    ry, rgrads = run(F.group_norm, torch.float64)
    if dtype is torch.float16:
        ulp = torch.finfo(dtype).eps * ry.abs().max().item()
        assert (y.double() - ty.double()).abs().max().item() <= ulp
        assert (y.double() - ry).abs().max() <= (ty.double() - ry).abs().max()
    else:
        assert torch.equal(y, ty)
    assert y.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)
    for g, t, r in zip(grads, tgrads, rgrads):
        assert g.dtype == t.dtype and g.shape == t.shape
        ulp = torch.finfo(g.dtype).eps * r.abs().max().item()
        ours, theirs = (g.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        assert ours <= 1.5 * theirs + 4 * ulp, (ours, theirs)


@pytest.mark.native_rule
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("shape", [(4, 64, 16, 16), (2, 96, 33, 21), (2, 32, 1024)])
def test_contiguous_float16_group_norm_by_the_rule_is_right(affine, shape):
    """A contiguous float16 GroupNorm from 2^16 elements runs our kernel by the rule: its
    output and gradients are torch.nn's, as close to float64 as torch's own (within an
    ulp more)."""
    x64 = torch.randn(shape, dtype=torch.float64) * 3 + 1.5
    w64 = torch.randn(shape[1], dtype=torch.float64) if affine != "none" else None
    b64 = torch.randn(shape[1], dtype=torch.float64) if affine == "both" else None
    dy = torch.randn(shape, dtype=torch.float64)
    assert AF._group_norm_rule(x64.half(), 32, None, None) == "group_norm_float16"

    def run(fn, dt):
        leaves = [t.to(dt).requires_grad_() if t is not None else None for t in (x64, w64, b64)]
        y = fn(leaves[0], 32, *leaves[1:])
        return [y, *torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(dt))]

    ours, theirs, exact = run(AF.group_norm, torch.float16), run(F.group_norm, torch.float16), run(F.group_norm, torch.float64)
    for o, t, r in zip(ours, theirs, exact):
        assert o.dtype == t.dtype == torch.float16 and o.shape == t.shape and o.is_contiguous()
        ulp = torch.finfo(torch.float16).eps * r.abs().max().item()
        assert (o.double() - r).abs().max().item() <= (t.double() - r).abs().max().item() + ulp


@pytest.mark.native_rule
@pytest.mark.parametrize("affine", [True, False])
def test_contiguous_bfloat16_group_norm_by_the_rule_is_right(affine):
    """A contiguous bfloat16 GroupNorm from 2^20 elements where autograd records nothing
    runs our kernel by the rule: its output is torch.nn's, as close to float64 as torch's
    own (within an ulp more)."""
    x64 = torch.randn(4, 256, 32, 32, dtype=torch.float64) * 3 + 1.5
    w64, b64 = (torch.randn(256, dtype=torch.float64), torch.randn(256, dtype=torch.float64)) if affine else (None, None)
    x, w, b = (t.bfloat16() if t is not None else None for t in (x64, w64, b64))
    assert AF._group_norm_rule(x, 32, w, b) == "group_norm_bfloat16"
    exact = F.group_norm(x.double(), 32, *(t.double() if t is not None else None for t in (w, b)))
    ours, theirs = AF.group_norm(x, 32, w, b), F.group_norm(x, 32, w, b)
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape and ours.is_contiguous()
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().max().item()
    assert (ours.double() - exact).abs().max().item() <= (theirs.double() - exact).abs().max().item() + ulp


@pytest.mark.native_rule
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_group_norm_gives_a_bias_gradient_without_a_weight(monkeypatch, layout):
    """torch's CPU GroupNorm backward fails for the bias's gradient when there is no
    weight (torch 2.13); addnorm's runs its own kernel there and gives it (and torch's,
    which computes the same forward, where autograd records nothing)."""
    ours = _ours("group_norm_y", monkeypatch)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=layout).requires_grad_()
    b = torch.randn(8, requires_grad=True)
    dy = torch.randn(2, 8, 4, 4)
    with pytest.raises(RuntimeError):  # (if torch fixes it, this test says so)
        torch.autograd.grad(F.group_norm(x, 4, None, b), (x, b), dy)
    dx, db = torch.autograd.grad(AF.group_norm(x, 4, None, b), (x, b), dy)
    rdx, rdb = torch.autograd.grad(F.group_norm(x, 4, torch.ones(8), b), (x, b), dy)
    torch.testing.assert_close((dx, db), (rdx, rdb))
    assert len(ours) == 1
    with torch.no_grad():
        torch.testing.assert_close(AF.group_norm(x, 4, None, b), F.group_norm(x, 4, None, b), rtol=0, atol=0)
    assert len(ours) == 1


def _torch_crashes(code: str) -> bool:
    """Whether ``code`` kills a fresh Python process (a signal, not an exception)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", "import torch, torch.nn.functional as F\n" + code],
                         capture_output=True, timeout=120)
    return run.returncode < 0


@pytest.mark.native_rule
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "permuted"])
@pytest.mark.parametrize("size", [1, 2])
def test_group_norm_trains_its_parameters_on_a_frozen_channels_last_input(dtype, layout, size):
    """A channels-last (or permuted) input that needs no gradient, with a weight and bias
    that do (norms trained over a frozen trunk, a UNet's first block): torch 2.13's CPU
    GroupNorm backward crashes the process there; addnorm runs torch's forward with its
    own backward and gives the parameters' gradients."""
    g = torch.Generator().manual_seed(size)
    shape = (size, 64, 4, 4, 4) if layout == "channels_last_3d" else (size, 64, 8, 8)
    x = torch.randn(shape, generator=g).to(dtype)
    if layout == "permuted":  # not channels-last contiguous, but strided like it
        x = torch.randn(size, 8, 9, 64, generator=g).to(dtype).permute(0, 3, 1, 2)[..., :8]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    else:
        x = x.contiguous(memory_format=getattr(torch, layout))
    w = torch.randn(64, generator=g).to(dtype).requires_grad_()
    b = torch.randn(64, generator=g).to(dtype).requires_grad_()
    y = AF.group_norm(x, 32, w, b)
    assert type(y.grad_fn).__name__ != "NativeGroupNormBackward0"  # (else the next line crashes)
    assert y.is_contiguous(memory_format=ops.memory_format(x))
    # torch's forward; on the permuted input a copy's, whose bits torch's own call on x
    # need not give (it sums in another order there)
    exact = {} if layout == "permuted" else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(y, F.group_norm(x, 32, w, b), **exact)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    dw, db = torch.autograd.grad(y, (w, b), dy)
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = F.group_norm(x.double().contiguous(), 32, w64, b64)  # (contiguous: torch crashes on x)
    rdw, rdb = torch.autograd.grad(ref, (w64, b64), dy.double())
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for ours, ref in ((dw, rdw), (db, rdb)):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    if dtype == torch.float32 and layout == "channels_last" and size == 2:  # (if torch fixes it, this says so)
        assert _torch_crashes(
            "x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)\n"
            "w = torch.randn(64, requires_grad=True)\n"
            "F.group_norm(x, 32, w, None).sum().backward()"
        )


@pytest.mark.native_rule
def test_the_rule_keeps_our_errors():
    x = torch.randn(4, 8)
    with pytest.raises(AF.ArgumentError, match="weight must have shape"):
        AF.layer_norm(x, (8,), torch.randn(7))
    with pytest.raises(AF.ArgumentTypeError, match="eps"):
        AF.layer_norm(x, (8,), eps="1e-5")
    with pytest.raises(AF.ArgumentError, match="one value per group|more than 1 value"):
        AF.group_norm(torch.randn(1, 2, 1), 2)


@pytest.mark.native_rule
@pytest.mark.parametrize("norm", ["batch_norm", "group_norm", "instance_norm"])
def test_small_channel_norms_equal_torch(norm):
    x = torch.randn(2, 4, 5, 5)
    w, b = torch.randn(4), torch.randn(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    ours_rm, ours_rv = rm.clone(), rv.clone()
    if norm == "batch_norm":
        y = AF.batch_norm(x, ours_rm, ours_rv, w, b, True)
        ref = F.batch_norm(x, rm, rv, w, b, True)
    elif norm == "group_norm":
        y, ref = AF.group_norm(x, 2, w, b), F.group_norm(x, 2, w, b)
    else:
        y = AF.instance_norm(x, ours_rm, ours_rv, w, b)
        ref = F.instance_norm(x, rm, rv, w, b)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close((ours_rm, ours_rv), (rm, rv))


_X = torch.randn(2, 4, 3, 3)
# The channel norms' calls on torch's kernel, each given the functional module (ours or
# torch.nn.functional), the input and the running statistics (mean, var)
_CHANNEL_CALLS = {
    "batch_norm train": lambda m, x, s: m.batch_norm(x, *s, torch.randn(4), torch.randn(4), True, 0.3),
    "batch_norm eval": lambda m, x, s: m.batch_norm(x, *s, torch.randn(4), torch.randn(4), False),
    "batch_norm train, no stats or affine": lambda m, x, s: m.batch_norm(x, None, None, training=True),
    "batch_norm float32 parameters, bfloat16 input":
        lambda m, x, s: m.batch_norm(x.bfloat16(), *s, torch.randn(4), None, True),
    "batch_norm (N, C)": lambda m, x, s: m.batch_norm(x[:, :, 0, 0], *s, None, torch.randn(4), True),
    "group_norm": lambda m, x, s: m.group_norm(x, 2, torch.randn(4), torch.randn(4)),
    "group_norm (N, C)": lambda m, x, s: m.group_norm(x[:, :, 0, 0], 2),
    "instance_norm": lambda m, x, s: m.instance_norm(x, weight=torch.randn(4), bias=torch.randn(4)),
    "instance_norm running stats": lambda m, x, s: m.instance_norm(x, *s, momentum=0.5),
}


@pytest.mark.native_rule
@pytest.mark.parametrize("call", _CHANNEL_CALLS)
def test_channel_norm_twins_run_no_python_checks(monkeypatch, call):
    """A valid small call goes straight to torch's kernel, which validates in C++: none of
    our argument checks run before it (they cost more than torch.nn.functional's whole
    wrapper), and the result, running statistics included, is torch.nn.functional's."""
    def refused(*args, **kwargs):
        raise AssertionError("a check ran before torch's kernel")

    for name in ("_check_input", "_check_channels", "_check_per_channel", "_check_param", "_check_float"):
        monkeypatch.setattr(AF, name, refused)
    theirs_stats = (torch.rand(4), torch.rand(4) + 0.5)
    ours_stats = tuple(t.clone() for t in theirs_stats)
    torch.manual_seed(0)
    ours = _CHANNEL_CALLS[call](AF, _X, ours_stats)
    torch.manual_seed(0)
    theirs = _CHANNEL_CALLS[call](F, _X, theirs_stats)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(ours_stats, theirs_stats, rtol=0, atol=0)


# What torch's kernels take and the checks refuse, and what they refuse themselves: the
# call on a small input, where it would run torch's kernel, must raise what it raises
# where it runs ours, and change nothing
_CHANNEL_MISTAKES = {
    "batch_norm weight (C, 1)": lambda x, s: AF.batch_norm(x, *s, torch.ones(4, 1)),
    "batch_norm bias (2, 2)": lambda x, s: AF.batch_norm(x, *s, None, torch.ones(2, 2), True),
    "batch_norm weight a list": lambda x, s: AF.batch_norm(x, *s, [1.0] * 4, None, True),
    "batch_norm negative eps": lambda x, s: AF.batch_norm(x, *s, eps=-1e-5),
    "batch_norm eps a string": lambda x, s: AF.batch_norm(x, *s, training=True, eps="1e-5"),
    "batch_norm eps 0 training": lambda x, s: AF.batch_norm(x, *s, training=True, eps=0.0),
    "batch_norm one value per channel": lambda x, s: AF.batch_norm(x[:1, :, :1, :1], *s, training=True),
    "batch_norm one value per channel (1, C)": lambda x, s: AF.batch_norm(x[:1, :, 0, 0], *s, training=True),
    "batch_norm 1-D input": lambda x, s: AF.batch_norm(x[0, :, 0, 0], *s, training=True),
    "batch_norm 0-d input": lambda x, s: AF.batch_norm(x[0, 0, 0, 0], *s, training=True),
    "batch_norm running_mean only": lambda x, s: AF.batch_norm(x, s[0], None, training=True),
    "batch_norm eval without stats": lambda x, s: AF.batch_norm(x, None, None),
    "batch_norm running_var (C, 1)": lambda x, s: AF.batch_norm(x, s[0], s[1].view(4, 1), training=True),
    "batch_norm running stats float64": lambda x, s: AF.batch_norm(x, s[0].double(), s[1].double(), training=True),
    "batch_norm weight float64": lambda x, s: AF.batch_norm(x, *s, torch.ones(4, dtype=torch.float64), None, True),
    "batch_norm weight of 5": lambda x, s: AF.batch_norm(x, *s, torch.ones(5), None, True),
    "batch_norm integer input": lambda x, s: AF.batch_norm(x.long(), *s, training=True),
    "batch_norm momentum None": lambda x, s: AF.batch_norm(x, *s, None, None, True, None),
    "group_norm one value per group": lambda x, s: AF.group_norm(x[:1, :, :1, :1], 4),
    "group_norm (1, C) one value per group": lambda x, s: AF.group_norm(x[:1, :, 0, 0], 4),
    "group_norm not dividing": lambda x, s: AF.group_norm(x, 3),
    "group_norm no groups": lambda x, s: AF.group_norm(x, 0),
    "group_norm negative groups": lambda x, s: AF.group_norm(x, -2),
    "group_norm groups a float": lambda x, s: AF.group_norm(x, 2.0),
    "group_norm eps a list": lambda x, s: AF.group_norm(x, 2, eps=[1e-5]),
    "group_norm weight (C, 1)": lambda x, s: AF.group_norm(x, 2, torch.ones(4, 1)),
    "group_norm bias float64": lambda x, s: AF.group_norm(x, 2, None, torch.ones(4, dtype=torch.float64)),
    "group_norm 1-D input": lambda x, s: AF.group_norm(x[0, :, 0, 0], 2),
    "instance_norm one spatial value": lambda x, s: AF.instance_norm(x[:, :, :1, :1], *s),
    "instance_norm (N, C)": lambda x, s: AF.instance_norm(x[:, :, 0, 0]),
    "instance_norm eps of shape (1,)": lambda x, s: AF.instance_norm(x, *s, eps=torch.tensor([1e-5])),
    "instance_norm running_mean only": lambda x, s: AF.instance_norm(x, s[0], None),
    "instance_norm running stats of 8": lambda x, s: AF.instance_norm(x, torch.zeros(8), torch.ones(8)),
    "instance_norm weight (C, 1)": lambda x, s: AF.instance_norm(x, *s, torch.ones(4, 1)),
    "instance_norm weight float64": lambda x, s: AF.instance_norm(x, *s, torch.ones(4, dtype=torch.float64)),
    "instance_norm 1-D input": lambda x, s: AF.instance_norm(x[0, :, 0, 0]),
    "instance_norm momentum None": lambda x, s: AF.instance_norm(x, *s, momentum=None),
}


@pytest.mark.native_rule
def test_instance_norm_with_eps_0_is_ours_at_every_size():
    """torch's kernel gives a constant channel rstd 0 at eps 0, ours 1 / 0 (the output
    NaN): the twin leaves eps 0 to ours, so the result does not depend on the size."""
    small = AF.instance_norm(torch.zeros(2, 4, 3, 3), eps=0.0)
    assert small.isnan().all() and not F.instance_norm(torch.zeros(2, 4, 3, 3), eps=0.0).isnan().any()


@pytest.mark.native_rule
@pytest.mark.parametrize("mistake", _CHANNEL_MISTAKES)
def test_channel_norm_twins_refuse_what_our_checks_refuse(mistake):
    call = _CHANNEL_MISTAKES[mistake]
    errors = []
    for backend in (None, "torch"):  # the rule's twin, then no twin (a forced backend)
        x, stats = _X.clone(), (torch.zeros(4), torch.ones(4))
        with addnorm.backend(backend) if backend else contextlib.nullcontext():
            with pytest.raises((AF.ArgumentError, AF.ArgumentTypeError)) as error:
                call(x, stats)
        errors.append((type(error.value), str(error.value)))
        assert torch.equal(x, _X) and torch.equal(stats[0], torch.zeros(4)) and torch.equal(stats[1], torch.ones(4))
    assert errors[0] == errors[1]


@pytest.mark.native_rule
def test_small_inputs_under_compile_trace_as_torch_ops_and_large_ones_as_the_op(monkeypatch):
    """Below the bound, torch.compile sees the reference's torch ops (inductor fuses them
    with their neighbours); above it, the custom op (our kernel)."""
    x, res, w = torch.randn(4, 32), torch.randn(4, 32), torch.randn(32)
    f = lambda x: AF.add_rms_norm(x, res, 32, w)[0] * 2

    def graph_of():
        graphs = []
        torch._dynamo.reset()
        y = torch.compile(f, backend=lambda gm, ex: graphs.append(str(gm.code)) or gm.forward, fullgraph=True)(x)
        torch.testing.assert_close(y, f(x))
        return graphs[0]

    assert "addnorm" not in graph_of()
    monkeypatch.setitem(AF._NATIVE_BELOW, "compiled", x.numel())
    assert "addnorm.row_norm_fwd" in graph_of()


@pytest.mark.native_rule
@pytest.mark.parametrize("norm", ["group_norm", "batch_norm"])
def test_small_channel_norms_under_compile_trace_as_torchs(norm):
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(8), torch.ones(8)
    f = {"group_norm": lambda x: AF.group_norm(x, 4),
         "batch_norm": lambda x: AF.batch_norm(x, rm, rv, training=True)}[norm]
    graphs = []
    torch._dynamo.reset()
    y = torch.compile(f, backend=lambda gm, ex: graphs.append(str(gm.code)) or gm.forward, fullgraph=True)(x)
    assert "addnorm" not in graphs[0]
    ref = F.group_norm(x, 4) if norm == "group_norm" else F.batch_norm(x, torch.zeros(8), torch.ones(8), training=True)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(7,), (5, 7), (2, 3, 7), (0, 7)])
def test_the_common_calls_fused_checks_give_the_general_paths_results(monkeypatch, dtype, shape):
    """``functional._row_norm`` checks the common call (a one-int tuple normalized_shape,
    parameters of x's dtype, a float eps or RMSNorm's None) at once; the same call
    spelled so that it takes the general checks (normalized_shape as a list) gives the
    very same outputs and gradients, for every row norm, with and without parameters."""
    g = torch.Generator().manual_seed(0)
    x, res = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    w, b = (torch.randn(7, generator=g).to(dtype) for _ in range(2))
    calls = {
        "layer_norm": lambda s, x, r, w, b: AF.layer_norm(x, s, w, b),
        "rms_norm": lambda s, x, r, w, b: AF.rms_norm(x, s, w, casting_mode="llama"),
        "rms_norm_default_eps": lambda s, x, r, w, b: AF.rms_norm(x, s, None),
        "add_layer_norm": lambda s, x, r, w, b: AF.add_layer_norm(x, r, s, None, b, 1e-3),
        "add_rms_norm": lambda s, x, r, w, b: AF.add_rms_norm(x, r, s, w, 1e-6, offset=1.0),
    }
    monkeypatch.setitem(AF._NATIVE_BELOW, "layer_norm", 0)  # our kernels at every size
    checked = []  # the general checks start with _check_input
    real_check = AF._check_input
    monkeypatch.setattr(AF, "_check_input", lambda *a: checked.append(a) or real_check(*a))
    for name, call in calls.items():
        results = []
        for spelled in ((7,), [7]):
            leaves = [t.clone().requires_grad_() for t in (x, res, w, b)]
            checked.clear()
            out = call(spelled, *leaves)
            assert bool(checked) == (spelled == [7]), name
            outs = out if isinstance(out, tuple) else (out,)
            sum(o.float().sum() * (i + 1) for i, o in enumerate(outs)).backward()
            results.append([o.detach() for o in outs] + [t.grad for t in leaves])
        for ours, general in zip(*results):
            assert (ours is None) == (general is None), name
            if ours is not None:
                assert torch.equal(ours, general), name
