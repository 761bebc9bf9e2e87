"""The ``numba`` backend: row-parallel CPU kernels, compiled on first use, cached on disk.

The functions at the bottom have the signatures of ``addnorm.reference``'s kernels and
are what ``addnorm.ops`` calls; the ``@njit`` kernels above them do the work on numpy
views of the tensors, with no copies.

How the kernels are built:

* One kernel serves LayerNorm and RMSNorm, with and without the residual add: optional
  arrays are passed as ``None`` and numba compiles a specialization per combination
  with the ``is None`` branches pruned, so the flags cost nothing in the inner loops.
* bfloat16 travels as its uint16 bit pattern (numba has no bfloat16): ``ld`` widens it
  to float32 exactly, ``st`` rounds to nearest-even on the way out (NaN stays NaN).
  float16 is widened to float32 by torch first (numba has no float16 arithmetic).
* Statistics accumulate in float32 (float64 for float64 input); ``fastmath`` allows only
  reassociation and fused multiply-add, so sums vectorize but NaN and Inf propagate.
* LayerNorm's mean is corrected by the mean of the residuals (the corrected two-pass
  algorithm, as ``reference.standardize``): rows with mean 1e4 keep float32 precision.
  A row is read from memory once; the later passes find it in cache.
* Parameter gradients are summed per fixed chunk of rows, then the chunks are added in
  order: the same bits on every run and for every thread count.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from ..reference import acc_dtype

_FASTMATH = {"reassoc", "contract"}
_JIT = {"parallel": True, "cache": True, "fastmath": _FASTMATH, "nogil": True}
_GRAD_CHUNKS = 32  # row chunks whose parameter-gradient partial sums are added in order


# ---------------------------------------------------------------------------
# dtype plumbing, resolved at compile time.
# ---------------------------------------------------------------------------


def ld(a, i):
    """a[i] widened to the accumulation type (bfloat16 bits -> float32)."""


def st(a, i, v):
    """a[i] = v, rounded to a's dtype (float32 -> bfloat16 bits: nearest-even)."""


def acc(a, v):
    """v as a's accumulation type: float64 for float64 arrays, float32 otherwise."""


@overload(ld, inline="always")
def _ld(a, i):
    if a.dtype == types.uint16:
        return lambda a, i: np.uint32(np.uint32(a[i]) << 16).view(np.float32)
    return lambda a, i: a[i]


