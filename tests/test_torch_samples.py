"""torch's own test samples, run against addnorm: the OpInfo samples of
``torch.nn.functional``'s norms and the ModuleInfo inputs of torch.nn's norm modules (the
inputs torch's test suite checks its own norms with), and their error inputs.

Each result is held to the suite's rule (``helpers.assert_close``): at most twice
torch's own error against the float64 result of torch's same call, plus a few ulps.
Where torch raises, addnorm raises an instance of the same class."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import addnorm
import addnorm.functional as AF
from helpers import assert_close

pytest.importorskip("expecttest")  # torch.testing._internal's own dependency

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_OURS = {
    "nn.functional.layer_norm": AF.layer_norm,
    "nn.functional.rms_norm": AF.rms_norm,
    "nn.functional.group_norm": AF.group_norm,
    "nn.functional.batch_norm": AF.batch_norm,
    "nn.functional.instance_norm": AF.instance_norm,
}
MODULES = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
           "InstanceNorm3d", "LayerNorm", "RMSNorm"]


@functools.cache
def _db():
    """(op_db, module_db), imported when a test runs, not when pytest collects: they import
    triton, and test_triton.py must choose Triton's interpreter before anything does."""
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import module_db

    return op_db, module_db


def _ops(name):
    return [op for op in _db()[0] if op.name == name]


def _module_infos(name):
    return [m for m in _db()[1] if m.name == f"nn.{name}"]


def test_the_samples_are_there():
    assert all(_ops(name) for name in _OURS)
    assert all(len(_module_infos(name)) == 1 for name in MODULES)


def _copy(a, dtype=None):
    """A fresh leaf copy of a tensor argument (``dtype``: float64 for the reference)."""
    if not isinstance(a, torch.Tensor):
        return a
    t = a.detach().to(dtype or a.dtype, copy=True)
    return t.requires_grad_(a.requires_grad)


def _run(fn, input, args, kwargs, dtype=None):
    """(output, the gradients of the tensors that need one, the tensor arguments after
    the call: running statistics updated in place) of fn on copies of the arguments."""
    input, args = _copy(input, dtype), [_copy(a, dtype) for a in args]
    kwargs = {k: _copy(v, dtype) for k, v in kwargs.items()}
    out = fn(input, *args, **kwargs)
    leaves = [t for t in (input, *args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, cot.to(out.dtype), allow_unused=True) if leaves and out.requires_grad else ()
    after = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and not t.requires_grad]
    return out, grads, after


def _grad_scale(y):
    """``assert_close``'s scale for a gradient: rounding in the backward is amplified by
    up to ~4 |y| (as ``helpers.rstd_scale``), and an empty output has none."""
    return 4 * float(y.detach().abs().max()) if y.numel() else None


def _assert_like_torch(what, dtype, ours, theirs, reference):
    """ours, theirs, reference: (output, gradients, state after the call: running
    statistics) of addnorm, of torch, and of torch in float64, each held to
    ``assert_close``'s rule."""
    (y, g, state), (ty, tg, tstate), (ry, rg, rstate) = ours, theirs, reference
    assert_close(y, ty, ry, dtype, what)
    for k, (a, b, r) in enumerate(zip(g, tg, rg)):
        if r is None:  # an argument torch's result does not depend on
            assert a is None or not a.any(), f"{what}: gradient {k}"
        else:
            # a parameter's gradient sums the output's elements it scales (an
            # InstanceNorm1d weight's, 60 here): the rounding of a float32 sum grows as
            # the square root of its terms, and the order of the sum (ours or torch's)
            # decides which inputs land near the bound (2 ulps left one weight gradient
            # of 60 terms at 2.9 ulps against torch's 0.3, under one random state)
            terms = max(1, ry.numel() // max(1, a.numel()))
            assert_close(a, b, r, dtype, f"{what}: gradient {k}", floor_ulps=2.0 * terms**0.5,
                         scale=_grad_scale(ry))
    for a, b, r in zip(state, tstate, rstate):
        assert_close(a, b, r, a.dtype, f"{what}: state")


def _same_error(call_ours, call_torch):
    """Where torch raises, addnorm raises an instance of the same class; returns whether
    torch raised."""
    try:
        call_torch()
    except Exception as theirs:
        with pytest.raises(type(theirs) if type(theirs) is not NotImplementedError else RuntimeError):
            call_ours()
        return True
    return False


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", _OURS)
def test_functional_samples_give_torchs_results(backend, name, dtype):
    ours = _OURS[name]
    for op, i, s in ((op, i, s) for op in _ops(name) for i, s in enumerate(op.sample_inputs("cpu", dtype, requires_grad=True))):
        what = f"{op.name} {op.variant_test_name} sample {i}: input {tuple(s.input.shape)}, {s.kwargs}"
        if _same_error(lambda: _run(ours, s.input, s.args, s.kwargs), lambda: _run(op.op, s.input, s.args, s.kwargs)):
            continue
        _assert_like_torch(what, dtype, _run(ours, s.input, s.args, s.kwargs), _run(op.op, s.input, s.args, s.kwargs),
                           _run(op.op, s.input, s.args, s.kwargs, torch.float64))


def test_functional_error_inputs_raise_torchs_classes():
    for op in (op for name in _OURS for op in _ops(name)):
        if op.error_inputs_func is None:
            continue
        for e in op.error_inputs("cpu"):
            s = e.sample_input
            with pytest.raises(e.error_type if e.error_type is not NotImplementedError else RuntimeError):
                _OURS[op.name](s.input, *s.args, **s.kwargs)


def _module_pair(info, ours_cls, inp, dtype, training):
    args, kwargs = inp.constructor_input.args, inp.constructor_input.kwargs
    theirs = info.module_cls(*args, **kwargs).to(dtype).train(training)
    ours = ours_cls(*args, **kwargs).to(dtype).train(training)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", MODULES)
def test_module_inputs_give_torchs_results(backend, name, dtype, training):
    (info,) = _module_infos(name)
    ours_cls = getattr(addnorm, name)
    for i, inp in enumerate(info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                                      training=training)):
        ours, theirs = _module_pair(info, ours_cls, inp, dtype, training)
        reference = copy.deepcopy(theirs).double()
        what = f"input {i}: {inp.constructor_input.args} {inp.constructor_input.kwargs}"
        fa, fk = inp.forward_input.args, inp.forward_input.kwargs
        runs = []
        for module, to in ((ours, None), (theirs, None), (reference, torch.float64)):
            xs = [_copy(a, to) for a in fa]
            y = module(*xs, **fk)
            cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            leaves = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad] + list(module.parameters())
            g = torch.autograd.grad(y, leaves, cot.to(y.dtype), allow_unused=True) if y.requires_grad else ()
            runs.append((y, g, [b for b in module.buffers() if b.is_floating_point()]))
        _assert_like_torch(what, dtype, *runs)


def test_module_error_inputs_raise_torchs_classes():
    for info in (info for name in MODULES for info in _module_infos(name)):
        if info.module_error_inputs_func is None:
            continue
        ours_cls = getattr(addnorm, info.module_cls.__name__)
        for e in info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                               training=True):
            inp = e.module_error_input
            with pytest.raises(e.error_type):
                module = ours_cls(*inp.constructor_input.args, **inp.constructor_input.kwargs)
                module(*inp.forward_input.args, **inp.forward_input.kwargs)
