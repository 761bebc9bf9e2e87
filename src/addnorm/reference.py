"""The math of docs/design.md section 2, line by line, in plain torch.

This module is the ground truth every backend is tested against, and it is the
``torch`` backend itself.  Each norm is a forward and a hand-derived backward; the
``torch.autograd.Function`` classes at the bottom wire them together without any
autograd through the forward, so ``gradcheck`` in float64 checks the derivations.

Conventions shared by every function here:

* Statistics accumulate in float32, or float64 for float64 input (``acc_dtype``).
* Variance is two-pass, ``mean((x - mean(x))**2)``, with the mean corrected by the
  mean of the residuals, so rows with a mean of 1e4 and a standard deviation of 1 keep
  their precision in float32 (``E[x^2] - E[x]^2`` would lose every digit).
* The affine map is applied in the accumulation dtype and the output is cast to the
  input's dtype once, as ``torch.nn`` 2.13 does for LayerNorm and RMSNorm alike.
* Kernels never return a tensor that aliases an input (``torch.library`` custom ops
  forbid it), so "no residual" and "no weight" come back as ``None`` here and the op
  layer turns them into empty tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "acc_dtype",
    "rms_eps",
    "standardize",
    "standardize_backward",
    "CAST_ONCE",
    "CAST_XHAT",
    "CAST_EACH",
    "TORCH_ORDER",
    "ROUNDING",
    "CASTING_MODES",
    "row_norm_out_dtype",
    "round_to",
    "row_norm_forward",
    "row_norm_backward",
    "group_norm_forward",
    "group_norm_backward",
    "batch_norm_forward",
    "batch_norm_backward",
    "dyt_forward",
    "dyt_backward",
    "scale_norm_forward",
    "scale_norm_backward",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "group_norm",
    "batch_norm",
    "instance_norm",
    "dyt",
    "scale_norm",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics accumulate in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(x: Tensor) -> torch.memory_format:
    """The layout every backend's output takes after x: channels-last in, channels-last
    out; anything else comes back contiguous."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.ndim == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


# ---------------------------------------------------------------------------
# The one piece of math every norm shares: standardization over some dims.
# ---------------------------------------------------------------------------


