"""Every autograd mode torch.nn's norms support: forward AD (jvp), torch.func, double
backward; compared with torch.nn itself where torch has the norm."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import jvp, vmap

import addnorm.functional as AF

D = torch.float64
g = torch.Generator().manual_seed(0)
X = torch.randn(3, 4, 6, dtype=D, generator=g)
R = torch.randn(3, 4, 6, dtype=D, generator=g)
W6, B6 = torch.randn(6, dtype=D, generator=g), torch.randn(6, dtype=D, generator=g)
W4, B4 = torch.randn(4, dtype=D, generator=g), torch.randn(4, dtype=D, generator=g)
ALPHA = torch.tensor([0.7], dtype=D)
GAIN = torch.tensor([1.3], dtype=D)

# name -> (ours, torch's spelling of the same thing, inputs); each a function of its inputs
CASES = {
    "layer_norm": (lambda x, w, b: AF.layer_norm(x, (6,), w, b),
                   lambda x, w, b: F.layer_norm(x, (6,), w, b), (X, W6, B6)),
    "rms_norm": (lambda x, w: AF.rms_norm(x, (6,), w, 1e-5),
                 lambda x, w: F.rms_norm(x, (6,), w, 1e-5), (X, W6)),
    "add_layer_norm": (lambda x, r, w, b: AF.add_layer_norm(x, r, (6,), w, b),
                       lambda x, r, w, b: (F.layer_norm(x + r, (6,), w, b), x + r), (X, R, W6, B6)),
    "add_rms_norm": (lambda x, r, w: AF.add_rms_norm(x, r, (6,), w, 1e-5),
                     lambda x, r, w: (F.rms_norm(x + r, (6,), w, 1e-5), x + r), (X, R, W6)),
    "group_norm": (lambda x, w, b: AF.group_norm(x, 2, w, b),
                   lambda x, w, b: F.group_norm(x, 2, w, b), (X, W4, B4)),
    "instance_norm": (lambda x, w, b: AF.instance_norm(x, weight=w, bias=b),
                      lambda x, w, b: F.instance_norm(x, weight=w, bias=b), (X, W4, B4)),
    "batch_norm_train": (lambda x, w, b: AF.batch_norm(x, None, None, w, b, True),
                         lambda x, w, b: F.batch_norm(x, None, None, w, b, True), (X, W4, B4)),
    "batch_norm_eval": (lambda x, w, b: AF.batch_norm(x, torch.zeros(4, dtype=D), torch.ones(4, dtype=D) * 2, w, b),
                        lambda x, w, b: F.batch_norm(x, torch.zeros(4, dtype=D), torch.ones(4, dtype=D) * 2, w, b),
                        (X, W4, B4)),
    "dyt": (lambda x, a, w, b: AF.dyt(x, a, w, b),
            lambda x, a, w, b: w * torch.tanh(a * x) + b, (X, ALPHA, W6, B6)),
    "scale_norm": (lambda x, s: AF.scale_norm(x, s),
                   lambda x, s: s * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-5), (X, GAIN)),
}


def _tangents(inputs):
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in inputs)


@pytest.mark.parametrize("name", CASES)
def test_jvp_equals_torch(backend, name):
    ours, theirs, inputs = CASES[name]
    tangents = _tangents(inputs)
    out, tan = jvp(ours, inputs, tangents)
    ref_out, ref_tan = jvp(theirs, inputs, tangents)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(tan, ref_tan)


@pytest.mark.parametrize("name", CASES)
def test_forward_ad_dual_tensors(backend, name):
    """torch.autograd.forward_ad: the tangent of the output is there, and right."""
    ours, theirs, inputs = CASES[name]
    tangents = _tangents(inputs)
    with fwAD.dual_level():
        out = ours(*(fwAD.make_dual(p, t) for p, t in zip(inputs, tangents)))
        ref = theirs(*(fwAD.make_dual(p, t) for p, t in zip(inputs, tangents)))
        outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
        for o, r in zip(outs, refs):
            o_tan, r_tan = fwAD.unpack_dual(o).tangent, fwAD.unpack_dual(r).tangent
            assert o_tan is not None, "the tangent was dropped"
            torch.testing.assert_close(o_tan, r_tan)


@pytest.mark.parametrize("name", CASES)
def test_gradgradcheck(backend, name):
    """gradcheck and gradgradcheck with every check torch offers, batched gradients
    included (gradcheck vmaps the backward over them: on every output, the fused
    add+norms' residual sum too)."""
    ours, _, inputs = CASES[name]
    inputs = tuple(t.clone().requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(ours, inputs, check_batched_grad=True, check_forward_ad=True,
                                    check_undefined_grad=True)
    assert torch.autograd.gradgradcheck(ours, inputs, check_batched_grad=True, check_fwd_over_rev=True)


def _saved_on_cpu(f, *inputs):
    with torch.autograd.graph.save_on_cpu():
        return f(*inputs)


def _packed_copies(f, *inputs):
    """Every saved tensor packed as a copy, then the inputs overwritten behind autograd's
    back: the backward must read the copies, so a tensor kept on ``ctx`` outside
    ``save_for_backward`` (which the hooks never see) would give wrong gradients."""
    packed = []

    def pack(t):
        packed.append(t)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = f(*inputs)
    assert packed, "nothing was saved through the hooks"
    for t in inputs:
        t.data.mul_(-3.0).add_(1.0)  # (``.data``: no version bump, so nothing refuses it)
    return out


RECOMPUTING = {
    "checkpoint": lambda f, *xs: torch.utils.checkpoint.checkpoint(f, *xs, use_reentrant=False),
    "checkpoint_reentrant": lambda f, *xs: torch.utils.checkpoint.checkpoint(f, *xs, use_reentrant=True),
    "save_on_cpu": _saved_on_cpu,
    "saved_tensors_hooks": _packed_copies,
}


@pytest.mark.parametrize("how", RECOMPUTING)
@pytest.mark.parametrize("name", CASES)
def test_activation_checkpointing_and_saved_tensor_hooks(backend, name, how):
    """Training memory savers: activation checkpointing (the forward again in the
    backward, reentrant or not: the non-reentrant one also checks that the recomputation
    saves the same tensors) and saved-tensor hooks (offloading to the CPU, packing).
    The gradients of every input equal those of a plain backward, and torch's own."""
    ours, theirs, inputs = CASES[name]

    def loss(f):
        def run(*xs):
            out = f(*xs)
            return sum((o * o.detach().cos()).sum() for o in (out if isinstance(out, tuple) else (out,)))

        return run

    def grads(f, wrap):
        xs = tuple(t.clone().requires_grad_() for t in inputs)
        wrap(loss(f), *xs).backward()  # (the reentrant checkpoint refuses autograd.grad)
        return tuple(x.grad for x in xs)

    plain = grads(theirs, lambda f, *xs: f(*xs))
    torch.testing.assert_close(grads(ours, lambda f, *xs: f(*xs)), plain)
    torch.testing.assert_close(grads(ours, RECOMPUTING[how]), plain)


def test_gradient_penalty_equals_torch(backend):
    """create_graph=True, then backward through the gradient (WGAN-GP style): the same
    parameter gradients as torch.nn.LayerNorm's."""
    import addnorm

    grads = []
    for module in (addnorm.LayerNorm(6, dtype=D), torch.nn.LayerNorm(6, dtype=D)):
        torch.manual_seed(0)
        with torch.no_grad():
            module.weight.copy_(W6)
            module.bias.copy_(B6)
        x = X.clone().requires_grad_()
        (gx,) = torch.autograd.grad(module(x).pow(3).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        grads.append((x.grad, module.weight.grad, module.bias.grad))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs)


def test_first_order_backward_stays_on_the_kernel(monkeypatch):
    """Only a recorded backward (create_graph) takes the differentiable path."""
    from addnorm import reference

    calls = []
    real = reference.row_norm_backward
    monkeypatch.setattr(reference, "row_norm_backward", lambda *a: calls.append(1) or real(*a))
    x = X.clone().requires_grad_()
    AF.layer_norm(x, (6,)).sum().backward()
    assert not calls or _forced_torch_backend()
    (gx,) = torch.autograd.grad(AF.layer_norm(x, (6,)).pow(2).sum(), x, create_graph=True)
    assert calls


def _forced_torch_backend():
    import addnorm

    return not addnorm.backends()["numba"]


def test_vmap_over_samples(backend):
    """torch.func.vmap: per-sample calls, batched, equal to the batched call."""
    out = vmap(lambda x: AF.layer_norm(x, (6,), W6, B6))(X)
    torch.testing.assert_close(out, F.layer_norm(X, (6,), W6, B6))
    out = vmap(lambda x: AF.group_norm(x.unsqueeze(0), 2, W4, B4)[0])(X)
    torch.testing.assert_close(out, F.group_norm(X, 2, W4, B4))


def test_running_stats_take_no_tangent():
    """BatchNorm's running statistics are updated from the batch's, never dual."""
    import addnorm

    bn = addnorm.BatchNorm1d(4, dtype=D)
    with fwAD.dual_level():
        bn(fwAD.make_dual(X, torch.ones_like(X)))
        assert fwAD.unpack_dual(bn.running_mean).tangent is None


@pytest.mark.parametrize("name", CASES)
def test_transform_over_a_parameter_it_does_not_wrap(backend, name):
    """Inside torch.func.grad (or vmap), a norm of tensors the transform does not wrap: a
    model's Parameters, closed over, while the transform differentiates something else.
    Autograd records them as it would outside (a later backward reaches them), as
    torch's own norms do; ours raised torch's 'autograd.Function ... must override the
    setup_context staticmethod'."""
    ours, theirs, inputs = CASES[name]
    params = [t.clone().requires_grad_() for t in inputs]
    scale = torch.randn(X.shape, dtype=D, generator=torch.Generator().manual_seed(2))

    def loss(fn):
        return lambda s: sum((s * out).sum() for out in _outputs(fn(*params)))

    got, expected = torch.func.grad(loss(ours))(scale), torch.func.grad(loss(theirs))(scale)
    torch.testing.assert_close(got, expected)
    batched = vmap(lambda s: sum((s * out).sum() for out in _outputs(ours(*params))))(scale[None])
    torch.testing.assert_close(batched[0], loss(theirs)(scale))


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", CASES)
def test_batched_backward_equals_torch(backend, name):
    """A backward that a vmap batches: ``torch.autograd.functional.jacobian(vectorize=True)``
    (the legacy vmap) and ``torch.func.vmap`` over ``torch.autograd.grad``.  The
    gradients reach the backward as batched tensors, which no kernel can read by address
    ('Cannot access data pointer of Tensor that doesn't have storage'): there the
    backward runs the reference's torch ops, and equals torch's."""
    ours, theirs, inputs = CASES[name]

    def first(fn):
        return lambda *xs: _outputs(fn(*xs))[0]

    for fn in (ours, theirs):
        assert first(fn)(*inputs).shape == first(theirs)(*inputs).shape
    got = torch.autograd.functional.jacobian(first(ours), inputs, vectorize=True)
    expected = torch.autograd.functional.jacobian(first(theirs), inputs, vectorize=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = first(ours)(*leaves)
    basis = torch.eye(out.numel(), dtype=D)[:5].reshape(5, *out.shape)
    rows = vmap(lambda v: torch.autograd.grad(out, leaves, v, retain_graph=True))(basis)
    for r, e in zip(rows, expected):
        torch.testing.assert_close(r, e.reshape(out.numel(), *e.shape[out.dim():])[:5])
