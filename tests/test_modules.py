"""Modules are drop-ins for torch.nn: signatures, repr, state_dict both ways, training."""

import copy
import inspect
import io

import pytest
import torch
from torch import nn

import addnorm

TWINS = [
    (addnorm.LayerNorm, nn.LayerNorm, (12,), {}),
    (addnorm.LayerNorm, nn.LayerNorm, ((3, 4),), {"bias": False}),
    (addnorm.LayerNorm, nn.LayerNorm, (12,), {"elementwise_affine": False}),
    (addnorm.RMSNorm, nn.RMSNorm, (12,), {}),
    (addnorm.RMSNorm, nn.RMSNorm, ([3, 4],), {"eps": 1e-6}),
    (addnorm.RMSNorm, nn.RMSNorm, (12,), {"elementwise_affine": False}),
    (addnorm.BatchNorm1d, nn.BatchNorm1d, (5,), {}),
    (addnorm.BatchNorm1d, nn.BatchNorm1d, (5,), {"momentum": None}),
    (addnorm.BatchNorm2d, nn.BatchNorm2d, (5,), {"affine": False}),
    (addnorm.BatchNorm2d, nn.BatchNorm2d, (5,), {"track_running_stats": False}),
    (addnorm.BatchNorm3d, nn.BatchNorm3d, (5,), {"momentum": 0.3, "bias": False}),
    (addnorm.InstanceNorm1d, nn.InstanceNorm1d, (5,), {}),
    (addnorm.InstanceNorm2d, nn.InstanceNorm2d, (5,), {"affine": True, "track_running_stats": True}),
    (addnorm.InstanceNorm3d, nn.InstanceNorm3d, (5,), {"track_running_stats": True, "momentum": None}),
    (addnorm.GroupNorm, nn.GroupNorm, (2, 6), {}),
    (addnorm.GroupNorm, nn.GroupNorm, (3, 6), {"affine": False}),
]
INPUT_SHAPES = {
    nn.LayerNorm: (2, 7, 12),
    nn.RMSNorm: (2, 7, 12),
    nn.BatchNorm1d: (8, 5, 6),
    nn.BatchNorm2d: (4, 5, 3, 3),
    nn.BatchNorm3d: (2, 5, 2, 3, 2),
    nn.InstanceNorm1d: (3, 5, 7),
    nn.InstanceNorm2d: (3, 5, 4, 4),
    nn.InstanceNorm3d: (2, 5, 2, 3, 3),
    nn.GroupNorm: (3, 6, 4, 4),
}


def _input_shape(torch_cls, args):
    shape = INPUT_SHAPES[torch_cls]
    if torch_cls in (nn.LayerNorm, nn.RMSNorm) and not isinstance(args[0], int):
        return (2, 7, *args[0])
    return shape


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))


@pytest.mark.parametrize("ours_cls, torch_cls", sorted({(o, t) for o, t, _, _ in TWINS}, key=str))
def test_same_constructor_signature(ours_cls, torch_cls):
    ours = inspect.signature(ours_cls.__init__).parameters
    theirs = inspect.signature(torch_cls.__init__).parameters
    for name, p in theirs.items():
        assert name in ours, f"{ours_cls.__name__} lacks argument {name}"
        assert ours[name].default == p.default, f"{name}: default {ours[name].default} != {p.default}"
        assert ours[name].kind == p.kind
    assert list(ours)[: len(theirs)] == list(theirs)


@pytest.mark.parametrize("ours_cls, torch_cls, args, kwargs", TWINS)
def test_repr_state_dict_and_training_match_torch(backend, ours_cls, torch_cls, args, kwargs):
    torch.manual_seed(0)
    ours, theirs = ours_cls(*args, **kwargs), torch_cls(*args, **kwargs)
    assert repr(ours) == repr(theirs)
    assert isinstance(ours, torch_cls)
    _randomize(theirs)
    # state dicts interchange, strict, both ways
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    shape = _input_shape(torch_cls, args)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1) if list(ours.parameters()) else None
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1) if list(theirs.parameters()) else None
    for step in range(4):  # training steps: outputs, grads, parameters, running stats
        x = torch.randn(shape) * (step + 1) + step
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        torch.testing.assert_close(yo, yt, rtol=1e-5, atol=1e-5)
        cot = torch.randn_like(yo)
        yo.backward(cot)
        yt.backward(cot)
        torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-4, atol=1e-5)
        for opt in (opt_o, opt_t):
            if opt:
                opt.step()
                opt.zero_grad()
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"state {name} after step {step}")
    ours.eval(), theirs.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ours_cls, torch_cls, args, kwargs", TWINS[:6])
