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
def _sum_row(x, res, r_out, i, squares):
    """One pass over row i: the sum of its values (or of their squares); with a
    residual, the values are x + res rounded to x's dtype, stored into r_out."""
    s = acc(x, 0.0)
    for j in range(x.shape[1]):
        if res is None:
            v = ld(x, (i, j))
        else:
            st(r_out, (i, j), ld(x, (i, j)) + ld(res, (i, j)))
            v = ld(r_out, (i, j))
        s += v * v if squares else v
    return s


@njit(**_JIT)
def _row_norm_fwd(x, res, w, b, y, r_out, mean_out, rstd_out, eps, offset):
    """y = norm(x [+ res]) per row; mean_out None means RMSNorm."""
    n, d = x.shape
    inv_d, eps_, offset_ = acc(x, 1.0 / d), acc(x, eps), acc(x, offset)
    zero = acc(x, 0.0)
    for i in prange(n):
        src = x if res is None else r_out
        if mean_out is None:
            mean0, shift = zero, zero
            var = _sum_row(x, res, r_out, i, True) * inv_d
        else:
            mean0 = _sum_row(x, res, r_out, i, False) * inv_d
            s1, s2 = zero, zero
            for j in range(d):
                dv = ld(src, (i, j)) - mean0
                s1 += dv
                s2 += dv * dv
            shift = s1 * inv_d  # the rounding error of mean0, recovered
            var = max(s2 * inv_d - shift * shift, zero)
            mean_out[i] = mean0 + shift
        rstd = acc(x, 1.0) / np.sqrt(var + eps_)
        rstd_out[i] = rstd
        for j in range(d):
            h = (ld(src, (i, j)) - mean0 - shift) * rstd
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
    dw = db = None
    if weight is not None:
        dw = torch.empty(d, dtype=wk.dtype)
        _sum_chunks(_np(dw_part), _np(dw))
        dw = dw.to(weight.dtype)
    if bias is not None:
        db = torch.empty(d, dtype=_kernel_dtype(bias).dtype)
        _sum_chunks(_np(db_part), _np(db))
        db = db.to(bias.dtype)
    return dx.to(out_dtype), dw, db