@overload(st, inline="always")
def _st(a, i, v):
    if a.dtype == types.uint16:

        def store_bfloat16(a, i, v):
            f = np.float32(v)
            bits = f.view(np.uint32)
            if f != f:  # keep NaN a (quiet) NaN; rounding could carry it into Inf
                a[i] = np.uint16((bits >> 16) | 0x40)
            else:
                a[i] = np.uint16((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)

        return store_bfloat16

    def store(a, i, v):
        a[i] = v

    return store


@overload(acc, inline="always")
def _acc(a, v):
    if a.dtype == types.float64:
        return lambda a, v: np.float64(v)
    return lambda a, v: np.float32(v)


# ---------------------------------------------------------------------------
# LayerNorm / RMSNorm rows, with or without the residual add.
# ---------------------------------------------------------------------------


@njit(inline="always")
def _moments(block):
    """Mean and biased variance of a 2D block (rows x contiguous run), corrected two-pass:
    returns (mean0, shift, var) with mean = mean0 + shift, where shift (the mean of
    x - mean0) recovers mean0's rounding; centre values as (x - mean0) - shift."""
    rows, cols = block.shape
    inv = acc(block, 1.0) / acc(block, max(1, rows * cols))
    s = acc(block, 0.0)
    for i in range(rows):
        for j in range(cols):
            s += ld(block, (i, j))
    mean0 = s * inv
    s1, s2 = acc(block, 0.0), acc(block, 0.0)
    for i in range(rows):
        for j in range(cols):
            dv = ld(block, (i, j)) - mean0
            s1 += dv
            s2 += dv * dv
    shift = s1 * inv
    return mean0, shift, max(s2 * inv - shift * shift, acc(block, 0.0))


@njit(inline="always")
def _mean_square(block):
    rows, cols = block.shape
    s = acc(block, 0.0)
    for i in range(rows):
        for j in range(cols):
            v = ld(block, (i, j))
            s += v * v
    return s * (acc(block, 1.0) / acc(block, max(1, rows * cols)))


@njit(**_JIT)
def _row_norm_fwd(x, res, w, b, y, r_out, mean_out, rstd_out, eps, offset):
    """y = norm(x [+ res]) per row; mean_out None means RMSNorm."""
    n, d = x.shape
    eps_, offset_, zero = acc(x, eps), acc(x, offset), acc(x, 0.0)
    for i in prange(n):
        if res is None:
            src = x[i : i + 1]
        else:  # r = x + res rounded to x's dtype, as an unfused add would give
            for j in range(d):
                st(r_out, (i, j), ld(x, (i, j)) + ld(res, (i, j)))
            src = r_out[i : i + 1]
        if mean_out is None:
            mean0, shift, var = zero, zero, _mean_square(src)
        else:
            mean0, shift, var = _moments(src)
            mean_out[i] = mean0 + shift
        rstd = acc(x, 1.0) / np.sqrt(var + eps_)
        rstd_out[i] = rstd
        for j in range(d):
            h = (ld(src, (0, j)) - mean0 - shift) * rstd
            if w is not None:
                h = h * (ld(w, j) + offset_)
            if b is not None:
                h = h + ld(b, j)
            st(y, (i, j), h)


@njit(**_JIT)
def _row_norm_bwd(dy, dr, src, w, mean, rstd, offset, dx, dw_part, db_part):
    """dx (+ dr) per row, and per-chunk partial sums of dw, db; mean None: RMSNorm.

    With g = dy * w and xc = x - mean: xhat = (xc - shift) * rstd, where shift is the
    residual mean (recovering the saved mean's rounding), and
    dx = rstd * g - rstd * mean(g) - (xc - shift) * rstd^3 * mean(g * (xc - shift)).
    """
    n, d = src.shape
    chunks = dw_part.shape[0] if dw_part is not None else db_part.shape[0] if db_part is not None else 1
    inv_d, offset_, zero = acc(src, 1.0 / d), acc(src, offset), acc(src, 0.0)
    for c in prange(chunks):
        for i in range(c * n // chunks, (c + 1) * n // chunks):
            rs = rstd[i]
            m = zero if mean is None else mean[i]
            a_sum, b_sum, s_sum = zero, zero, zero
            for j in range(d):
                xc = ld(src, (i, j)) - m
                g = ld(dy, (i, j))
                if w is not None:
                    g = g * (ld(w, j) + offset_)
                a_sum += g * xc
                b_sum += g
                s_sum += xc
            if mean is None:
                shift, mean_g = zero, zero
            else:
                shift, mean_g = s_sum * inv_d, b_sum * inv_d
            c3 = rs * rs * rs * (a_sum - shift * b_sum) * inv_d
            for j in range(d):
                xs = ld(src, (i, j)) - m - shift
                gy = ld(dy, (i, j))
                g = gy if w is None else gy * (ld(w, j) + offset_)
                v = rs * (g - mean_g) - xs * c3
                if dr is not None:
                    v = v + ld(dr, (i, j))
                st(dx, (i, j), v)
                if dw_part is not None:
                    dw_part[c, j] += gy * xs * rs
                if db_part is not None:
                    db_part[c, j] += gy


@njit(parallel=True, cache=True, nogil=True)
def _sum_chunks(part, out):
    """out[j] = sum over chunks of part[c, j], chunks in order: deterministic."""
    for j in prange(part.shape[1]):
        s = part[0, j]
        for c in range(1, part.shape[0]):
            s += part[c, j]
        st(out, j, s)


# ---------------------------------------------------------------------------
# GroupNorm and BatchNorm over (N, C, L) contiguous or (N, L, C) channels-last.
# In every backward, with g = dy * w_c and xs = x - mean (centred as in the forward):
#   training: dx = rstd * (g - mean(g)) - xs * rstd^3 * mean(g * xs)
#   eval (BatchNorm with running statistics): dx = rstd * g
#   dw_c = sum(dy * xs) * rstd,  db_c = sum(dy)   (sums over each channel's elements)
# ---------------------------------------------------------------------------


@njit(inline="always")
def _channel_affine(w, b, c, rstd, mean):
    """y = x * scale + shift for channel c: the affine map folded with the statistics."""
    scale = rstd if w is None else rstd * ld(w, c)
    shift = -mean * scale
    return scale, shift if b is None else shift + ld(b, c)


@njit(**_JIT)
def _group_norm_fwd(x, w, b, y, mean_out, var_out, eps):
    """x, y: (N, G, C/G, L) contiguous; one (n, g) group per parallel step."""
    n, groups, cpg, length = x.shape
    eps_ = acc(x, eps)
    for ng in prange(n * groups):
        i, g = ng // groups, ng % groups
        block = x[i, g].reshape((1, cpg * length))
        mean0, shift, var = _moments(block)
        mean_out[i, g], var_out[i, g] = mean0 + shift, var
        rstd = acc(x, 1.0) / np.sqrt(var + eps_)
        for k in range(cpg):
            scale, bias = _channel_affine(w, b, g * cpg + k, rstd, shift)
            for j in range(length):
                st(y, (i, g, k, j), (ld(x, (i, g, k, j)) - mean0) * scale + bias)


@njit(**_JIT)
def _group_norm_bwd(dy, x, w, mean, var, eps, dx, dw_part, db_part):
    """dx per (n, g) group; per-sample partial sums dw_part[n, c], db_part[n, c]."""
    n, groups, cpg, length = x.shape
    eps_, zero = acc(x, eps), acc(x, 0.0)
    inv = acc(x, 1.0) / acc(x, max(1, cpg * length))
    for ng in prange(n * groups):
        i, g = ng // groups, ng % groups
        m = mean[i, g]
        rstd = acc(x, 1.0) / np.sqrt(var[i, g] + eps_)
        a_sum, b_sum, s_sum = zero, zero, zero
        for k in range(cpg):
            c = g * cpg + k
            wc = acc(x, 1.0) if w is None else ld(w, c)
            dyx, dys, xs = zero, zero, zero
            for j in range(length):
                xc = ld(x, (i, g, k, j)) - m
                gy = ld(dy, (i, g, k, j))
                dyx += gy * xc
                dys += gy
                xs += xc
            a_sum += wc * dyx
            b_sum += wc * dys
            s_sum += xs
            dw_part[i, c], db_part[i, c] = dyx, dys
        shift = s_sum * inv
        c3 = rstd * rstd * rstd * (a_sum - shift * b_sum) * inv
        mean_g = b_sum * inv
        for k in range(cpg):
            c = g * cpg + k
            wc = acc(x, 1.0) if w is None else ld(w, c)
            dw_part[i, c] = (dw_part[i, c] - shift * db_part[i, c]) * rstd
            for j in range(length):
                xs = ld(x, (i, g, k, j)) - m - shift
                st(dx, (i, g, k, j), rstd * (ld(dy, (i, g, k, j)) * wc - mean_g) - xs * c3)


@njit(**_JIT)
def _batch_norm_fwd(x, w, b, y, mean, var, training, eps):
    """x, y: (N, C, L) contiguous; one channel per parallel step.  In training mean and
    var are outputs (the batch's), otherwise inputs (the running statistics)."""
    n, channels, length = x.shape
    eps_ = acc(x, eps)
    for c in prange(channels):
        if training:
            mean0, shift, v = _moments(x[:, c, :])
            mean[c], var[c] = mean0 + shift, v
        else:
            mean0, shift, v = acc(x, mean[c]), acc(x, 0.0), acc(x, var[c])
        rstd = acc(x, 1.0) / np.sqrt(v + eps_)
        scale, bias = _channel_affine(w, b, c, rstd, shift)
        for i in range(n):
            for j in range(length):
                st(y, (i, c, j), (ld(x, (i, c, j)) - mean0) * scale + bias)


@njit(**_JIT)
def _batch_norm_bwd(dy, x, w, mean, var, training, eps, dx, dw, db):
    """dx, and the per-channel dw, db in the accumulation dtype (each channel summed by
    one thread, in order)."""
    n, channels, length = x.shape
    eps_, zero = acc(x, eps), acc(x, 0.0)
    inv = acc(x, 1.0) / acc(x, max(1, n * length))
    for c in prange(channels):
        m = acc(x, mean[c])
        rstd = acc(x, 1.0) / np.sqrt(acc(x, var[c]) + eps_)
        wc = acc(x, 1.0) if w is None else ld(w, c)
        dyx, dys, xs = zero, zero, zero
        for i in range(n):
            for j in range(length):
                xc = ld(x, (i, c, j)) - m
                gy = ld(dy, (i, c, j))
                dyx += gy * xc
                dys += gy
                xs += xc
        shift = xs * inv if training else zero
        dyxs = dyx - shift * dys  # sum(dy * (x - mean)), with the mean's rounding undone
        dw[c], db[c] = dyxs * rstd, dys
        if training:
            c3 = rstd * rstd * rstd * wc * dyxs * inv
            mean_g = wc * dys * inv
        else:
            c3, mean_g = zero, zero
        for i in range(n):
            for j in range(length):
                xsh = ld(x, (i, c, j)) - m - shift
                st(dx, (i, c, j), rstd * (ld(dy, (i, c, j)) * wc - mean_g) - xsh * c3)


# ---------------------------------------------------------------------------
# torch <-> numpy, and the functions addnorm.ops calls.
# ---------------------------------------------------------------------------


def _np(t: torch.Tensor | None):
    """A zero-copy numpy view; bfloat16 as its uint16 bits."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.bfloat16: np.uint16}


def _empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor in numpy's memory.  numpy asks the kernel for huge pages
    on large allocations (madvise), so first touching a 64 MB output costs ~3 ms instead
    of the ~15 ms of page faults that torch's allocator takes on the 4 KB pages of a
    fresh mmap.  The tensor is an ordinary CPU tensor (only not resizable)."""
    t = torch.from_numpy(np.empty(shape, dtype=_NUMPY_DTYPES[dtype]))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _kernel_dtype(t: torch.Tensor | None) -> torch.Tensor | None:
    """float16 widened to float32 (numba has no float16); others as they are, contiguous."""
    if t is None:
        return None
    if t.dtype == torch.float16:
        return t.float()
    return t.contiguous()


def _threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def row_norm_forward(x, residual, weight, bias, eps, offset, rms):
    _threads()
    out_dtype = x.dtype
    xk, rk = _kernel_dtype(x), _kernel_dtype(residual)
    wk, bk = _kernel_dtype(weight), _kernel_dtype(bias)
    n = x.shape[0]
    acc = acc_dtype(xk.dtype)
    y = _empty(xk.shape, xk.dtype)
    r = None if residual is None else _empty(xk.shape, xk.dtype)
    mean = None if rms else torch.empty(n, dtype=acc)
    rstd = torch.empty(n, dtype=acc)
    _row_norm_fwd(_np(xk), _np(rk), _np(wk), _np(bk), _np(y), _np(r), _np(mean), _np(rstd),
                  float(eps), float(offset))
    if out_dtype == torch.float16:
        y = y.to(out_dtype)
        r = None if r is None else r.to(out_dtype)
    return y, r, mean, rstd


def row_norm_backward(dy, dr, r, weight, mean, rstd, offset, rms, bias):
    _threads()
    out_dtype = r.dtype
    dyk, drk, rk, wk = (_kernel_dtype(t) for t in (dy, dr, r, weight))
    n, d = r.shape
    acc = acc_dtype(rk.dtype)
    chunks = max(1, min(n, _GRAD_CHUNKS))
    dx = _empty(rk.shape, rk.dtype)
    dw_part = None if weight is None else torch.zeros(chunks, d, dtype=acc)
    db_part = None if bias is None else torch.zeros(chunks, d, dtype=acc)
    _row_norm_bwd(_np(dyk), _np(drk), _np(rk), _np(wk), None if rms else _np(mean), _np(rstd),
                  float(offset), _np(dx), _np(dw_part), _np(db_part))
    dw, db = _param_grad(dw_part, weight), _param_grad(db_part, bias)
    return dx.to(out_dtype), dw, db


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) as a contiguous (N, C, L) tensor (a view when it already is)."""
    return _kernel_dtype(x).contiguous().view(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def _like_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A kernel result of shape (N, C, L) in x's shape and dtype (the op restores x's
    memory format)."""
    return t.view(x.shape).to(x.dtype)


def group_norm_forward(x, weight, bias, num_groups, eps):
    _threads()
    x3 = _channels_first(x)
    n, c, length = x3.shape
    acc = acc_dtype(x3.dtype)
    y = _empty(x3.shape, x3.dtype)
    mean, var = torch.empty(n, num_groups, dtype=acc), torch.empty(n, num_groups, dtype=acc)
    shape4 = (n, num_groups, c // num_groups, length)
    _group_norm_fwd(_np(x3.view(shape4)), _np(_kernel_dtype(weight)), _np(_kernel_dtype(bias)),
                    _np(y.view(shape4)), _np(mean), _np(var), float(eps))
    return _like_input(y, x), mean, var


def group_norm_backward(dy, x, weight, mean, var, num_groups, eps, bias):
    _threads()
    x3, dy3 = _channels_first(x), _channels_first(dy)
    n, c, length = x3.shape
    acc = acc_dtype(x3.dtype)
    dx = _empty(x3.shape, x3.dtype)
    dw_part, db_part = torch.empty(n, c, dtype=acc), torch.empty(n, c, dtype=acc)
    shape4 = (n, num_groups, c // num_groups, length)
    _group_norm_bwd(_np(dy3.view(shape4)), _np(x3.view(shape4)), _np(_kernel_dtype(weight)),
                    _np(mean), _np(var), float(eps), _np(dx.view(shape4)), _np(dw_part), _np(db_part))
    return _like_input(dx, x), _param_grad(dw_part, weight), _param_grad(db_part, bias)


def _param_grad(part: torch.Tensor, param: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter's gradient from per-sample (or per-chunk) partial sums (rows of
    ``part``), added in order; in the parameter's dtype."""
    if param is None:
        return None
    out = torch.empty(part.shape[1], dtype=_kernel_dtype(param).dtype)
    _sum_chunks(_np(part), _np(out))
    return out.to(param.dtype)


def batch_norm_forward(x, weight, bias, running_mean, running_var, training, eps):
    _threads()
    x3 = _channels_first(x)
    acc = acc_dtype(x3.dtype)
    c = x3.shape[1]
    if training:
        mean, var = torch.empty(c, dtype=acc), torch.empty(c, dtype=acc)
    else:
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    y = _empty(x3.shape, x3.dtype)
    _batch_norm_fwd(_np(x3), _np(_kernel_dtype(weight)), _np(_kernel_dtype(bias)), _np(y),
                    _np(mean), _np(var), training, float(eps))
    return _like_input(y, x), mean, var


def batch_norm_backward(dy, x, weight, mean, var, training, eps, bias):
    _threads()
    x3, dy3 = _channels_first(x), _channels_first(dy)
    acc = acc_dtype(x3.dtype)
    c = x3.shape[1]
    dx = _empty(x3.shape, x3.dtype)
    dw, db = torch.empty(c, dtype=acc), torch.empty(c, dtype=acc)
    _batch_norm_bwd(_np(dy3), _np(x3), _np(_kernel_dtype(weight)), _np(mean), _np(var),
                    training, float(eps), _np(dx), _np(dw), _np(db))
    return (
        _like_input(dx, x),
        None if weight is None else dw.to(weight.dtype),
        None if bias is None else db.to(bias.dtype),
    )