def test_weights_only_load(tmp_path, ours_cls, torch_cls, args, kwargs):
    ours = ours_cls(*args, **kwargs)
    _randomize(ours)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    theirs = torch_cls(*args, **kwargs)
    theirs.load_state_dict(loaded, strict=True)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)


def _moved_copies(module_cls, args, kwargs, state):
    """The module three times, its parameters and buffers moved where torch's tools move
    them: a parametrization (a property on a new class), a plain attribute (the old
    torch.nn.utils.weight_norm, FSDP's flat parameters), and untouched for functional_call."""

    class Doubled(nn.Module):
        def forward(self, t):
            return 2 * t

    parametrized, plain, untouched = (module_cls(*args, **kwargs) for _ in range(3))
    for m in (parametrized, plain, untouched):
        m.load_state_dict(state, strict=True)
    for name, t in list(plain._parameters.items()) + list(plain._buffers.items()):
        if t is not None and name != "num_batches_tracked":
            delattr(plain, name)
            setattr(plain, name, 2 * t.detach())
    for name, t in list(parametrized._parameters.items()):
        if t is not None:
            nn.utils.parametrize.register_parametrization(parametrized, name, Doubled())
    return parametrized, plain, untouched


@pytest.mark.parametrize("ours_cls, torch_cls, args, kwargs", TWINS)
def test_moved_parameters_and_buffers_are_read_where_they_moved(ours_cls, torch_cls, args, kwargs):
    # forward reads parameters and buffers from nn.Module's dicts (``modules._state``),
    # and where a tool moved one, from there, as ``module.<name>`` would
    torch.manual_seed(0)
    theirs = torch_cls(*args, **kwargs)
    _randomize(theirs)
    state = theirs.state_dict()
    x = torch.randn(_input_shape(torch_cls, args))
    for training in (False, True):
        ours_copies = _moved_copies(ours_cls, args, kwargs, state)
        torch_copies = _moved_copies(torch_cls, args, kwargs, state)
        for o, t in zip(ours_copies, torch_copies):
            o.train(training), t.train(training)
            torch.testing.assert_close(o(x), t(x), rtol=1e-5, atol=1e-5)
            for (name, a), (_, b) in zip(o.state_dict().items(), t.state_dict().items()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # running stats updated there
        ours, twin = ours_copies[2], torch_copies[2]
        replaced = {n: 0.5 + torch.rand_like(v) if v.is_floating_point() else v.clone() for n, v in state.items()}
        copy = {n: v.clone() for n, v in replaced.items()}
        yo = torch.func.functional_call(ours, replaced, (x,))
        yt = torch.func.functional_call(twin, copy, (x,))
        torch.testing.assert_close(yo, yt, rtol=1e-5, atol=1e-5)
        for name in replaced:
            torch.testing.assert_close(replaced[name], copy[name], rtol=1e-5, atol=1e-6, msg=name)
        if not training and any(v.is_floating_point() for v in replaced.values()):
            assert not torch.allclose(yo, ours(x))  # the replaced tensors were the ones read


_ALL_MODULES = TWINS + [
    (addnorm.AddLayerNorm, nn.LayerNorm, (12,), {}),
    (addnorm.AddRMSNorm, nn.RMSNorm, (12,), {"offset": 1.0}),
    (addnorm.ScaleNorm, None, (12,), {}),
    (addnorm.DyT, None, (12,), {}),
]


@pytest.mark.parametrize("module_cls, torch_cls, args, kwargs", _ALL_MODULES)
def test_forward_skips_module_getattr(monkeypatch, module_cls, torch_cls, args, kwargs):
    # nn.Module's __getattr__ costs ~0.55 µs a read, a quarter of a decoding-shape
    # LayerNorm: forward reads parameters and buffers from the module's dicts instead
    module = module_cls(*args, **kwargs)
    tensors = set(module._parameters) | set(module._buffers)
    getattr_of_module = nn.Module.__getattr__
    read = []

    def counted(self, name):
        read.append(name)
        return getattr_of_module(self, name)

    monkeypatch.setattr(nn.Module, "__getattr__", counted)
    shape = _input_shape(torch_cls, args) if torch_cls else (2, 12)
    x = torch.randn(shape)
    for training in (True, False):
        module.train(training)
        module(x, torch.randn(shape)) if module_cls.__name__.startswith("Add") else module(x)
    assert not tensors & set(read), sorted(tensors & set(read))


def test_unbatched_instance_norm(backend):
    ours, theirs = addnorm.InstanceNorm1d(4, affine=True), nn.InstanceNorm1d(4, affine=True)
    x = torch.randn(4, 9)
    torch.testing.assert_close(ours(x), theirs(x))


def test_add_norm_modules(backend):
    x, r = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    for ours, twin in ((addnorm.AddLayerNorm(16), nn.LayerNorm(16)), (addnorm.AddRMSNorm(16), nn.RMSNorm(16))):
        _randomize(twin)
        ours.load_state_dict(twin.state_dict(), strict=True)
        y, s = ours(x, r)
        torch.testing.assert_close(s, x + r, rtol=0, atol=0)
        torch.testing.assert_close(y, twin(x + r))
        assert repr(ours).startswith(type(ours).__name__ + "((16,)")


def test_rms_norm_offset_is_gemma():
    norm = addnorm.RMSNorm(8, offset=1.0)
    assert torch.equal(norm.weight, torch.zeros(8)), "weight starts so that 1 + w = 1"
    assert "offset=1.0" in repr(norm)
    x = torch.randn(4, 8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps) * (1 + norm.weight)
    torch.testing.assert_close(norm(x), expected)
    plain = addnorm.RMSNorm(8)
    assert torch.equal(plain.weight, torch.ones(8))
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.zeros(8))