def standardize(x: Tensor, dims: tuple[int, ...], eps: float, centered: bool = True):
    """Standardize ``x`` over ``dims`` (statistics kept with keepdim=True).

    centered:  mu = mean(x), var = mean((x - mu)^2)        (LayerNorm, BN, GN, IN)
    otherwise: mu = 0,       var = mean(x^2)               (RMSNorm)
    rstd = 1 / sqrt(var + eps),  xhat = (x - mu) * rstd

    Returns ``(xhat, mean, var, rstd)`` in the accumulation dtype; ``mean`` is None
    when not centered.
    """
    xf = x.to(acc_dtype(x.dtype))
    mean, xc = None, xf
    if centered:
        mean = xf.mean(dims, keepdim=True)
        xc = xf - mean
        # A large mean is rounded to half an ulp of itself (5e-4 at 1e4 in float32), which
        # shifts every centered value; the mean of the small, exactly computed residuals
        # recovers it (the corrected two-pass algorithm of Chan, Golub & LeVeque).
        shift = xc.mean(dims, keepdim=True)
        xc = xc - shift
        mean = mean + shift
    var = (xc * xc).mean(dims, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return xc * rstd, mean, var, rstd


def recenter(xf: Tensor, mean: Tensor, dims: tuple[int, ...]) -> Tensor:
    """x - mean for a mean that ``standardize`` computed from this x and was then rounded
    to the accumulation dtype: subtracting the residuals' mean again restores the bits
    the rounding lost, as the forward did."""
    xc = xf - mean
    return xc - xc.mean(dims, keepdim=True)


def standardize_backward(
    dxhat: Tensor, xhat: Tensor, rstd: Tensor, dims: tuple[int, ...], centered: bool = True
) -> Tensor:
    """Gradient through ``standardize``, given the gradient of its output xhat.

    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    (without the mean(dxhat) term when not centered), means over ``dims``.
    """
    g = dxhat - xhat * (dxhat * xhat).mean(dims, keepdim=True)
    if centered:
        g = g - dxhat.mean(dims, keepdim=True)
    return g * rstd


def _scale(weight: Tensor | None, offset: float, like: Tensor) -> Tensor | None:
    """The effective per-element scale ``weight + offset`` in the accumulation dtype."""
    if weight is None:
        return None
    w = weight.to(like.dtype)
    return w + offset if offset else w


def _affine(xhat: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    y = xhat if scale is None else xhat * scale
    return y if bias is None else y + bias.to(xhat.dtype)


def _sum_to(t: Tensor, dims: tuple[int, ...], like: Tensor) -> Tensor:
    """Sum a per-element gradient over ``dims`` and shape it like the parameter."""
    return t.sum(dims).reshape(like.shape).to(like.dtype)


# ---------------------------------------------------------------------------
# LayerNorm and RMSNorm over rows, with the optional fused residual add.
# ---------------------------------------------------------------------------


# How a row norm rounds its output in reduced precision (the kernels' ``cast``):
# ``functional`` maps RMSNorm's public ``casting_mode`` names onto these.  In float32 and
# float64 input all three compute the same function.
CAST_ONCE = 0  # xhat * scale in the accumulation dtype, rounded once (torch.nn, Gemma)
CAST_XHAT = 1  # xhat rounded to the input's dtype, then * scale (Llama, Mistral, Qwen, T5)
CAST_EACH = 2  # rstd, xhat and the scale each rounded to the input's dtype (Liger's "none")
# Added to one of the above: sum RMSNorm's squares in torch's own order, so the output is
# the model family's bit for bit (this module always does: it sums with torch.mean; a
# kernel otherwise uses its own, faster order, and the last float32 bit may differ).
TORCH_ORDER = 4
ROUNDING = 3  # the bits of a ``cast`` that say where it rounds (without TORCH_ORDER)


# RMSNorm's ``casting_mode``: the model families' orders of rounding, by name (Liger's
# names, plus torch's own).  "torch" and "gemma" round the same way; "gemma" says so for
# the family whose norm computes ``(1 + w) * xhat`` in float32 and casts once.
CASTING_MODES = {
    "torch": CAST_ONCE,
    "gemma": CAST_ONCE | TORCH_ORDER,
    "llama": CAST_XHAT | TORCH_ORDER,
    "none": CAST_EACH | TORCH_ORDER,
}


def row_norm_out_dtype(dtype: torch.dtype, weight: Tensor | None, cast: int) -> torch.dtype:
    """The output's dtype: the input's, or where xhat is rounded to it and then multiplied
    by a weight of another dtype, the promoted one (``weight * xhat.to(dtype)``)."""
    if cast & ROUNDING == CAST_ONCE or weight is None:
        return dtype
    return torch.promote_types(dtype, weight.dtype)


def round_to(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t rounded to ``dtype`` and widened back (nothing changes where t already fits)."""
    return t.to(dtype).to(t.dtype)


def row_norm_forward(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    offset: float,
    rms: bool,
    cast: int = CAST_ONCE,
    stats: bool = True,
):
    """LayerNorm (rms=False) or RMSNorm (rms=True) of the rows of ``x`` (*, D): its N
    rows of the last dim, of any leading shape (none: one row).

    With a residual: r = x + residual (in x's dtype, as an unfused ``x + residual``
    would round it), y = norm(r); otherwise r = x.
    LayerNorm: y = (r - mean) * rstd * w + b.   RMSNorm: y = r * rstd * (w + offset).
    ``cast`` says where the result is rounded (``CAST_ONCE``, ``CAST_XHAT``,
    ``CAST_EACH``); y has dtype ``row_norm_out_dtype``.

    Returns ``(y, r or None, mean (N,) or None, rstd (N,))``, rstd as y used it.
    ``stats=False`` says the caller wants y and r only: a backend may then return None
    for the statistics (this one does: a nested tensor's are no (N,) vector).
    """
    r = x if residual is None else x + residual
    xhat, mean, _, rstd = standardize(r, (-1,), eps, centered=not rms)
    scale = _scale(weight, offset, xhat)
    if cast & ROUNDING == CAST_EACH:
        rstd = round_to(rstd, x.dtype)
        rf = r.to(xhat.dtype)
        xhat = (rf if rms else recenter(rf, mean, (-1,))) * rstd
        scale = None if scale is None else round_to(scale, x.dtype)
    if cast & ROUNDING != CAST_ONCE:
        xhat = round_to(xhat, x.dtype)
    y = _affine(xhat, scale, bias).to(row_norm_out_dtype(x.dtype, weight, cast))
    r = None if residual is None else r
    if not stats:
        return y, r, None, None
    return y, r, None if rms else mean.reshape(-1), rstd.reshape(-1)


def row_norm_backward(
    dy: Tensor,
    dr: Tensor | None,
    r: Tensor,
    weight: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    offset: float,
    rms: bool,
    cast: int,
    bias: Tensor | None,
    wanted: tuple[bool, bool, bool] = (True, True, True),
):
    """Backward of ``row_norm_forward``.  Where the forward rounded xhat (``cast``), the
    gradient reaching it is rounded to the input's dtype, as autograd rounds the gradient
    of a ``.to(dtype)``; the rounding itself passes gradients straight through.

    r is the normalized input (x + residual, or x); dr the gradient flowing into the
    residual output, which joins dx: d(x) = d(residual) = dnorm(dy) + dr.
    ``wanted``: which of (dx, dweight, dbias) to compute (``ctx.needs_input_grad``).
    Returns ``(dx, dweight, dbias)``, each None where absent or not wanted.
    """
    acc = acc_dtype(r.dtype)
    rf = r.to(acc)
    rows = r.shape[:-1] + (1,)  # the statistics (N,) beside r (*, D)
    rstd = rstd.reshape(rows)
    xhat = (rf if rms else recenter(rf, mean.reshape(rows), (-1,))) * rstd
    dyf = dy.to(acc)
    dx = None
    if wanted[0]:
        scale = _scale(weight, offset, xhat)
        dxhat = dyf if scale is None else dyf * scale
        if cast & ROUNDING != CAST_ONCE:
            dxhat = round_to(dxhat, r.dtype)
        dx = standardize_backward(dxhat, xhat, rstd, (-1,), centered=not rms)
        if dr is not None:
            dx = dx + dr.to(acc)
        dx = dx.to(r.dtype)
    if cast & ROUNDING != CAST_ONCE:
        xhat = round_to(xhat, r.dtype)
    d = r.shape[-1]  # the parameters' gradients sum over the rows, of any leading shape
    dweight = None if weight is None or not wanted[1] else _sum_to((dyf * xhat).reshape(-1, d), (0,), weight)
    dbias = None if bias is None or not wanted[2] else _sum_to(dyf.reshape(-1, d), (0,), bias)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# GroupNorm (and so InstanceNorm's statistics): per (sample, group of channels).
# ---------------------------------------------------------------------------


def channel_view(t: Tensor | None, ndim: int) -> Tensor | None:
    """A per-channel vector (C,) viewed to broadcast over (N, C, *spatial)."""
    return None if t is None else t.reshape((1, -1) + (1,) * (ndim - 2))


def channel_dims(x: Tensor) -> tuple[int, ...]:
    """The dims of x (N, C, *spatial) that a per-channel statistic reduces: all but C."""
    return (0,) + tuple(range(2, x.ndim))


def _group_view(x: Tensor, num_groups: int) -> Tensor:
    """(N, C, *spatial) viewed as (N, G, C/G * prod(spatial)): one group per row."""
    return x.reshape(x.shape[0], num_groups, math.prod(x.shape[1:]) // num_groups)


def group_norm_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float
):
    """GroupNorm of ``x`` (N, C, *spatial): statistics per (n, group of C/G channels).

    y = (x - mean_ng) / sqrt(var_ng + eps) * w_c + b_c.
    Returns ``(y, mean (N, G), var (N, G))``; InstanceNorm (G = C) updates its
    running statistics from them, the backward derives rstd from var.
    """
    xhat, mean, var, _ = standardize(_group_view(x, num_groups), (-1,), eps)
    xhat = xhat.reshape(x.shape)
    scale = channel_view(_scale(weight, 0.0, xhat), x.ndim)
    y = _affine(xhat, scale, channel_view(bias, x.ndim)).to(x.dtype)
    return y, mean.squeeze(-1), var.squeeze(-1)


def group_norm_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    num_groups: int,
    eps: float,
    bias: Tensor | None,
):
    """Backward of ``group_norm_forward``: returns ``(dx, dweight, dbias)``."""
    acc = acc_dtype(x.dtype)
    rstd = torch.rsqrt(var + eps).unsqueeze(-1)
    xhat = recenter(_group_view(x.to(acc), num_groups), mean.unsqueeze(-1), (-1,)) * rstd
    dyf = dy.to(acc)
    scale = channel_view(_scale(weight, 0.0, dyf), x.ndim)
    dxhat = _group_view(dyf if scale is None else dyf * scale, num_groups)
    dx = standardize_backward(dxhat, xhat, rstd, (-1,)).reshape(x.shape)
    reduce = channel_dims(x)
    xhat = xhat.reshape(x.shape)
    dweight = None if weight is None else _sum_to(dyf * xhat, reduce, weight)
    dbias = None if bias is None else _sum_to(dyf, reduce, bias)
    return dx.to(x.dtype), dweight, dbias


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, n: int, momentum: float
) -> None:
    """r <- (1 - momentum) * r + momentum * batch, in place, as torch does; the running
    variance takes the unbiased batch variance var * n / (n - 1) (n values per stat).
    mean and var are per channel (C,), or (N, C) per sample and channel, averaged over
    the samples (InstanceNorm's)."""
    acc = mean.dtype
    mean, var = mean.detach(), var.detach()  # statistics, never a path for (forward) gradients
    if mean.ndim == 2:
        mean, var = mean.mean(0), var.mean(0)
    unbiased = var * (n / (n - 1)) if n > 1 else var
    with torch.no_grad():
        running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(acc))
        running_var.copy_(momentum * unbiased + (1 - momentum) * running_var.to(acc))


# ---------------------------------------------------------------------------
# BatchNorm: per channel, over (N, *spatial); batch statistics or running ones.
# ---------------------------------------------------------------------------


def batch_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
):
    """BatchNorm of ``x`` (N, C, *spatial).

    training: mean_c, var_c are the batch's (biased) statistics over (N, *spatial);
    otherwise the running ones.  y = (x - mean_c) / sqrt(var_c + eps) * w_c + b_c.
    Returns ``(y, mean (C,), var (C,))`` in the accumulation dtype; the caller updates
    running statistics from them, the backward derives rstd from var.
    """
    reduce = channel_dims(x)
    if training:
        xhat, mean, var, _ = standardize(x, reduce, eps)
    else:
        acc = acc_dtype(x.dtype)
        mean = channel_view(running_mean.to(acc, copy=True), x.ndim)
        var = channel_view(running_var.to(acc, copy=True), x.ndim)
        xhat = (x.to(acc) - mean) * torch.rsqrt(var + eps)
    scale = channel_view(_scale(weight, 0.0, xhat), x.ndim)
    y = _affine(xhat, scale, channel_view(bias, x.ndim)).to(x.dtype)
    return y, mean.flatten(), var.flatten()


def batch_norm_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    training: bool,
    eps: float,
    bias: Tensor | None,
):
    """Backward of ``batch_norm_forward``: returns ``(dx, dweight, dbias)``.

    In training the statistics depend on x (the standardize backward); in eval they
    are constants and dx = dy * w_c * rstd_c.
    """
    acc = acc_dtype(x.dtype)
    reduce = channel_dims(x)
    mean = channel_view(mean, x.ndim)
    rstd = torch.rsqrt(channel_view(var, x.ndim) + eps)
    xc = recenter(x.to(acc), mean, reduce) if training else x.to(acc) - mean
    xhat = xc * rstd
    dyf = dy.to(acc)
    scale = channel_view(_scale(weight, 0.0, dyf), x.ndim)
    dxhat = dyf if scale is None else dyf * scale
    dx = standardize_backward(dxhat, xhat, rstd, reduce) if training else dxhat * rstd
    dweight = None if weight is None else _sum_to(dyf * xhat, reduce, weight)
    dbias = None if bias is None else _sum_to(dyf, reduce, bias)
    return dx.to(x.dtype), dweight, dbias


# ---------------------------------------------------------------------------
# DyT (Dynamic Tanh): a norm-free replacement, y = w * tanh(alpha * x) + b.
# ---------------------------------------------------------------------------


def dyt_forward(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None):
    """DyT of the rows of ``x`` (N, D): y = w * tanh(alpha * x) + b, alpha a scalar
    (broadcasting: x of any shape whose trailing dims w and b have)."""
    acc = acc_dtype(x.dtype)
    t = torch.tanh(alpha.to(acc) * x.to(acc))
    return _affine(t, _scale(weight, 0.0, t), bias).to(x.dtype)


def dyt_backward(
    dy: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None
):
    """Backward of ``dyt_forward``; with t = tanh(alpha x), dt/d(alpha x) = 1 - t^2.

    dx = dy * w * alpha * (1 - t^2);  dalpha = sum(dy * w * x * (1 - t^2));
    dw = sum_rows(dy * t);  db = sum_rows(dy).
    Returns ``(dx, dalpha, dweight, dbias)``.
    """
    acc = acc_dtype(x.dtype)
    xf, dyf, a = x.to(acc), dy.to(acc), alpha.to(acc)
    t = torch.tanh(a * xf)
    scale = _scale(weight, 0.0, t)
    dpre = (dyf if scale is None else dyf * scale) * (1 - t * t)
    dalpha = (dpre * xf).sum().reshape(alpha.shape).to(alpha.dtype)
    dweight = None if weight is None else _sum_to(dyf * t, (0,), weight)
    dbias = None if bias is None else _sum_to(dyf, (0,), bias)
    return (dpre * a).to(x.dtype), dalpha, dweight, dbias


# ---------------------------------------------------------------------------
# ScaleNorm (Nguyen & Salazar, 2019): y = g * x / max(||x||_2, eps), g a scalar.
# ---------------------------------------------------------------------------


def scale_norm_forward(x: Tensor, weight: Tensor, eps: float, stats: bool = True):
    """ScaleNorm of the rows of ``x`` (N, D).  Returns ``(y, rnorm (N,))`` where
    rnorm = 1 / max(||x||, eps) (None without ``stats``)."""
    xf = x.to(acc_dtype(x.dtype))
    rnorm = 1.0 / torch.linalg.vector_norm(xf, dim=-1, keepdim=True).clamp_min(eps)
    y = xf * rnorm * weight.to(xf.dtype)
    return y.to(x.dtype), rnorm.squeeze(-1) if stats else None


def scale_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rnorm: Tensor, eps: float):
    """Backward of ``scale_norm_forward``.  With u = x * rnorm and the norm above eps,
    du/dx = rnorm * (I - u u^T), so dx = g * rnorm * (dy - u * sum(dy * u)); where the
    norm is clamped to eps, rnorm is constant and dx = g * rnorm * dy.
    dg = sum(dy * u).  Returns ``(dx, dweight)``."""
    acc = acc_dtype(x.dtype)
    xf, dyf = x.to(acc), dy.to(acc)
    rnorm = rnorm.unsqueeze(-1)
    u = xf * rnorm
    unclamped = (rnorm < 1.0 / eps) if eps > 0 else torch.ones_like(rnorm, dtype=torch.bool)
    proj = torch.where(unclamped, (dyf * u).sum(-1, keepdim=True), 0.0)
    dx = weight.to(acc) * rnorm * (dyf - u * proj)
    dweight = (dyf * u).sum().reshape(weight.shape).to(weight.dtype)
    return dx.to(x.dtype), dweight


# ---------------------------------------------------------------------------
# autograd.Functions: the forwards above, differentiated by the backwards above.
# Every tensor argument may be None where the forward allows it.
# ---------------------------------------------------------------------------


class RowNormFunction(torch.autograd.Function):
    """LayerNorm / RMSNorm of rows, with an optional fused residual add.
    Returns ``(y, r)``; r is None without a residual."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, offset, rms, cast):
        y, r, mean, rstd = row_norm_forward(x, residual, weight, bias, eps, offset, rms, cast)
        ctx.save_for_backward(x if r is None else r, weight, bias, mean, rstd)
        ctx.args = (offset, rms, cast)
        ctx.has_residual = residual is not None
        return y, r

    @staticmethod
    def backward(ctx, dy, dr):
        r, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = row_norm_backward(dy, dr, r, weight, mean, rstd, *ctx.args, bias)
        return dx, dx if ctx.has_residual else None, dw, db, None, None, None, None


class GroupNormFunction(torch.autograd.Function):
    """Returns ``(y, mean, var)``; mean and var are not differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps):
        y, mean, var = group_norm_forward(x, weight, bias, num_groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.args = (num_groups, eps)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, bias, mean, var = ctx.saved_tensors
        dx, dw, db = group_norm_backward(dy, x, weight, mean, var, *ctx.args, bias)
        return dx, dw, db, None, None


class BatchNormFunction(torch.autograd.Function):
    """Returns ``(y, mean, var)``; mean and var are not differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, eps):
        y, mean, var = batch_norm_forward(x, weight, bias, running_mean, running_var, training, eps)
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.args = (training, eps)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, bias, mean, var = ctx.saved_tensors
        dx, dw, db = batch_norm_backward(dy, x, weight, mean, var, *ctx.args, bias)
        return dx, dw, db, None, None, None, None


class DyTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, weight, bias):
        ctx.save_for_backward(x, alpha, weight, bias)
        return dyt_forward(x, alpha, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        return dyt_backward(dy, *ctx.saved_tensors)


class ScaleNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rnorm = scale_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rnorm)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rnorm = ctx.saved_tensors
        dx, dw = scale_norm_backward(dy, x, weight, rnorm, ctx.eps)
        return dx, dw, None


# ---------------------------------------------------------------------------
# The same signatures as addnorm.functional, with no checks and no backends:
# what the tests compare every backend against (usually in float64).
# ---------------------------------------------------------------------------


def _rows(x: Tensor, normalized_shape) -> tuple[Tensor, int]:
    d = 1
    for s in (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape:
        d *= s
    return x.reshape(-1, d), d


def _row_norm(x, residual, normalized_shape, weight, bias, eps, offset, rms, cast=CAST_ONCE):
    x2, d = _rows(x, normalized_shape)
    r2 = None if residual is None else residual.reshape(-1, d)
    w = None if weight is None else weight.reshape(d)
    b = None if bias is None else bias.reshape(d)
    y, r = RowNormFunction.apply(x2, r2, w, b, eps, offset, rms, cast)
    return y.reshape(x.shape), None if r is None else r.reshape(x.shape)


def rms_eps(eps: float | None, dtype: torch.dtype) -> float:
    """RMSNorm's eps: ``None`` means the machine epsilon of the dtype statistics are
    computed in (``acc_dtype``), as torch does: float32's for float16, bfloat16 and
    float32 input, float64's for float64."""
    if eps is not None:
        return eps
    machine = _MACHINE_EPS.get(dtype)
    if machine is None:  # (torch.finfo costs ~0.3 µs a call: once per dtype)
        machine = _MACHINE_EPS[dtype] = torch.finfo(acc_dtype(dtype)).eps
    return machine


_MACHINE_EPS: dict[torch.dtype, float] = {}


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return _row_norm(input, None, normalized_shape, weight, bias, eps, 0.0, False)[0]


def rms_norm(input, normalized_shape, weight=None, eps=None, *, offset=0.0, casting_mode="torch"):
    eps, cast = rms_eps(eps, input.dtype), CASTING_MODES[casting_mode]
    return _row_norm(input, None, normalized_shape, weight, None, eps, offset, True, cast)[0]


def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    return _row_norm(x, residual, normalized_shape, weight, bias, eps, 0.0, False)


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, *, offset=0.0, casting_mode="torch"):
    eps, cast = rms_eps(eps, x.dtype), CASTING_MODES[casting_mode]
    return _row_norm(x, residual, normalized_shape, weight, None, eps, offset, True, cast)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    return GroupNormFunction.apply(input, weight, bias, num_groups, eps)[0]


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    y, mean, var = BatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, training, eps
    )
    if training and running_mean is not None:
        n = input.numel() // input.shape[1]
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
    return y


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    if not use_input_stats:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    y, mean, var = GroupNormFunction.apply(input, weight, bias, input.shape[1], eps)
    if running_mean is not None:
        n = input[0, 0].numel()
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
    return y


def dyt(input, alpha, weight=None, bias=None):
    d = input.shape[-1] if weight is None else weight.numel()
    w = None if weight is None else weight.reshape(d)
    b = None if bias is None else bias.reshape(d)
    return DyTFunction.apply(input.reshape(-1, d), alpha, w, b).reshape(input.shape)


def scale_norm(input, weight, eps=1e-5):
    x2 = input.reshape(-1, input.shape[-1])
    return ScaleNormFunction.apply(x2, weight, eps).reshape(input.shape)
