"""The tolerance rule of DESIGN.md section 6, a relative-error check for other
backends and devices, ways to make test inputs, one compiled training step checked
against eager, and a dispatch mode that lists the ops it sees."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import addnorm.reference as R


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    a, ref = a.detach(), ref.detach()
    d = (a.double() - ref.double()).abs()
    both_nan = a.isnan() & ref.isnan()
    return float(torch.where(both_nan, 0.0, d).max())


def assert_relative(ours, ref, tol, what, terms=1.0):
    """|ours - ref| at most ``tol`` relative to the reference's largest value, or to the
    size of the terms it is made of (``terms``) where that is larger: a result that is a
    difference of terms that cancel keeps their error, not its own size's.  The two
    tensors may sit on different devices."""
    scale = max(ref.detach().double().abs().max().item(), terms)
    err = (ours.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item() / scale
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def assert_close(ours, theirs, ref, dtype, what="output", floor_ulps=2.0, scale=None):
    """ours may be off the float64 reference by at most twice torch's own error for the
    same dtype and input, plus a floor of a few ulps of the reference's magnitude (or
    of ``scale``, where intermediates are larger than the result); and torch must be
    within rounding of the reference, so a wrong reference fails too."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != torch's {theirs.dtype}"
    if ref.numel() == 0:
        return
    ours, theirs, ref = ours.detach(), theirs.detach(), ref.detach()
    assert torch.equal(ours.isnan(), ref.isnan()), f"{what}: NaN pattern differs"
    finite = ref[ref.isfinite()]
    scale = max(1.0, scale or 0.0, float(finite.abs().max()) if finite.numel() else 1.0)
    floor = floor_ulps * torch.finfo(dtype).eps * scale
    err, torch_err = max_err(ours, ref), max_err(theirs, ref)
    # The reference itself must agree with torch up to rounding, or the rule is void.
    # (loose: rounding can be amplified, as by a large rstd, but a wrong formula is not)
    sane = 16 * floor + 0.01 * torch.finfo(dtype).eps ** 0.5 * scale
    assert torch_err <= sane, (
        f"{what} ({dtype}): torch is {torch_err:.3g} off the float64 reference "
        f"(allowed {sane:.3g}): the reference or the test is wrong"
    )
    assert err <= 2 * torch_err + floor, (
        f"{what} ({dtype}): error {err:.3g} against float64 reference exceeds "
        f"2 x torch's {torch_err:.3g} + {floor:.3g}"
    )


def rstd_scale(rows: torch.Tensor, centered: bool = True, eps: float = 1e-5) -> float | None:
    """How far a norm's backward amplifies rounding: 4 (a bound on the random cotangent)
    times the largest rstd over ``rows`` (statistics over the last dim).  A group of one
    value has rstd = 1/sqrt(eps) and a dx of exactly 0: its rounding is measured on this
    scale, not on the result's."""
    if rows.numel() == 0:
        return None
    r = rows.detach().double()
    var = r.var(-1, unbiased=False) if centered else r.pow(2).mean(-1)
    return 4.0 * float(var.add(eps).rsqrt().max())


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def as64(*tensors):
    return [None if t is None else leaf(t.detach().double()) for t in tensors]


def grads(out, inputs, dtype, seed=0):
    """Backpropagate a fixed random cotangent, representable in ``dtype``, through
    ``out`` (a tensor or a tuple); returns the grads of ``inputs``."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    g = torch.Generator().manual_seed(seed)
    cots = [
        torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype).to(o.dtype)
        for o in outs
    ]
    torch.autograd.backward(list(outs), cots)
    return [None if t is None else t.grad for t in inputs]


__all__ = ["R", "assert_close", "max_err", "leaf", "as64", "grads", "rstd_scale"]


def assert_same_step(eager, model, compiled, x, rtol=1e-4, grad_rtol=1e-3):
    """One training step of ``eager`` and of ``compiled`` (``model`` compiled, the same
    parameters): the same output, then the same parameter gradients."""
    ye, yc = eager(x), compiled(x)
    torch.testing.assert_close(yc, ye, rtol=rtol, atol=rtol)
    ye.square().sum().backward()
    yc.square().sum().backward()
    for (name, pe), (_, pc) in zip(eager.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=grad_rtol, atol=1e-4, msg=name)


class SeenOps(TorchDispatchMode):
    """A dispatch mode (as a tracer or FlopCounterMode is one) that runs each op and
    keeps its name in ``seen``: "aten.tanh.default", "addnorm.group_norm_fwd.default"."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))