def test_scale_norm_and_dyt_modules(backend):
    sn = addnorm.ScaleNorm(16)
    assert repr(sn) == "ScaleNorm(16, eps=1e-05)"
    assert sn.weight.item() == pytest.approx(4.0)
    x = torch.randn(5, 16)
    torch.testing.assert_close(sn(x), 4.0 * x / x.norm(dim=-1, keepdim=True))
    dyt = addnorm.DyT((4, 16), alpha_init=0.7)
    assert repr(dyt) == "DyT((4, 16), alpha_init=0.7)"
    assert set(dyt.state_dict()) == {"alpha", "weight", "bias"}
    x = torch.randn(3, 4, 16)
    torch.testing.assert_close(dyt(x), torch.tanh(0.7 * x))
    with torch.no_grad():
        dyt.weight.normal_(), dyt.bias.normal_()
    torch.testing.assert_close(dyt(x), dyt.weight * torch.tanh(0.7 * x) + dyt.bias)


def test_dyt_and_scale_norm_gradcheck(backend):
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([1.7], dtype=torch.float64, requires_grad=True)
    AF = addnorm.functional
    assert torch.autograd.gradcheck(lambda x, a, w, b: AF.dyt(x, a, w, b), (x, a, w, b))
    assert torch.autograd.gradcheck(lambda x, a: AF.dyt(x, a), (x, a))
    assert torch.autograd.gradcheck(lambda x, g: AF.scale_norm(x, g), (x, g))
    tiny = (x * 1e-8).detach().requires_grad_()  # norms under eps: the clamped branch
    assert torch.autograd.gradcheck(lambda x, g: AF.scale_norm(x, g, 1e-5), (tiny, g))


def test_weight_norm_is_torchs_parametrization():
    torch.manual_seed(0)
    lin = addnorm.weight_norm(nn.Linear(4, 3))
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
    ref.load_state_dict(lin.state_dict(), strict=True)
    x = torch.randn(2, 4)
    torch.testing.assert_close(lin(x), ref(x))
    g, v = lin.parametrizations.weight.original0, lin.parametrizations.weight.original1
    torch.testing.assert_close(lin.weight, g * v / v.norm(dim=1, keepdim=True))


def _traceable_cases():
    for ours_cls, torch_cls, args, kwargs in TWINS:
        yield ours_cls(*args, **kwargs), (torch.randn(_input_shape(torch_cls, args)),)
    yield addnorm.AddLayerNorm(16), (torch.randn(3, 5, 16), torch.randn(3, 5, 16))
    yield addnorm.AddRMSNorm(16, offset=1.0, casting_mode="gemma"), (torch.randn(3, 5, 16), torch.randn(3, 5, 16))
    yield addnorm.DyT(16), (torch.randn(3, 5, 16),)
    yield addnorm.ScaleNorm(16), (torch.randn(3, 5, 16),)
    yield addnorm.RMSNorm(16).double(), (torch.randn(2, 3, 16, dtype=torch.float64),)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # torch's own notice; tracing is what is tested
@pytest.mark.parametrize("case", range(len(list(_traceable_cases()))))
def test_jit_trace_records_torch_ops_that_run_and_save_without_addnorm(case, monkeypatch):
    """torch.jit.trace of a module: the tracer sees only torch ops (a numba kernel's sizes
    reached it as traced tensors and raised numba's typing error, and what a kernel writes
    is not recorded), so under the tracer every norm runs the reference's torch ops.  The
    traced module gives the module's results on inputs it was not traced with, in eval
    mode, and survives torch.jit.save/load with no addnorm op in its graph."""
    module, inputs = list(_traceable_cases())[case]
    _randomize(module)
    module.eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, inputs)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        assert "addnorm::" not in str(loaded.graph)  # no custom op (the module's class name stays)
        fresh = tuple(torch.randn_like(x) * 3 + 1 for x in inputs)
        expected = module(*fresh)
        for got in (traced(*fresh), loaded(*fresh)):
            for g, e in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, expected))):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def _scriptable_cases():
    """(module, torch.nn's twin or None, inputs): every module class torch.jit.script compiles."""
    for ours_cls, torch_cls, args, kwargs in TWINS:
        yield ours_cls(*args, **kwargs), torch_cls(*args, **kwargs), (torch.randn(_input_shape(torch_cls, args)),)
    yield addnorm.InstanceNorm1d(5), nn.InstanceNorm1d(5), (torch.randn(5, 7),)  # unbatched
    x, residual = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    yield addnorm.AddLayerNorm(16), nn.LayerNorm(16), (x, residual)
    yield addnorm.AddRMSNorm(16, eps=1e-6), nn.RMSNorm(16, eps=1e-6), (x, residual)
    yield addnorm.DyT((5, 16)), None, (x,)
    yield addnorm.ScaleNorm(16), None, (x,)


SCRIPTABLE = list(_scriptable_cases())


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # torch's own notice
@pytest.mark.parametrize("case", range(len(SCRIPTABLE)), ids=lambda i: type(SCRIPTABLE[i][0]).__name__)
def test_jit_script_runs_torch_nn_forward(case):
    """torch.jit.script of a module compiles torch.nn's own forward (addnorm's is Python
    around numba kernels): the scripted module gives the twin's outputs, gradients and
    running statistics, in training and in eval, and saves and loads with no addnorm op.
    The fused adds add, then normalize; DyT and ScaleNorm run the reference's torch ops."""
    ours, twin, inputs = _scriptable_cases_fresh(case)
    _randomize(ours)
    if twin is not None:
        twin.load_state_dict(ours.state_dict(), strict=True)
    scripted = torch.jit.script(ours)
    assert "addnorm::" not in str(scripted.graph)
    for training in (True, False):
        ours.train(training)
        scripted.train(training)
        if twin is not None:
            twin.train(training)
        leaves = tuple(x.clone().requires_grad_() for x in inputs)
        got = scripted(*leaves)
        got = got if isinstance(got, tuple) else (got,)
        if twin is None:
            with torch.no_grad():
                expected = (ours(*inputs),)  # addnorm's kernel: equal to rounding
            torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        else:
            twin_leaves = tuple(x.clone().requires_grad_() for x in inputs)
            r = twin_leaves[0] + twin_leaves[1] if len(inputs) == 2 else twin_leaves[0]
            expected = (twin(r), r) if len(inputs) == 2 else (twin(r),)
            for g, e in zip(got, expected):
                assert torch.equal(g, e)
            sum(o.sum() * (k + 1) for k, o in enumerate(expected)).backward()
        sum(o.sum() * (k + 1) for k, o in enumerate(got)).backward()
        if twin is not None:
            for a, b in zip(leaves, twin_leaves):
                assert torch.equal(a.grad, b.grad)
            for (name, a), b in zip(ours.named_parameters(), twin.parameters()):
                assert torch.equal(a.grad, b.grad), name
            for (name, a), b in zip(ours.named_buffers(), twin.buffers()):
                assert torch.equal(a, b), name  # running statistics, batches tracked
        else:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.parameters())
        ours.zero_grad()
        if twin is not None:
            twin.zero_grad()
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        for g, e in zip(*(o if isinstance(o, tuple) else (o,) for o in (loaded(*inputs), scripted(*inputs)))):
            assert torch.equal(g, e)


def _scriptable_cases_fresh(case):
    torch.manual_seed(case)
    return list(_scriptable_cases())[case]


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_jit_script_of_a_patched_model_loads_without_addnorm(tmp_path):
    """A model with addnorm's norms (patched in, or built with them) scripts as a whole,
    keeps its eager forward on addnorm's kernels, and its saved file loads in a process
    that cannot import addnorm."""
    import subprocess
    import sys

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.BatchNorm2d(8), nn.Flatten(2),
        nn.LayerNorm(16), nn.RMSNorm(16), addnorm.ScaleNorm(16),
    )
    assert addnorm.patch(model, norms=addnorm.patching.KINDS) == 4
    kinds = [type(m) for m in model]
    _randomize(model)
    model.eval()
    x = torch.randn(2, 3, 4, 4)
    scripted = torch.jit.script(model)
    assert [type(m) for m in model] == kinds  # scripting swapped nothing back
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)
        path = tmp_path / "model.pt"
        torch.jit.save(scripted, str(path))
        torch.save(x, str(tmp_path / "x.pt"))
        expected = scripted(x)
    torch.save(expected, str(tmp_path / "y.pt"))
    code = (
        "import sys, torch; sys.modules['addnorm'] = None\n"  # any import of addnorm fails
        f"m = torch.jit.load({str(path)!r}); x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"assert torch.equal(m(x), torch.load({str(tmp_path / 'y.pt')!r}))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class _FamilyRMSNorm(nn.Module):
    """A model family's own norm, as Llama's is written (``addnorm.patch`` recognises it)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("backend", [None, "torch", "numba"])
def test_jit_script_of_a_model_patched_with_a_family_norm_or_a_pinned_backend(backend):
    """A model whose norms ``addnorm.patch`` swapped with a pinned backend, or whose own
    norm class it took over, scripts (their forward took ``*args`` and read addnorm's
    attributes): the scripted model runs the original forwards (torch.nn's, the family's
    own), while the eager model keeps addnorm's, on the pinned backend (seen from a
    forward hook: the whole call, hooks too, runs inside it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), _FamilyRMSNorm(8), nn.RMSNorm(8),
                          nn.Unflatten(1, (4, 2)), nn.GroupNorm(2, 4))
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    assert addnorm.patch(model, backend=backend) == 4
    seen = []
    hook = model[2].register_forward_hook(lambda *_: seen.append(addnorm._backend._Choice.forced))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    assert seen == [backend]
    hook.remove()  # (TorchScript compiles a module's hooks too)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), expected, rtol=0, atol=0)
    assert model[2]._addnorm_backend == backend and type(model[2]).__bases__[0] is _FamilyRMSNorm


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("kwargs", [{"offset": 1.0}, {"casting_mode": "llama"}, {"casting_mode": "none"}])
def test_jit_script_refuses_what_torch_nn_rmsnorm_cannot_compute(kwargs):
    norm = addnorm.RMSNorm(8, **kwargs)
    model = nn.Sequential(nn.Linear(8, 8), norm)
    with pytest.raises(RuntimeError, match="offset=.*casting_mode="):
        torch.jit.script(model)
    assert model[1] is norm  # nothing swapped
    torch.jit.script(addnorm.RMSNorm(8, casting_mode="gemma"))  # torch's rounding: compiles


@pytest.mark.parametrize("case", range(len(SCRIPTABLE)), ids=lambda i: type(SCRIPTABLE[i][0]).__name__)
def test_fx_symbolic_trace_keeps_each_module_whole(case):
    """torch.fx.symbolic_trace keeps torch.nn's modules whole (one ``call_module`` node)
    and traces into any other; addnorm's modules are kept whole as well (tracing into
    them ran their checks on fx's proxies and raised), so fx-based tools see them as
    torch.nn's.  The traced module runs addnorm's forward: the same outputs, and in
    training the same running statistics, as the module called directly."""
    module, _, inputs = _scriptable_cases_fresh(case)
    _randomize(module)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = module

        def forward(self, x):
            return self.norm(x)

    class AddModel(Model):
        def forward(self, x, residual):
            return self.norm(x, residual)

    model = (AddModel if len(inputs) == 2 else Model)()
    traced = torch.fx.symbolic_trace(model)
    calls = [(n.op, n.target) for n in traced.graph.nodes if n.op not in ("placeholder", "output")]
    assert calls == [("call_module", "norm")]
    twin = copy.deepcopy(module)
    for training in (True, False):
        traced.train(training)
        twin.train(training)
        got, expected = traced(*inputs), twin(*inputs)
        for g, e in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, expected))):
            assert torch.equal(g, e)
        for (name, a), b in zip(module.named_buffers(), twin.buffers()):
            assert torch.equal(a, b), name


def test_fx_symbolic_trace_of_patched_models():
    """A model whose norms ``addnorm.patch`` swapped (torch.nn's, with or without a pinned
    backend, and a model family's own norm class) traces with fx, each norm one node."""
    for backend in (None, "numba"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), _FamilyRMSNorm(8), nn.RMSNorm(8))
        x = torch.randn(3, 8)
        with torch.no_grad():
            expected = model(x)
        assert addnorm.patch(model, backend=backend) == 3
        traced = torch.fx.symbolic_trace(model)
        assert [n.op for n in traced.graph.nodes][1:-1] == ["call_module"] * 4
        with torch.no_grad():
            torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)


def test_fx_traces_into_a_subclass_that_overrides_forward():
    """fx keeps a module whole only where its own forward is addnorm's: a subclass's
    forward is traced (here to its torch ops, and a call through super() is not taken
    for the whole module's call)."""

    class Shifted(addnorm.LayerNorm):
        def forward(self, input):
            return input + 1.0 if isinstance(input, torch.fx.Proxy) else super().forward(input) + 1.0

    traced = torch.fx.symbolic_trace(nn.Sequential(Shifted(4)))
    assert [n.op for n in traced.graph.nodes][1:-1] == ["call_function"]


def test_fx_records_addnorm_functional_calls_as_one_node():
    """A model that calls ``addnorm.functional`` traces with fx as one that calls
    torch.nn.functional does: each call one ``call_function`` node, run by addnorm at
    the traced module's call; the fused add's (y, r) unpacks."""
    import addnorm.functional as AF

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16))
            self.alpha = nn.Parameter(torch.tensor([0.7]))

        def forward(self, x, residual):
            y, r = AF.add_rms_norm(x, residual, 16, self.weight)
            y = AF.layer_norm(y + r, (16,), self.weight) + AF.dyt(y, self.alpha, self.weight)
            c = y.transpose(1, 2)  # (N, C, L)
            c = AF.group_norm(c, 4, self.weight) + AF.instance_norm(c) + AF.batch_norm(c, None, None, training=True)
            y = c.transpose(1, 2)
            return AF.scale_norm(y, self.alpha) + AF.rms_norm(y, 16, eps=1e-6)

    model = Model()
    traced = torch.fx.symbolic_trace(model)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert [t for t in targets if getattr(t, "__module__", "") == "addnorm.functional"] == [
        AF.add_rms_norm, AF.layer_norm, AF.dyt, AF.group_norm, AF.instance_norm, AF.batch_norm, AF.scale_norm,
        AF.rms_norm,
    ]
    x, residual = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    assert torch.equal(traced(x, residual), model(x, residual))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 12), (64, 1024)])
def test_rmsnorm_takes_an_inference_mode_input_as_torch_nn_does(shape, dtype):
    """An input made under ``torch.inference_mode`` (a cached embedding, a frozen
    encoder's output), normalized outside it by an RMSNorm with a trainable weight:
    torch.nn.RMSNorm records the graph and gives the weight's gradient (autograd refuses
    only to save an inference tensor, which its graph does not); addnorm's RMSNorm and
    AddRMSNorm give the same gradient.  Where torch.nn refuses, LayerNorm, addnorm
    refuses with torch's error, on torch's kernel (small) and on addnorm's (large)."""
    with torch.inference_mode():
        x = torch.randn(shape).to(dtype)
    dy = torch.randn(shape).to(dtype)
    ours, theirs = addnorm.RMSNorm(shape[-1]).to(dtype), nn.RMSNorm(shape[-1]).to(dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    ours(x).backward(dy)
    theirs(x).backward(dy)
    assert ours.weight.grad is not None
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype is torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(ours.weight.grad.float(), theirs.weight.grad.float(), **tolerance)
    # the fused add, residual an inference tensor too; the sum it returns is a new tensor
    fused = addnorm.AddRMSNorm(shape[-1]).to(dtype)
    with torch.inference_mode():
        residual = torch.zeros(shape, dtype=dtype)
    y, _ = fused(x, residual)
    y.backward(dy)
    torch.testing.assert_close(fused.weight.grad.float(), theirs.weight.grad.float(), **tolerance)
    for module in (addnorm.LayerNorm(shape[-1]).to(dtype), nn.LayerNorm(shape[-1]).to(dtype)):
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
            module(x)
