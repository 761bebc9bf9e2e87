"""The ``numba`` backend: row-parallel CPU kernels, compiled on first use, cached on disk.

The functions at the bottom have the signatures of ``addnorm.reference``'s kernels and
are what ``addnorm.ops`` calls; the ``@njit`` kernels above them do the work on numpy
views of the tensors, with no copies.

How the kernels are built:

* One kernel serves LayerNorm and RMSNorm, with and without the residual add: optional
  arrays are passed as ``None`` and numba compiles a specialization per combination
  with the ``is None`` branches pruned, so the flags cost nothing in the inner loops.
* bfloat16 and float16 travel as their bit patterns, uint16 and int16 (numba can do no
  arithmetic in either): ``ld`` widens them to float32 exactly, ``st`` rounds to
  nearest-even on the way out, bit-equal to torch's own conversions (NaN included).
  bfloat16 in integer selects that keep the loops vectorized; float16 by LLVM's own
  ``half`` conversions, which the CPU does in vector registers (F16C on x86).  Where no
  value can be NaN (statistics of x that are finite: x holds no NaN or Inf), the
  stores are ``st_number``, without bfloat16's NaN select (~1/4 of a store loop).
* Every reduction is blocked: a block of values (``_BLOCK`` along a contiguous run,
  ``_CL_BLOCK`` channels-last rows) is summed in the accumulation type, in vector lanes,
  and the block sums are added in float64, so the error does not grow with the length
  of a row, a group or a channel (a single float32 accumulator over 9.4M values is off by
  ~1e-4).  ``fastmath`` allows only reassociation, so sums vectorize, NaN and Inf
  propagate, and no product is fused into an add: the same product rounds the same way
  in every loop, and a normalization group of one value gets a gradient of exactly 0.
* LayerNorm's mean is corrected by the mean of the residuals (the corrected two-pass
  algorithm, as ``reference.standardize``): rows with mean 1e4 keep float32 precision.
  The first pass takes the mean of a row's first block only, the second centres on it
  (and runs again around the mean where that block lies more than a standard deviation
  off it).  A row is read from memory once; the later passes find it in cache.
* Parameter gradients are summed per fixed chunk of rows, then the chunks are added in
  order: the same bits on every run and for every thread count.

All kernels live in this one file on purpose: numba's on-disk cache is invalidated by
changes to the cached function's own source file only, so a helper in another module
could change without its callers being recompiled.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import os
import sys
import threading
import warnings
from typing import NamedTuple
from types import SimpleNamespace

import numba
import numpy as np
import torch
from numba import prange, types
from numba.core import cgutils
from llvmlite import binding as llvm, ir
from numba.extending import intrinsic, overload

from .. import _backend
from . import _numba_cache  # noqa: F401  (locks numba's cache index before anything compiles)
from . import _torch_threads
from .. import reference
from ..reference import ROUNDING, TORCH_ORDER, acc_dtype, memory_format, row_norm_out_dtype


def _choose_threading_layer() -> None:
    """Where the parallel kernels' threads come from, unless the user chose a layer:
    torch's own OpenMP threads where torch runs on an OpenMP runtime we find
    (``_torch_threads``: no second pool spinning beside torch's); else TBB, numba's layer
    that is both fork-safe and thread-safe (numba's own GNU OpenMP cannot run in a forked
    child: numba kills it).  pip's ``tbb`` wheel puts libtbb in ``<prefix>/lib``, which a
    virtual environment does not search, so it is loaded from there by path, also for a
    user who chose TBB."""
    chosen = (os.environ.get("NUMBA_THREADING_LAYER") or str(numba.config.THREADING_LAYER)).lower()
    if chosen == "default" and _torch_threads.install():
        return
    if chosen not in ("default", "tbb", "safe", "threadsafe", "forksafe"):
        return
    for lib in ("libtbb.so.12", "libtbb.12.dylib"):
        path = os.path.join(sys.prefix, "lib", lib)
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass
    if chosen != "default":
        return
    try:
        importlib.import_module("numba.np.ufunc.tbbpool")  # fails without a usable libtbb
    except ImportError:
        return
    numba.config.THREADING_LAYER = "tbb"


_choose_threading_layer()


def _retire_in_forked_child() -> None:
    """numba's own GNU OpenMP layer cannot run in a child forked after it started (numba
    kills such a child): the child runs the reference backend, and says so once.  (On
    torch's threads, ``_torch_threads``, the child's kernels run on its calling thread.)"""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel ran before the fork: the child can start its own
        return
    if layer == "omp" and not _torch_threads.installed():
        why = "the process was forked after numba's GNU OpenMP threads started"
        _backend.retire("numba", why)
        warnings.warn(
            f"addnorm: {why}; this process runs the slower 'torch' backend. Install the "
            "'tbb' package (fork-safe threads) to keep the numba kernels in forked workers.",
            RuntimeWarning,
            stacklevel=2,
        )


os.register_at_fork(after_in_child=_retire_in_forked_child)


def njit(*args, **options):
    """numba's ``njit`` with numpy's error model: a float divided by zero is inf or NaN, as
    in torch (an rstd of 1 / sqrt(0) where var + eps is 0), not Python's
    ZeroDivisionError, which numba's default model raises (and checks for in every loop)."""
    options.setdefault("error_model", "numpy")
    return numba.njit(*args, **options)


_FASTMATH = {"reassoc"}
# DyT's kernels also let LLVM fuse a multiply and an add into one FMA: its tanh is a
# Horner chain of them, and without "contract" each step was a multiply and an add on
# the vector ports (1.43 against 0.93 ns a float32 value on one core of the Intel Xeon)
_FASTMATH_FMA = _FASTMATH | {"contract"}
_JIT = {"parallel": True, "cache": True, "fastmath": _FASTMATH, "nogil": True}
_BLOCK = 512  # values of a contiguous run summed in float32 lanes before a float64 add
# LayerNorm's (and add+LayerNorm's) float16/bfloat16 rows take ``_moments``' one pass up
# to this many values (other rows, channels and groups up to ``_BLOCK``): its float64
# lanes cost more than the two passes' float32 ones on the Intel Xeon (the kernel, float16
# 4096x256: 251 against 223 µs, 2048x512: 239 against 208; torch's kernel 235 and 203),
# and the bits of the float64 mean, which float32 outputs show, are lost in a half
# output's rounding.  On the AMD EPYC the one pass was ~1.03x faster at 256 values.
_NARROW_ROW_ONE_PASS = 128
_CL_BLOCK = 128  # channels-last rows summed per channel before a float64 add
_ROW_BLOCK = 32  # rows whose parameter-gradient terms are summed before a float64 add
_SUM_TILE = 256  # columns per parallel step when partial sums are added
_SUM_SERIAL_BELOW = 1 << 16  # partial sums added on the calling thread (see ``_sum_chunks``)


# ---------------------------------------------------------------------------
# dtype plumbing, resolved at compile time.
# ---------------------------------------------------------------------------


@intrinsic
def _half_to_float(typingctx, bits):
    """float16 bits (int16) -> float32, exactly: LLVM's ``fpext half``, which x86's F16C
    (and ARM's fcvt) do in vector registers."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _float_to_half(typingctx, v):
    """float32 -> float16 bits (int16): LLVM's ``fptrunc`` to half rounds to nearest-even
    and keeps Inf, NaN and subnormals, the bits torch's own conversion gives."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(v), codegen


def ld(a, i):
    """a[i] widened to the accumulation type (bfloat16 or float16 bits -> float32)."""


def st(a, i, v):
    """a[i] = v, rounded to a's dtype (float32 -> bfloat16 or float16 bits: nearest-even,
    NaN as torch writes it)."""


def acc(a, v):
    """v as a's accumulation type: float64 for float64 arrays, float32 otherwise."""


def scratch(a, shape):
    """An uninitialized array of ``shape`` in a's accumulation type."""


def rnd(a, v):
    """v (the accumulation type) rounded to a's dtype as ``st`` rounds it, and widened
    back: ``ld(a, i)`` after ``st(a, i, v)``, without the store."""


def st_number(a, i, v):
    """``st(a, i, v)`` for a v known not to be NaN (it may be +-Inf): a bfloat16 store
    without the NaN select, ~1/4 of a store-bound loop's time."""


def narrow(a):
    """Whether a holds bfloat16 or float16 bits: a compile-time constant, so a branch on
    it is pruned."""


def _bfloat16_rounded(builder, bits):
    """float32 ``bits`` (i32) rounded to bfloat16, nearest-even: the 16 bits in an i32.
    Right for every value but NaN, which the carry can turn into Inf or -0."""
    i32 = ir.IntType(32)
    odd = builder.and_(builder.lshr(bits, i32(16)), i32(1))
    return builder.lshr(builder.add(builder.add(bits, i32(0x7FFF)), odd), i32(16))


@intrinsic
def _bfloat16_bits(typingctx, v):
    """float32 v rounded to bfloat16 (nearest-even), as its 16 bits in a uint32: what ``st``
    stores and ``rnd`` widens back.  NaN as torch's vectorized conversion writes it
    (0xFFFF: rounding could carry it to Inf).  Written as LLVM IR in 32-bit integers with
    a select: in numba's Python integers (promoted to 64 bits, the NaN case a branch) the
    loops around it vectorized only after a second optimization round, which a kernel
    gets when loaded from numba's cache but not in the process that compiled it (there
    bfloat16 rows ran ~4x slower)."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        nan = builder.icmp_unsigned(">", builder.and_(bits, i32(0x7FFFFFFF)), i32(0x7F800000))
        return builder.select(nan, i32(0xFFFF), _bfloat16_rounded(builder, bits))

    return types.uint32(types.float32), codegen


@intrinsic
def _bfloat16_number_bits(typingctx, v):
    """``_bfloat16_bits`` of a float32 v that is not NaN (+-Inf and overflow carry to +-Inf)."""

    def codegen(context, builder, signature, args):
        return _bfloat16_rounded(builder, builder.bitcast(args[0], ir.IntType(32)))

    return types.uint32(types.float32), codegen


@intrinsic
def _bfloat16_to_float(typingctx, bits):
    """bfloat16 bits (uint16) -> float32, exactly: the high half of a float32 (LLVM IR in
    32-bit integers, as ``_bfloat16_bits``)."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        return builder.bitcast(builder.shl(builder.zext(args[0], i32), i32(16)), ir.FloatType())

    return types.float32(bits), codegen


@overload(ld, inline="always")
def _ld(a, i):
    if a.dtype == types.uint16:  # bfloat16: the high half of a float32
        return lambda a, i: _bfloat16_to_float(a[i])
    if a.dtype == types.int16:  # float16
        return lambda a, i: _half_to_float(a[i])
    return lambda a, i: a[i]


def _bfloat16_store(bits):
    """The store of a float32 value as the bfloat16 ``bits`` (an intrinsic) round it."""

    def store_bfloat16(a, i, v):
        a[i] = np.uint16(bits(np.float32(v)))

    return store_bfloat16


@overload(st, inline="always")
def _st(a, i, v):
    if a.dtype == types.uint16:
        return _bfloat16_store(_bfloat16_bits)
    if a.dtype == types.int16:

        def store_float16(a, i, v):
            a[i] = _float_to_half(np.float32(v))

        return store_float16

    def store(a, i, v):
        a[i] = v

    return store


@overload(st_number, inline="always")
def _st_number(a, i, v):
    if a.dtype == types.uint16:
        return _bfloat16_store(_bfloat16_number_bits)
    return lambda a, i, v: st(a, i, v)


@overload(narrow, inline="always")
def _narrow(a):
    bits = a.dtype in (types.uint16, types.int16)
    return lambda a: bits


@overload(scratch, inline="always")
def _scratch(a, shape):
    if a.dtype == types.float64:
        return lambda a, shape: np.empty(shape, dtype=np.float64)
    return lambda a, shape: np.empty(shape, dtype=np.float32)


@overload(rnd, inline="always")
def _rnd(a, v):
    if a.dtype == types.uint16:

        def round_bfloat16(a, v):
            return _bfloat16_to_float(np.uint16(_bfloat16_bits(np.float32(v))))

        return round_bfloat16
    if a.dtype == types.int16:
        return lambda a, v: _half_to_float(_float_to_half(np.float32(v)))
    return lambda a, v: v


@overload(acc, inline="always")
def _acc(a, v):
    if a.dtype == types.float64:
        return lambda a, v: np.float64(v)
    return lambda a, v: np.float32(v)


# Arrays by address.  ``Tensor.numpy()`` costs ~1.3 µs (a bfloat16 view ~2.3 µs), as much
# as a whole small kernel, so the row-norm entry points take ``data_ptr()``s and build the
# arrays inside: ``at(address, like, shape)``, with the dtype of the empty array ``like``
# (``_TOKENS``), a compile-time constant.


@intrinsic
def _pointer(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


def at(address, like, shape):
    """The C-contiguous array of ``like``'s dtype and ``shape`` at ``address``; None for None."""


@overload(at, inline="always")
def _at(address, like, shape):
    if isinstance(address, types.NoneType):
        return lambda address, like, shape: None
    return lambda address, like, shape: numba.carray(_pointer(address), shape, like.dtype)


# ---------------------------------------------------------------------------
# LayerNorm / RMSNorm rows, with or without the residual add.
# ---------------------------------------------------------------------------


@njit(inline="always")
def _run_sums(row, m, squares):
    """sum(row - m) and (if ``squares``) sum((row - m)^2) along one contiguous run, in
    float64: blocks of ``_BLOCK`` values summed in the accumulation type."""
    n = row.shape[0]
    s1, s2 = 0.0, 0.0
    for blk in range((n + _BLOCK - 1) // _BLOCK):
        lo = blk * _BLOCK  # plain ranges from 0: indices LLVM proves >= 0, so it vectorizes
        b1, b2 = acc(row, 0.0), acc(row, 0.0)
        for j in range(min(_BLOCK, n - lo)):
            dv = ld(row, lo + j) - m
            b1 += dv
            if squares:
                b2 += dv * dv
        s1 += np.float64(b1)
        s2 += np.float64(b2)
    return s1, s2


@njit(inline="always")
def _short_sums(run):
    """(sum(run), sum(run^2)) of a run of at most ``_BLOCK`` values, in float64: the
    values added in float64 lanes (the mean's bits), their squares in the accumulation
    type's."""
    s1, s2 = 0.0, acc(run, 0.0)
    for j in range(run.shape[0]):
        v = ld(run, j)
        s1 += np.float64(v)
        s2 += v * v
    return s1, np.float64(s2)


@njit(inline="always")
def _moments(x, c, one_pass):
    """Mean and biased variance of x[:, c, :] (x 3D, rows x[i, c] contiguous): returns
    (mean0, shift, var), mean = mean0 + shift, where shift recovers mean0's rounding to
    the accumulation type; centre values as (x - mean0) - shift.

    Up to ``one_pass`` values in all (``_BLOCK`` at most: a row norm's row, an
    InstanceNorm's channel, a GroupNorm's group of that size): one pass sums x in float64 lanes and x^2 in float32
    ones; where the mean lies within a standard deviation of 0 (mean^2 <= var: most
    activations), var = mean(x^2) - mean^2 loses at most a bit to cancellation and that
    pass is all.  More values, and those whose mean lies further out: the corrected
    two-pass algorithm around mean0, the mean of the first ``_BLOCK`` values (or of the
    one pass) -- the second pass sums x - mean0 and its squares, and runs again around
    the mean where mean0 lies more than a standard deviation off (shift^2 > var, which
    would cost var bits).  The one pass against the two (2 cores, numba's kernel):
    LayerNorm rows of 64 values 1.25x-1.35x faster, of 128 1.1x-1.2x, of 256 ~1.03x,
    InstanceNorm 32x256x14x14 1.17x-1.29x; the mean's error 0.001-0.009 ulp(1) against
    0.05-0.06, and float32 outputs more than 2 ulps off float64 at mean 0-0.5 ~8x fewer
    (~0.001 as many as torch's kernel leaves, where the two passes left 0.6).  Over more
    values the conversions to float64 cost 6-20% in cache (all of a bfloat16 BatchNorm
    8x512x64x64's channel: 20%), so those keep the two passes, whose first reads one
    block.  (A first pass over an eighth of a short row saved ~10% of LayerNorm's time
    where rows stream from memory, but centring on a mean0 that far off rounds the
    values near the mean coarser: float32 LayerNorm 20000x64 went from 2.4 to 4.6 ulps
    off float64 on average, torch's 2.6.)"""
    rows, length = x.shape[0], x.shape[2]
    count = np.float64(max(1, rows * length))
    if rows * length <= one_pass:
        s1, s2 = 0.0, 0.0
        for i in range(rows):
            a, b = _short_sums(x[i, c])
            s1 += a
            s2 += b
        mean = s1 / count
        var = s2 / count - mean * mean
        mean0 = acc(x, mean)
        if mean * mean <= var:  # (False for NaN and Inf: the passes below carry them)
            return mean0, acc(x, mean - np.float64(mean0)), acc(x, var)
    else:  # (rows >= 1 here)
        first = min(length, _BLOCK)
        mean0 = acc(x, _run_sums(x[0, c, :first], acc(x, 0.0), False)[0] / first)
    shift, var = _centred_moments(x, c, mean0, count)
    if shift * shift > var:
        mean0 = acc(x, mean0 + shift)
        shift, var = _centred_moments(x, c, mean0, count)
    return mean0, shift, var


@njit(inline="always")
def _centred_moments(x, c, mean0, count):
    """(mean of x[:, c, :] - mean0, its biased variance), from the sums of x - mean0
    and of its squares."""
    s1, s2 = 0.0, 0.0
    for i in range(x.shape[0]):
        a, b = _run_sums(x[i, c], mean0, True)
        s1 += a
        s2 += b
    shift = s1 / count
    return acc(x, shift), acc(x, max(s2 / count - shift * shift, 0.0))


@njit(inline="always")
def _mean_square(row):
    return acc(row, _run_sums(row, acc(row, 0.0), True)[1] / max(1, row.shape[0]))


@njit(cache=True, fastmath=False)  # explicit: numba gives an unset one the caller's reassoc
def _torch_mean_square(row, lanes, acc4):
    """mean(row**2) summed in exactly the order of torch's CPU ``sum`` (aten's
    ``cascade_sum`` over a contiguous row, ``lanes`` values to its vector): ``lanes``-wide
    vectors, four of them side by side (its ``ilp_factor``), summed in a cascade of four
    levels, then the leftover vectors, the four partial vectors, the scalar tail and the
    lanes, in that order.  An RMSNorm whose statistic is ``x.pow(2).mean(-1)`` (Llama's,
    torch.rms_norm itself) then gets the very same rstd, so the output is bit for bit the
    same.  A function of its own, compiled without ``reassoc``: the order is the point.
    ``acc4``: scratch, (4, 4 * lanes) of the accumulation type."""
    d = row.shape[0]
    zero = acc(row, 0.0)
    if d < lanes:  # torch's scalar loop: four running sums side by side
        width, units = 4, d // 4
    else:
        width, units = 4 * lanes, (d // lanes) // 4
    _cascade_squares(row, units, width, acc4)
    total = zero
    if d < lanes:
        total = acc4[0, 0]
        for j in range(units * 4, d):
            v = ld(row, j)
            total = acc(row, total + v * v)
        for k in range(1, 4):
            total = acc(row, total + acc4[0, k])
    else:
        vectors = d // lanes
        for i in range(units * 4, vectors):  # leftover vectors join the first partial sum
            for lane in range(lanes):
                v = ld(row, i * lanes + lane)
                acc4[0, lane] += v * v
        for k in range(1, 4):
            for lane in range(lanes):
                acc4[0, lane] += acc4[0, k * lanes + lane]
        for j in range(vectors * lanes, d):
            v = ld(row, j)
            total = acc(row, total + v * v)
        for lane in range(lanes):
            total = acc(row, total + acc4[0, lane])
    return acc(row, total / acc(row, d))


@njit(inline="always")
def _cascade_squares(row, units, width, acc4):
    """aten's ``multi_row_sum``: ``width`` running sums, sum c of row[i * width + c]**2 for
    i < units, each a cascade of four levels of 2**level_power values; the result in
    acc4[0].  The upper levels stay untouched (zero) for rows shorter than one step.
    Runs are read through slices from 0, so indices are provably >= 0 and the loops
    vectorize (across the ``width`` sums: no value changes order)."""
    a0, a1, a2, a3 = acc4[0], acc4[1], acc4[2], acc4[3]
    for c in range(width):
        a0[c] = 0.0
    power = max(4, _ceil_log2(units) // 4)
    step = 1 << power
    mask = step - 1
    i = 0
    if units >= step:
        for c in range(width):
            a1[c] = 0.0
            a2[c] = 0.0
            a3[c] = 0.0
        while i + step <= units:
            for k in range(i * width, (i + step) * width, width):
                run = row[k:k + width]
                for c in range(width):
                    v = ld(run, c)
                    a0[c] += v * v
            i += step
            for c in range(width):  # up the levels until one is not full (aten's break)
                a1[c] += a0[c]
                a0[c] = 0.0
            if i & (mask << power):
                continue
            for c in range(width):
                a2[c] += a1[c]
                a1[c] = 0.0
            if i & (mask << (2 * power)):
                continue
            for c in range(width):
                a3[c] += a2[c]
                a2[c] = 0.0
    for k in range(i * width, units * width, width):
        run = row[k:k + width]
        for c in range(width):
            v = ld(run, c)
            a0[c] += v * v
    if units >= step:
        for c in range(width):
            a0[c] += a1[c]
        for c in range(width):
            a0[c] += a2[c]
        for c in range(width):
            a0[c] += a3[c]


@njit(inline="always")
def _ceil_log2(n):
    """c10's CeilLog2: 1 for n <= 2, else the bit length of n - 1."""
    if n <= 2:
        return 1
    bits, m = 0, n - 1
    while m:
        bits += 1
        m >>= 1
    return bits


@njit(inline="always")
def _grad_sums(dyr, xr, m, w, offset, cast=0):
    """Along one contiguous run, in float64 (blocked as ``_run_sums``): sum(g * (x - m)),
    sum(g), sum(x - m), with g = dy * (w + offset) (g = dy where w is None), rounded to
    x's dtype where ``cast`` says the forward rounded xhat."""
    n = xr.shape[0]
    s_gx, s_g, s_x = 0.0, 0.0, 0.0
    for blk in range((n + _BLOCK - 1) // _BLOCK):
        lo = blk * _BLOCK  # as in ``_run_sums``
        b_gx, b_g, b_x = acc(xr, 0.0), acc(xr, 0.0), acc(xr, 0.0)
        for k in range(min(_BLOCK, n - lo)):
            j = lo + k
            xc = ld(xr, j) - m
            g = ld(dyr, j)
            if w is not None:
                g = g * (ld(w, j) + offset)
            if cast:
                g = rnd(xr, g)
            b_gx += g * xc
            b_g += g
            b_x += xc
        s_gx += np.float64(b_gx)
        s_g += np.float64(b_g)
        s_x += np.float64(b_x)
    return s_gx, s_g, s_x


@njit(inline="always", cache=True)
def _row_blocks(n):
    """How many blocks of ``_ROW_BLOCK`` rows cover n rows (each its own partial sums);
    called by the kernels and by their Python wrappers alike."""
    return (n + _ROW_BLOCK - 1) // _ROW_BLOCK


@njit(inline="always")
def _rows_per_task(n):
    """Rows per task of a parallel loop over n rows: up to ``_ROW_BLOCK``, and at least
    eight tasks where there are rows for them."""
    return max(1, min(_ROW_BLOCK, n // 8))


@njit(**_JIT)
def _row_norm_fwd(x, res, w, b, y, r_out, mean_out, rstd_out, eps, offset, cast, lanes):
    """y = norm(x [+ res]) per row; mean_out None means RMSNorm, an empty rstd_out that
    the statistics are not wanted (empty, not None: one compiled kernel serves a forward
    with and without autograd, where a None would compile another); ``cast`` as
    ``reference.row_norm_forward``'s; ``lanes`` as ``_torch_mean_square``'s, None for
    the kernel's own order.  Tasks of up to ``_ROW_BLOCK`` rows across threads."""
    n = x.shape[0]
    per = _rows_per_task(n)  # (a task's scratch is made once)
    for blk in prange((n + per - 1) // per):
        _row_norm_fwd_rows(x, res, w, b, y, r_out, mean_out, rstd_out, eps, offset, cast, lanes,
                           blk * per, min(n, (blk + 1) * per))


_NORM_CHUNK = 4096  # values of a chunk of narrow rows: 16 KB of float32, in L1
_STREAMED_CHUNK_BYTES = 8192  # a chunk of narrow rows streaming from memory: it and its output in L1
_STREAMED_BYTES = 32 << 20  # a call whose rows stream from memory (this machine's L3: 32 MB)
_WIDE_BYTES = 1024  # a row that streams on its own (see ``_chunk_rows``)


@njit(inline="always")
def _chunk_rows(x):
    """Rows per chunk of ``_row_norm_fwd_rows`` over x (n, d).  Where x streams from
    memory: 1 where its rows are wide enough to pay for a row's own loop set-up, else a
    chunk of ``_STREAMED_CHUNK_BYTES``, so that the chunk read and the output written
    stay in L1 together.  In cache: a chunk of about ``_NORM_CHUNK`` values.  (Two cores,
    ms: LayerNorm 65536x256 float32 5.0-5.3 chunked against 3.6-3.8 row by row, torch's
    3.3-3.8; but in cache 2048x256 0.075 chunked against 0.090, and rows of 512 bytes
    stream better chunked: 65536x64 float32 1.26 against 1.47, 65536x256 bfloat16 3.9
    against 4.3; LayerNorm 65536x128 float32 in chunks of 16 KB 2.40-3.34, of 8 KB
    2.08-2.79, torch's 2.33-2.51, RMSNorm 4096x128 in cache 60 against 64 µs.)"""
    n, d = x.shape
    row_bytes = d * x.itemsize
    if n * row_bytes >= _STREAMED_BYTES:
        return 1 if row_bytes >= _WIDE_BYTES else max(1, _STREAMED_CHUNK_BYTES // max(1, row_bytes))
    return max(1, _NORM_CHUNK // max(1, d))


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _row_norm_fwd_rows(x, res, w, b, y, r_out, mean_out, rstd_out, eps, offset, cast, lanes, lo, hi):
    """``_row_norm_fwd`` on rows lo..hi-1 on the calling thread: the body of each of its
    tasks, and the whole of a call that runs on one thread (where starting the parallel
    loop costs more, ~1 µs, than small rows themselves).  Rows go in chunks
    (``_chunk_rows``): the chunk's statistics, then its rows normalized, while they are
    still in L1.  A chunk of narrow rows in cache pays a row's loop set-up once (a loop per
    row cost narrow rows as much as their arithmetic: RMSNorm 4096x256 float32 on one
    thread 206 -> 140 µs); rows streaming from memory go one by one, so that the reads of
    the next row overlap the writes of this one rather than alternate in 16 KB bursts."""
    n, d = x.shape
    eps_, offset_, zero = acc(x, eps), acc(x, offset), acc(x, 0.0)
    acc4 = scratch(x, (4, 4 * (0 if lanes is None else lanes)))  # used by torch-order sums only
    src = x if res is None else r_out  # the rows normalized: x, or r = x + res
    # ``_moments``' (runs, groups, length) view of them, made once: made per row, it cost
    # half the time of a LayerNorm row of 256 values
    src3 = src.reshape((1, n, d))
    per = max(1, min(hi - lo, _chunk_rows(x)))
    stats = scratch(x, (3, per))  # per row of a chunk: mean0, shift, rstd
    for c0 in range(lo, hi, per):
        c1 = min(hi, c0 + per)
        if res is not None and per == 1:
            _added_row(x[c0], res[c0], r_out[c0])
        elif res is not None:
            _added_rows(x, res, r_out, c0, c1)
        for i in range(c0, c1):
            row = src[i]
            if mean_out is None:
                # torch's order where asked (a function of its own, no reassoc); else ours.
                # lanes None prunes the branch: the default mode compiles no torch-order sum
                var = _mean_square(row) if lanes is None else _torch_mean_square(row, lanes, acc4)
                mean0, shift = zero, zero
            else:
                mean0, shift, var = _moments(src3, i, _NARROW_ROW_ONE_PASS if narrow(x) else _BLOCK)
                mean_out[i] = mean0 + shift
            rstd = acc(x, 1.0) / np.sqrt(var + eps_)
            if cast == 2:
                rstd = rnd(x, rstd)
            if rstd_out.shape[0]:
                rstd_out[i] = rstd
            stats[0, i - c0], stats[1, i - c0], stats[2, i - c0] = mean0, shift, rstd
        if per == 1:  # a streaming row, as rows and scalars (10-25% faster than a range of 2-D arrays)
            _normalized_row(src[c0], y[c0], stats[0, 0], stats[1, 0], stats[2, 0], w, b, offset_, cast)
        else:
            _normalized_rows(src, y, stats, w, b, offset_, cast, c0, c1)


@njit(inline="always")
def _add_into(xr, rr, out):
    """out = xr + rr, rounded to x's dtype, as an unfused add would give.  Called apart
    from the statistics' loop: inline in it, beside them, the add ran at half the speed
    of the same loop alone."""
    for j in range(xr.shape[0]):
        st(out, j, ld(xr, j) + ld(rr, j))


@njit(cache=True, nogil=True)
def _added_row(xr, rr, out):
    """``_add_into`` one streaming row, given as rows (10-20% faster there than
    ``_added_rows`` on a range of one row)."""
    _add_into(xr, rr, out)


@njit(cache=True, nogil=True)
def _added_rows(x, res, r_out, lo, hi):
    """``_add_into`` rows lo..hi-1: a chunk of narrow rows in one call."""
    for i in range(lo, hi):
        _add_into(x[i], res[i], r_out[i])


@njit(inline="always")
def _normalize_into(row, out, mean0, shift, rstd, w, b, offset, cast):
    """out = ((row - mean0 - shift) * rstd) * (w + offset) + b, in this order.  Inlined
    only into functions compiled without ``reassoc`` (it takes its caller's flags), so
    that the output's bits do not depend on the code around it (with or without the
    statistics stored, row by row or in chunks, ...).  ``cast`` 1 rounds xhat to row's
    dtype before the scale; 2 the scale too (``reference.CAST_*``)."""
    if cast == 0:  # separate loops, so the common one has no branch
        for j in range(row.shape[0]):
            h = (ld(row, j) - mean0 - shift) * rstd
            if w is not None:
                h = h * (ld(w, j) + offset)
            if b is not None:
                h = h + ld(b, j)
            st(out, j, h)
    else:
        for j in range(row.shape[0]):
            h = rnd(row, (ld(row, j) - mean0 - shift) * rstd)
            if w is not None:
                scale = ld(w, j) + offset
                h = h * (rnd(row, scale) if cast == 2 else scale)
            if b is not None:
                h = h + ld(b, j)
            st(out, j, h)


@njit(cache=True, fastmath=False)  # explicit: numba gives an unset one the caller's reassoc
def _normalized_row(row, out, mean0, shift, rstd, w, b, offset, cast):
    """``_normalize_into`` one row, its statistics given as scalars (a streaming row)."""
    _normalize_into(row, out, mean0, shift, rstd, w, b, offset, cast)


@njit(cache=True, fastmath=False)
def _normalized_rows(src, y, stats, w, b, offset, cast, lo, hi):
    """``_normalize_into`` rows lo..hi-1, (mean0, shift, rstd) = stats[:, i - lo]: a
    chunk of narrow rows in one call (a call per row of 64 values cost twice as much)."""
    for i in range(lo, hi):
        _normalize_into(src[i], y[i], stats[0, i - lo], stats[1, i - lo], stats[2, i - lo], w, b, offset, cast)


@njit(**_JIT)
def _row_norm_bwd(dy, dr, src, w, mean, rstd, offset, cast, dx, dw_part, db_part):
    """dx (+ dr) per row; dw_part[k], db_part[k]: sums over rows block k (``_ROW_BLOCK``
    rows, in the accumulation type), added in float64 and in order by ``_sum_chunks``.
    mean None: RMSNorm.  dx None: only the parameter sums (the input needs no gradient).

    With g = dy * w and xc = x - mean: xhat = (xc - shift) * rstd, where shift is the
    residual mean (recovering the saved mean's rounding), and
    dx = rstd * (g - mean(g)) - (xc - shift) * rstd^3 * mean(g * (xc - shift)).
    g is rounded the same way where it is summed and where it is used, so for a row of
    one value (g - mean(g) = 0, xc - shift = 0) dx is exactly 0, as the true gradient.
    Where the forward rounded xhat (``cast``), g and xhat are rounded to src's dtype, as
    autograd through a ``.to(dtype)`` rounds them (``reference.row_norm_backward``).
    """
    for k in prange(_row_blocks(src.shape[0])):
        # k as int64, the type of the serial loop's k (``_row_norm_bwd_at``): prange's
        # uint64 compiled the block a second time for every signature
        _row_norm_bwd_block(dy, dr, src, w, mean, rstd, offset, cast, dx, dw_part, db_part, np.int64(k))


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _row_norm_bwd_block(dy, dr, src, w, mean, rstd, offset, cast, dx, dw_part, db_part, k):
    """``_row_norm_bwd`` on row block k on the calling thread (as ``_row_norm_fwd_rows``)."""
    n, d = src.shape
    offset_, zero = acc(src, offset), acc(src, 0.0)
    if dw_part is not None:
        dw_part[k] = 0.0
    if db_part is not None:
        db_part[k] = 0.0
    for i in range(k * _ROW_BLOCK, min(n, (k + 1) * _ROW_BLOCK)):
        rs = rstd[i]
        m = zero if mean is None else mean[i]
        shift, mean_g, c3 = zero, zero, zero
        if dx is not None:
            s_gx, s_g, s_x = _grad_sums(dy[i], src[i], m, w, offset_, cast)
            s_gxs = s_gx
            if mean is not None:
                shift, mean_g, s_gxs = acc(src, s_x / d), acc(src, s_g / d), s_gx - s_x / d * s_g
            c3 = rs * rs * rs * acc(src, s_gxs / d)
        elif mean is not None and dw_part is not None:
            shift = acc(src, _run_sums(src[i], m, False)[0] / d)
        for j in range(d):
            xs = ld(src, (i, j)) - m - shift
            gy = ld(dy, (i, j))
            if dx is not None:
                g = gy if w is None else gy * (ld(w, j) + offset_)
                if cast:
                    g = rnd(src, g)
                v = rs * (g - mean_g) - xs * c3
                if dr is not None:
                    v = v + ld(dr, (i, j))
                st(dx, (i, j), v)
            if dw_part is not None:
                dw_part[k, j] += gy * (rnd(src, xs * rs) if cast else xs * rs)
            if db_part is not None:
                db_part[k, j] += gy


@njit(cache=True, nogil=True)
def _row_norm_fwd_at(n, d, x, tx, res, w, tw, b, tb, y, ty, r_out, mean_out, rstd_out, ts, eps, offset, cast,
                     lanes, threaded):
    """``_row_norm_fwd`` on (n, d) rows given by address: x, res, r_out of ``tx``'s
    dtype, y of ``ty``'s, w of ``tw``'s, b of ``tb``'s, mean_out and rstd_out of ``ts``'s.
    rstd_out 0: the statistics are not wanted (an empty array, see ``_row_norm_fwd``).
    ``threaded`` None: all rows on the calling thread (``_row_norm_fwd_rows``), without
    the parallel loop; True: in tasks across threads.  None, not False, so that numba
    compiles only the path a call takes: calls of a few rows (a decoding step, most of
    the tests) never compile the parallel kernel, which took as long as the rows'."""
    arrays = (at(x, tx, (n, d)), at(res, tx, (n, d)), at(w, tw, (d,)), at(b, tb, (d,)), at(y, ty, (n, d)),
              at(r_out, tx, (n, d)), at(mean_out, ts, (n,)), at(rstd_out, ts, (n if rstd_out else 0,)))
    if threaded is None:
        _row_norm_fwd_rows(*arrays, eps, offset, cast, lanes, 0, n)
    else:
        _row_norm_fwd(*arrays, eps, offset, cast, lanes)


@njit(cache=True, nogil=True)
def _row_norm_bwd_at(n, d, dy, ty, dr, src, tx, w, tw, mean, rstd, ts, offset, cast, dx, dw_part, db_part,
                     threaded):
    """``_row_norm_bwd`` by address: dr, src, dx of ``tx``'s dtype, dy of ``ty``'s, w of
    ``tw``'s, mean, rstd and the partial sums (``_row_blocks(n)``, d) of ``ts``'s;
    ``threaded`` as ``_row_norm_fwd_at``'s."""
    blocks = _row_blocks(n)
    arrays = (at(dy, ty, (n, d)), at(dr, tx, (n, d)), at(src, tx, (n, d)), at(w, tw, (d,)), at(mean, ts, (n,)),
              at(rstd, ts, (n,)), offset, cast, at(dx, tx, (n, d)), at(dw_part, ts, (blocks, d)),
              at(db_part, ts, (blocks, d)))
    if threaded is None:
        for k in range(blocks):
            _row_norm_bwd_block(*arrays, k)
    else:
        _row_norm_bwd(*arrays)


@njit(inline="always")
def _flush(block, total):
    """total += block (float64 += the accumulation type), then block = 0."""
    for j in range(block.shape[0]):
        total[j] += block[j]
        block[j] = 0.0


@njit(cache=True, nogil=True)
def _sum_tile(part, out, t, scratch):
    """``_sum_chunks`` of the columns of tile t, summed in ``scratch`` (float64, room for
    a tile; None: made here, a parallel step's own).  Each chunk's run of the tile is taken
    as a slice and read from 0: with ``part[c, lo + j]`` LLVM cannot prove the index >= 0,
    keeps numba's negative-index wraparound in the loop and does not vectorize it (128
    chunks x 256 columns: 18 µs against 3).  Compiled on its own, not inlined: in the
    parallel ``_sum_chunks`` numba would make its array a parallel loop too, which on the
    calling thread's path started the threads once per tile.  One scratch for all the
    tiles on the calling thread: an array made per tile cost ~0.2 µs, most of the sums of
    a row's parameter gradients (one chunk of 16384 columns: 17 µs against 5)."""
    lo = t * _SUM_TILE
    width = min(_SUM_TILE, part.shape[1] - lo)
    if scratch is None:
        s = np.zeros(width, dtype=np.float64)
    else:
        s = scratch[:width]
        s[:] = 0.0
    for c in range(part.shape[0]):
        run = part[c, lo : lo + width]
        for j in range(width):
            s[j] += run[j]
    dst = out[lo : lo + width]
    for j in range(width):
        st(dst, j, s[j])


@njit(parallel=True, cache=True, nogil=True)
def _sum_chunks(part, out):
    """out[j] = sum over chunks of part[c, j] (zero for no chunks), in float64, chunks in
    order: deterministic.  Columns in tiles, so each thread reads rows of its tile; below
    ``_SUM_SERIAL_BELOW`` values the tiles go on the calling thread, where starting the
    parallel loop costs more (~2 µs) than the sums."""
    tiles = (part.shape[1] + _SUM_TILE - 1) // _SUM_TILE
    if part.size < _SUM_SERIAL_BELOW:
        scratch = np.empty(_SUM_TILE, dtype=np.float64)
        for t in range(tiles):
            _sum_tile(part, out, t, scratch)
    else:
        for t in prange(tiles):
            _sum_tile(part, out, np.int64(t), None)


# ---------------------------------------------------------------------------
# GroupNorm and BatchNorm over (N, C, L) contiguous or (N, L, C) channels-last.
# In every backward, with g = dy * w_c and xs = x - mean (centred as in the forward):
#   training: dx = (g - mean(g)) * rstd - xs * rstd^3 * mean(g * xs)
#   eval (BatchNorm with running statistics): dx = g * rstd
#   dw_c = sum(dy * xs) * rstd,  db_c = sum(dy)   (sums over each channel's elements)
# g - mean(g) comes first, so a group of one value cancels exactly (dx = 0).
# ---------------------------------------------------------------------------


@njit(inline="always")
def _channel_param(p, c, absent):
    """A channel norm's weight for channel c, or ``absent`` where it is empty (the module
    has none, ``_acc_param``)."""
    return p[c] if p.shape[0] else absent


@njit(inline="always")
def _channel_affine(w, b, c, rstd, mean):
    """y = x * scale + shift for channel c: the affine map folded with the statistics."""
    scale = rstd * w[c] if w.shape[0] else rstd
    shift = -mean * scale
    return scale, shift + b[c] if b.shape[0] else shift


@njit(inline="always")
def _affine_run(xr, yr, centre, scale, bias):
    """yr = (xr - centre) * scale + bias along one contiguous run of one channel."""
    for j in range(xr.shape[0]):
        st(yr, j, (ld(xr, j) - centre) * scale + bias)


@njit(inline="always")
def _dx_run(dyr, xr, dxr, m, shift, wc, mean_g, rstd, c3):
    """dx = (dy * w_c - mean_g) * rstd - (x - m - shift) * c3 along one run, where
    mean_g = mean(dy * w), c3 = rstd^3 * mean(g * xs)."""
    for j in range(xr.shape[0]):
        st(dxr, j, (ld(dyr, j) * wc - mean_g) * rstd - (ld(xr, j) - m - shift) * c3)


# GroupNorm's groups are contiguous blocks: one parallel step per group reduces and
# writes while the block is in cache.  A BatchNorm channel is spread over every sample, so
# its kernels first reduce per channel, fold the result into per-channel coefficients,
# then sweep the runs x[n, c] in memory order (``_affine_runs``, ``_dx_runs``): sweeping
# channel by channel instead jumps across the tensor and runs 2.5x slower.


@njit(**_JIT)
def _affine_runs(x, y, coef):
    """y[n, c] = (x[n, c] - coef[0, c]) * coef[1, c] + coef[2, c], runs in parallel."""
    n, channels = x.shape[0], x.shape[1]
    for r in prange(n * channels):
        i, c = r // channels, r % channels
        _affine_run(x[i, c], y[i, c], coef[0, c], coef[1, c], coef[2, c])


@njit(**_JIT)
def _dx_runs(dy, x, dx, coef):
    """dx[n, c] from dy[n, c], x[n, c] and the per-channel coefficients of ``_dx_run``:
    coef[0] = centre, [1] = shift, [2] = w, [3] = mean(g), [4] = rstd, [5] = c3."""
    n, channels = x.shape[0], x.shape[1]
    for r in prange(n * channels):
        i, c = r // channels, r % channels
        _dx_run(dy[i, c], x[i, c], dx[i, c], coef[0, c], coef[1, c], coef[2, c], coef[3, c],
                coef[4, c], coef[5, c])


@njit(**_JIT)
def _group_norm_fwd(x, w, b, y, mean_out, var_out, eps):
    """x, y: (N, G, C/G, L) contiguous.  Each (n, g) group is one contiguous block: its
    statistics and its output are made in one parallel step, while it is in cache."""
    n, groups, cpg, length = x.shape
    eps_ = acc(x, eps)
    runs = x.reshape((1, n * groups, cpg * length))  # each group one run; made once (``_row_norm_fwd_rows``)
    for ng in prange(n * groups):
        i, g = ng // groups, ng % groups
        mean0, shift, var = _moments(runs, ng, _BLOCK)
        mean_out[i, g], var_out[i, g] = mean0 + shift, var
        rstd = acc(x, 1.0) / np.sqrt(var + eps_)
        for k in range(cpg):
            scale, bias = _channel_affine(w, b, g * cpg + k, rstd, shift)
            _affine_run(x[i, g, k], y[i, g, k], mean0, scale, bias)


@njit(**_JIT)
def _group_norm_bwd(dy, x, w, mean, var, eps, dx, dw_part, db_part):
    """x, dy, dx: (N, G, C/G, L) contiguous, one (n, g) group per parallel step;
    per-sample float64 partial sums dw_part[n, c], db_part[n, c]."""
    n, groups, cpg, length = x.shape
    eps_, zero = acc(x, eps), acc(x, 0.0)
    count = np.float64(max(1, cpg * length))
    for ng in prange(n * groups):
        i, g = ng // groups, ng % groups
        m = mean[i, g]
        rstd = acc(x, 1.0) / np.sqrt(var[i, g] + eps_)
        a_sum, b_sum, s_sum = 0.0, 0.0, 0.0
        for k in range(cpg):
            c = g * cpg + k
            wc = _channel_param(w, c, acc(x, 1.0))
            dyx, dys, xs = _grad_sums(dy[i, g, k], x[i, g, k], m, None, zero)
            a_sum += wc * dyx
            b_sum += wc * dys
            s_sum += xs
            dw_part[i, c], db_part[i, c] = dyx, dys
        shift = s_sum / count
        c3 = rstd * rstd * rstd * acc(x, (a_sum - shift * b_sum) / count)
        mean_g = acc(x, b_sum / count)
        for k in range(cpg):
            c = g * cpg + k
            wc = _channel_param(w, c, acc(x, 1.0))
            dw_part[i, c] = (dw_part[i, c] - shift * db_part[i, c]) * rstd
            _dx_run(dy[i, g, k], x[i, g, k], dx[i, g, k], m, acc(x, shift), wc, mean_g, rstd, c3)


@njit(**_JIT)
def _batch_norm_stats(x, w, b, mean, var, coef, training, eps):
    """x: (N, C, L).  In training mean and var are outputs (the batch's), otherwise
    inputs (the running statistics); coef[:, c] for ``_affine_runs``."""
    channels = x.shape[1]
    eps_ = acc(x, eps)
    for c in prange(channels):
        if training:
            mean0, shift, v = _moments(x, c, _BLOCK)
            mean[c], var[c] = mean0 + shift, v
        else:
            mean0, shift, v = acc(x, mean[c]), acc(x, 0.0), acc(x, var[c])
        coef[0, c] = mean0
        coef[1, c], coef[2, c] = _channel_affine(w, b, c, acc(x, 1.0) / np.sqrt(v + eps_), shift)


@njit(**_JIT)
def _batch_norm_grad_sums(dy, x, w, mean, var, training, eps, coef, dw, db):
    """x, dy: (N, C, L).  Per channel (one thread, in order) the sums of the backward:
    dw, db, and coef[:, c] for ``_dx_runs``."""
    n, channels, length = x.shape
    eps_, zero = acc(x, eps), acc(x, 0.0)
    count = np.float64(max(1, n * length))
    for c in prange(channels):
        m = acc(x, mean[c])
        rstd = acc(x, 1.0) / np.sqrt(acc(x, var[c]) + eps_)
        wc = _channel_param(w, c, acc(x, 1.0))
        dyx, dys, xs = 0.0, 0.0, 0.0
        for i in range(n):
            a, b, s = _grad_sums(dy[i, c], x[i, c], m, None, zero)
            dyx += a
            dys += b
            xs += s
        shift = xs / count if training else 0.0
        dyxs = dyx - shift * dys  # sum(dy * (x - mean)), with the mean's rounding undone
        dw[c], db[c] = dyxs * rstd, dys
        coef[0, c], coef[1, c], coef[2, c] = m, shift, wc
        coef[3, c] = wc * dys / count if training else 0.0
        coef[4, c] = rstd
        coef[5, c] = rstd * rstd * rstd * acc(x, wc * dyxs / count) if training else zero


# Channels-last: x is (rows, C) for BatchNorm (rows = N * spatial) and (N, L, C) for
# GroupNorm; loops run along C, contiguous, with per-channel vectors of statistics.


@njit(inline="always")
def _centre(x, m):
    """What a channels-last affine map subtracts from x before scaling: m, the mean in x's
    accumulation type, so that x - m is exact near it; in a half dtype 0, y = x * scale +
    shift (torch's form): one operation less a value, ~20% of the map's time, for an
    error of ~2 |m| / std * 2^-24 of a normalized value (at |m| = 10 std ~1/1600 of
    bfloat16's rounding step at 1, ~1/400 of float16's)."""
    return acc(x, 0.0) if narrow(x) else acc(x, m)


@njit(inline="always")
def _finite_map(scale, bias):
    """Whether every coefficient of a channels-last affine map is finite.  Where the map
    comes from x's own statistics, x then holds no NaN or Inf (either makes the
    statistics it is in NaN), so no y = (x - centre) * scale + bias is NaN."""
    for c in range(scale.shape[0]):
        if not (np.isfinite(scale[c]) and np.isfinite(bias[c])):
            return False
    return True


@njit(inline="always")
def _affine_row_cl(xr, yr, centre, scale, bias, numbers):
    """One channels-last row: y = (x - centre) * scale + bias, per-channel vectors; in a
    half dtype y = x * scale + bias (its centre is 0, ``_centre``).  ``numbers``: no y is
    NaN (``_finite_map``), so bfloat16 stores skip the NaN select."""
    if not narrow(xr):
        for c in range(xr.shape[0]):
            st(yr, c, (ld(xr, c) - centre[c]) * scale[c] + bias[c])
    elif numbers:
        for c in range(xr.shape[0]):
            st_number(yr, c, ld(xr, c) * scale[c] + bias[c])
    else:
        for c in range(xr.shape[0]):
            st(yr, c, ld(xr, c) * scale[c] + bias[c])


@njit(inline="always")
def _merge_moments(mean, m2, na, mean_b, m2_b, nb):
    """(mean, m2) of na rows += (mean_b, m2_b) of the next nb, per channel, float64 (Chan
    et al.'s pairwise update): the statistics of na + nb rows."""
    if nb == 0:
        return
    n = na + nb
    f1 = nb / n
    f2 = na * f1
    for c in range(mean.shape[0]):
        delta = mean_b[c] - mean[c]
        mean[c] += delta * f1
        m2[c] += m2_b[c] + delta * delta * f2


@njit(inline="always")
def _chunk_bounds(k, chunks, rows):
    """Chunk k of ``chunks`` equal chunks of ``rows`` rows: (its first row, past its last)."""
    return k * rows // chunks, (k + 1) * rows // chunks


@njit(inline="always")
def _merged_chunks(part, rows):
    """The moments (mean, m2) of rows 0..rows from part[k] = those of chunk k of
    part.shape[0] (``_chunk_bounds``), merged in chunk order: deterministic."""
    chunks = part.shape[0]
    mean, m2 = part[0, 0].copy(), part[0, 1].copy()
    for k in range(1, chunks):
        lo, hi = _chunk_bounds(k, chunks, rows)
        _merge_moments(mean, m2, lo, part[k, 0], part[k, 1], hi - lo)
    return mean, m2


@njit(inline="always")
def _column_moments(x, lo, hi, mean, m2):
    """Per channel over rows lo..hi of x (rows, C), in one pass: the mean and the sum of
    squared deviations (m2), float64.  Each block of ``_CL_BLOCK`` rows is summed in the
    accumulation type, four rows a step, around a shift near its mean: the first block
    around its own mean (a first pass over it, in cache), each later one around the mean
    of the rows before it; then merged block by block (``_merge_moments``).  A block's
    float32 sums then lose at most a few ulps of the spread the merge adds (a shift
    taken from one of its values lost ~40 ulps of the result where that value was an
    outlier)."""
    channels = x.shape[1]
    shift, b1, b2 = scratch(x, channels), scratch(x, channels), scratch(x, channels)
    mean_b, m2_b = np.empty(channels, dtype=np.float64), np.empty(channels, dtype=np.float64)
    mean[:] = 0.0
    m2[:] = 0.0
    for blo in range(lo, hi, _CL_BLOCK):
        bhi = min(blo + _CL_BLOCK, hi)
        nb = bhi - blo
        if blo == lo:
            b1[:] = 0.0
            for r in range(blo, bhi):
                xr = x[r]
                for c in range(channels):
                    b1[c] += ld(xr, c)
            for c in range(channels):
                shift[c] = b1[c] / nb
        else:
            for c in range(channels):
                shift[c] = mean[c]
        b1[:] = 0.0
        b2[:] = 0.0
        r = blo
        while r + 4 <= bhi:
            x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
            for c in range(channels):
                k = shift[c]
                d0, d1, d2, d3 = ld(x0, c) - k, ld(x1, c) - k, ld(x2, c) - k, ld(x3, c) - k
                b1[c] += (d0 + d1) + (d2 + d3)
                b2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            r += 4
        for rr in range(r, bhi):
            xr = x[rr]
            for c in range(channels):
                dv = ld(xr, c) - shift[c]
                b1[c] += dv
                b2[c] += dv * dv
        inv = 1.0 / nb  # a float64 division per channel and block took ~8% of the pass
        for c in range(channels):
            s1 = np.float64(b1[c])
            mean_b[c] = shift[c] + s1 * inv
            m2_b[c] = b2[c] - s1 * s1 * inv
        _merge_moments(mean, m2, blo - lo, mean_b, m2_b, nb)


@njit(inline="always")
def _column_grad_sums(dy, x, lo, hi, centre):
    """Per channel over rows lo..hi of dy, x (rows, C), in float64: sum(dy),
    sum(dy * (x - centre)), sum(x - centre).  Blocks of ``_CL_BLOCK`` rows are summed in
    the accumulation type, two rows a step, so the block accumulators (arrays: they cannot
    live in registers) are loaded and stored once per two values."""
    channels = x.shape[1]
    dys = np.zeros(channels, dtype=np.float64)
    dyx = np.zeros(channels, dtype=np.float64)
    xs = np.zeros(channels, dtype=np.float64)
    b_dy = np.zeros(channels, dtype=centre.dtype)
    b_dyx = np.zeros(channels, dtype=centre.dtype)
    b_x = np.zeros(channels, dtype=centre.dtype)
    for blo in range(lo, hi, _CL_BLOCK):
        bhi = min(blo + _CL_BLOCK, hi)
        r = blo
        while r + 2 <= bhi:
            x0, x1, g0, g1 = x[r], x[r + 1], dy[r], dy[r + 1]
            for c in range(channels):
                m = centre[c]
                a0, a1, d0, d1 = ld(g0, c), ld(g1, c), ld(x0, c) - m, ld(x1, c) - m
                b_dy[c] += a0 + a1
                b_dyx[c] += a0 * d0 + a1 * d1
                b_x[c] += d0 + d1
            r += 2
        for rr in range(r, bhi):
            xr, dyr = x[rr], dy[rr]
            for c in range(channels):
                gy = ld(dyr, c)
                xc = ld(xr, c) - centre[c]
                b_dy[c] += gy
                b_dyx[c] += gy * xc
                b_x[c] += xc
        _flush(b_dy, dys)
        _flush(b_dyx, dyx)
        _flush(b_x, xs)
    return dys, dyx, xs


@njit(**_JIT)
def _batch_norm_cl_fwd(x, w, b, y, mean, var, part, training, eps):
    """x, y: (rows, C).  Statistics per chunk of rows (part[k] = per-channel mean and m2,
    ``_column_moments``), merged in chunk order: deterministic."""
    rows, channels = x.shape
    chunks = part.shape[0]
    centre = np.zeros(channels, dtype=mean.dtype)
    offset = np.zeros(channels, dtype=mean.dtype)
    if training:
        for k in prange(chunks):
            lo, hi = _chunk_bounds(k, chunks, rows)
            _column_moments(x, lo, hi, part[k, 0], part[k, 1])
        m, m2 = _merged_chunks(part, rows)
        for c in range(channels):
            centre[c] = _centre(x, m[c])
            offset[c] = m[c] - centre[c]
            mean[c], var[c] = m[c], max(m2[c] / max(1, rows), 0.0)
    else:
        for c in range(channels):
            centre[c] = _centre(x, mean[c])
            offset[c] = mean[c] - centre[c]
    eps_ = acc(x, eps)
    scale = np.empty(channels, dtype=mean.dtype)
    bias = np.empty(channels, dtype=mean.dtype)
    for c in range(channels):
        rstd = acc(x, 1.0) / np.sqrt(acc(x, var[c]) + eps_)
        scale[c], bias[c] = _channel_affine(w, b, c, rstd, offset[c])
    numbers = training and _finite_map(scale, bias)  # eval: running statistics, not x's
    for r in prange(rows):  # directly under prange: vectorizes
        _affine_row_cl(x[r], y[r], centre, scale, bias, numbers)


@njit(**_JIT)
def _batch_norm_cl_bwd(dy, x, w, mean, var, training, eps, dx, part, dw, db):
    """x, dy, dx: (rows, C); part[k] holds per-chunk float64 sums of dy, dy * (x - mean)
    and x - mean, added in chunk order."""
    rows, channels = x.shape
    chunks = part.shape[0]
    zero, eps_ = acc(x, 0.0), acc(x, eps)
    for k in prange(chunks):
        lo, hi = _chunk_bounds(k, chunks, rows)
        part[k, 0], part[k, 1], part[k, 2] = _column_grad_sums(dy, x, lo, hi, mean)
    count = np.float64(max(1, rows))
    coef = np.empty((5, channels), dtype=mean.dtype)  # as ``_dx_row_cl`` reads them
    for c in range(channels):
        dys, dyx, xs = 0.0, 0.0, 0.0
        for k in range(chunks):
            dys += part[k, 0, c]
            dyx += part[k, 1, c]
            xs += part[k, 2, c]
        rstd = acc(x, 1.0) / np.sqrt(acc(x, var[c]) + eps_)
        wc = _channel_param(w, c, acc(x, 1.0))
        shift = xs / count if training else 0.0
        dyxs = dyx - shift * dys
        dw[c], db[c] = dyxs * rstd, dys
        coef[0, c] = wc
        coef[1, c] = wc * dys / count if training else 0.0
        coef[2, c] = shift
        coef[3, c] = rstd * rstd * rstd * acc(x, wc * dyxs / count) if training else zero
        coef[4, c] = rstd
    for r in prange(rows):
        _dx_row_cl(dy[r], x[r], dx[r], mean, coef)


@njit(inline="always")
def _dx_row_cl(dyr, xr, dxr, centre, coef):
    """One channels-last row, per channel c: coef[0] = w, [1] = mean(g), [2] = shift,
    [3] = c3, [4] = rstd;  dx = (dy * w - mean(g)) * rstd - (x - centre - shift) * c3."""
    for c in range(xr.shape[0]):
        xs = ld(xr, c) - centre[c] - coef[2, c]
        st(dxr, c, (ld(dyr, c) * coef[0, c] - coef[1, c]) * coef[4, c] - xs * coef[3, c])


@njit(inline="always")
def _cl_group_affine(x, mean, m2, length, w, b, mean_out, var_out, centre, scale, bias, groups, eps_):
    """One sample's group statistics from its per-channel means and m2 over ``length``
    rows (float64); per channel the affine map y = (x - centre) * scale + bias, centre
    the group mean in the accumulation type."""
    cpg = centre.shape[0] // groups
    for g in range(groups):
        mg = 0.0
        for k in range(cpg):
            mg += mean[g * cpg + k]
        mg /= cpg
        t = 0.0
        for k in range(cpg):
            dk = mean[g * cpg + k] - mg
            t += m2[g * cpg + k] + length * dk * dk
        v = acc(x, max(t / max(1, cpg * length), 0.0))
        mean_out[g], var_out[g] = acc(x, mg), v
        ctr = _centre(x, mg)
        rstd = acc(x, 1.0) / np.sqrt(v + eps_)
        for k in range(cpg):
            centre[g * cpg + k] = ctr
            scale[g * cpg + k], bias[g * cpg + k] = _channel_affine(w, b, g * cpg + k, rstd, acc(x, mg - ctr))


@njit(inline="always")
def _cl_group_norm_sample(x, w, b, y, mean_out, var_out, coef, groups, eps_):
    """One channels-last sample x, y (L, C): per-channel moments along L in one pass,
    folded into coef = (centre, scale, bias) per channel, then the output while x is in
    cache; mean_out and var_out (G,)."""
    length, channels = x.shape
    mean, m2 = np.empty(channels, dtype=np.float64), np.empty(channels, dtype=np.float64)
    _column_moments(x, 0, length, mean, m2)
    _cl_group_affine(x, mean, m2, length, w, b, mean_out, var_out, coef[0], coef[1], coef[2], groups, eps_)
    numbers = _finite_map(coef[1], coef[2])
    for l in range(length):
        _affine_row_cl(x[l], y[l], coef[0], coef[1], coef[2], numbers)


@njit(**_JIT)
def _group_norm_cl_fwd(x, w, b, y, mean_out, var_out, coef, groups, eps):
    """x, y: (N, L, C), one sample per parallel step (``_cl_group_norm_sample``)."""
    eps_ = acc(x, eps)
    for i in prange(x.shape[0]):
        _cl_group_norm_sample(x[i], w, b, y[i], mean_out[i], var_out[i], coef[i], groups, eps_)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)  # (the flags of the parallel kernel's: its bits)
def _group_norm_cl_samples(x, w, b, y, mean_out, var_out, coef, groups, eps):
    """``_group_norm_cl_fwd`` on the calling thread (the C++ eager path's, which shares
    samples out to threads itself), one coef (3, C) for every sample."""
    eps_ = acc(x, eps)
    for i in range(x.shape[0]):
        _cl_group_norm_sample(x[i], w, b, y[i], mean_out[i], var_out[i], coef, groups, eps_)


@njit(inline="always")
def _sample_chunk(t, chunks, length):
    """The split kernels' parallel step t: (sample, chunk, its first row, past its last)."""
    i, k = t // chunks, t % chunks
    lo, hi = _chunk_bounds(k, chunks, length)
    return i, k, lo, hi


@njit(inline="always")
def _chunk_total(part, j):
    """Per channel, the sum over chunks k of part[k, j] (float64), in chunk order."""
    total = np.zeros(part.shape[2], dtype=np.float64)
    for k in range(part.shape[0]):
        for c in range(part.shape[2]):
            total[c] += part[k, j, c]
    return total


@njit(**_JIT)
def _group_norm_cl_fwd_split(x, w, b, y, mean_out, var_out, coef, part, groups, eps):
    """``_group_norm_cl_fwd`` for fewer samples than threads: each sample's rows in
    part.shape[1] chunks, one parallel step each; part[n, k, :2] holds chunk k's
    per-channel moments, merged in chunk order."""
    n, length, channels = x.shape
    chunks = part.shape[1]
    eps_ = acc(x, eps)
    for t in prange(n * chunks):
        i, k, lo, hi = _sample_chunk(t, chunks, length)
        _column_moments(x[i], lo, hi, part[i, k, 0], part[i, k, 1])
    numbers = np.empty(n, dtype=np.bool_)  # per sample, once: not in each of its chunks
    for i in range(n):
        mean, m2 = _merged_chunks(part[i], length)
        _cl_group_affine(x, mean, m2, length, w, b, mean_out[i], var_out[i], coef[i, 0], coef[i, 1], coef[i, 2],
                         groups, eps_)
        numbers[i] = _finite_map(coef[i, 1], coef[i, 2])
    for t in prange(n * chunks):
        i, _, lo, hi = _sample_chunk(t, chunks, length)
        for l in range(lo, hi):
            _affine_row_cl(x[i, l], y[i, l], coef[i, 0], coef[i, 1], coef[i, 2], numbers[i])


@njit(inline="always")
def _cl_group_grads(x, dys, dyx, xs, w, var, coef, dw_part, db_part, groups, count, eps_):
    """One sample's backward coefficients (coef[1:], as ``_dx_row_cl`` reads them) and
    per-channel weight and bias gradient sums, from per-channel float64 sums of dy,
    dy * (x - centre) and x - centre."""
    cpg = dys.shape[0] // groups
    for g in range(groups):
        a_sum, b_sum, s_sum = 0.0, 0.0, 0.0
        for k in range(cpg):
            c = g * cpg + k
            wc = _channel_param(w, c, acc(x, 1.0))
            a_sum += wc * dyx[c]
            b_sum += wc * dys[c]
            s_sum += xs[c]
        rstd = acc(x, 1.0) / np.sqrt(var[g] + eps_)
        sh = s_sum / count
        c3 = rstd * rstd * rstd * acc(x, (a_sum - sh * b_sum) / count)
        for k in range(cpg):
            c = g * cpg + k
            dw_part[c], db_part[c] = (dyx[c] - sh * dys[c]) * rstd, dys[c]
            coef[1, c] = _channel_param(w, c, acc(x, 1.0))
            coef[2, c] = b_sum / count
            coef[3, c] = sh
            coef[4, c] = c3
            coef[5, c] = rstd


@njit(inline="always")
def _cl_group_mean_centres(mean, centre, groups):
    """centre[c] = the mean of c's group, from the group means (the backward's centre)."""
    cpg = centre.shape[0] // groups
    for c in range(centre.shape[0]):
        centre[c] = mean[c // cpg]


@njit(**_JIT)
def _group_norm_cl_bwd(dy, x, w, mean, var, groups, eps, dx, coef, dw_part, db_part):
    """x, dy, dx: (N, L, C); per-sample float64 partial sums dw_part[n, c], db_part[n, c];
    coef[n] = (centre, then ``_dx_row_cl``'s w, mean(g), shift, c3, rstd) per channel."""
    n, length, channels = x.shape
    count = np.float64(max(1, channels // groups * length))
    eps_ = acc(x, eps)
    for i in prange(n):
        _cl_group_mean_centres(mean[i], coef[i, 0], groups)
        dys, dyx, xs = _column_grad_sums(dy[i], x[i], 0, length, coef[i, 0])
        _cl_group_grads(x, dys, dyx, xs, w, var[i], coef[i], dw_part[i], db_part[i], groups, count, eps_)
        for l in range(length):  # the sample's blocks are still in cache
            _dx_row_cl(dy[i, l], x[i, l], dx[i, l], coef[i, 0], coef[i, 1:])


@njit(**_JIT)
def _group_norm_cl_bwd_split(dy, x, w, mean, var, groups, eps, dx, coef, part, dw_part, db_part):
    """``_group_norm_cl_bwd`` for fewer samples than threads: each sample's rows in
    part.shape[1] chunks, one parallel step each; part[n, k] holds chunk k's sums of dy,
    dy * (x - centre) and x - centre, added in chunk order."""
    n, length, channels = x.shape
    chunks = part.shape[1]
    count = np.float64(max(1, channels // groups * length))
    eps_ = acc(x, eps)
    for i in range(n):
        _cl_group_mean_centres(mean[i], coef[i, 0], groups)
    for t in prange(n * chunks):
        i, k, lo, hi = _sample_chunk(t, chunks, length)
        part[i, k, 0], part[i, k, 1], part[i, k, 2] = _column_grad_sums(dy[i], x[i], lo, hi, coef[i, 0])
    for i in range(n):
        _cl_group_grads(x, _chunk_total(part[i], 0), _chunk_total(part[i], 1), _chunk_total(part[i], 2),
                        w, var[i], coef[i], dw_part[i], db_part[i], groups, count, eps_)
    for t in prange(n * chunks):
        i, _, lo, hi = _sample_chunk(t, chunks, length)
        for l in range(lo, hi):
            _dx_row_cl(dy[i, l], x[i, l], dx[i, l], coef[i, 0], coef[i, 1:])


# The channel norms' entry points by address (as ``_row_norm_fwd_at``): ``Tensor.numpy()``
# and the (N, L, C) views of a channels-last tensor cost ~25 µs a call in all, ten times
# the kernel of a small GroupNorm.  x (and y, dy, dx) is (N, C, L) contiguous, or (N, L, C)
# where ``channels_last`` is True; None, not False, so that numba compiles only the layout
# a call takes (as ``threaded`` in ``_row_norm_fwd_at``).  A weight or bias at address 0
# is absent; each comes in its own dtype and is read once per channel (``_acc_param``).


@njit(inline="always")
def _acc_param(address, like, token, c):
    """A channel norm's weight or bias at ``address`` (c values of ``token``'s dtype) in
    the accumulation type of ``like``'s dtype, as the kernels read it; empty where the
    address is 0 (the module has none).  The kernels read a parameter once per channel,
    so the copy and a branch on its length cost nothing there, and each kernel compiles
    once per input dtype for every parameter dtype and affine flag (only the thin entry
    points compile per combination)."""
    p = at(address, token, (c if address else 0,))
    out = scratch(like, p.shape[0])
    for k in range(p.shape[0]):
        out[k] = ld(p, k)
    return out


@njit(cache=True, nogil=True)
def _group_norm_fwd_at(n, c, length, x, tx, w, tw, b, tb, y, mean_out, var_out, ts, groups, eps, channels_last,
                       chunks):
    """``group_norm_forward``: mean_out and var_out (N, G) of ``ts``'s dtype; ``chunks``
    None or, channels-last, each sample's rows in that many chunks (``_cl_split``)."""
    wa, ba = _acc_param(w, tx, tw, c), _acc_param(b, tx, tb, c)
    stats = at(mean_out, ts, (n, groups)), at(var_out, ts, (n, groups))
    if channels_last is None:
        shape = (n, groups, c // groups, length)
        _group_norm_fwd(at(x, tx, shape), wa, ba, at(y, tx, shape), *stats, eps)
    else:
        shape = (n, length, c)
        coef = scratch(tx, (n, 3, c))
        if chunks is None:
            _group_norm_cl_fwd(at(x, tx, shape), wa, ba, at(y, tx, shape), *stats, coef, groups, eps)
        else:
            part = np.empty((n, chunks, 2, c), dtype=np.float64)
            _group_norm_cl_fwd_split(at(x, tx, shape), wa, ba, at(y, tx, shape), *stats, coef, part, groups,
                                     eps)


@njit(cache=True, nogil=True)
def _group_norm_bwd_at(n, c, length, dy, ty, x, tx, w, tw, mean, var, ts, groups, eps, dx, dw, db, tb,
                       channels_last, chunks):
    """``group_norm_backward``: dw of ``tw``'s dtype and db of ``tb``'s, each left
    unwritten at address 0; per-sample partial sums added in order (``_sum_chunks``)."""
    wa = _acc_param(w, tx, tw, c)
    stats = at(mean, ts, (n, groups)), at(var, ts, (n, groups))
    dw_part, db_part = np.empty((n, c), dtype=np.float64), np.empty((n, c), dtype=np.float64)
    if channels_last is None:
        shape = (n, groups, c // groups, length)
        _group_norm_bwd(at(dy, ty, shape), at(x, tx, shape), wa, *stats, eps, at(dx, tx, shape), dw_part, db_part)
    else:
        shape = (n, length, c)
        coef = scratch(tx, (n, 6, c))
        if chunks is None:
            _group_norm_cl_bwd(at(dy, ty, shape), at(x, tx, shape), wa, *stats, groups, eps, at(dx, tx, shape),
                               coef, dw_part, db_part)
        else:
            part = np.empty((n, chunks, 3, c), dtype=np.float64)
            _group_norm_cl_bwd_split(at(dy, ty, shape), at(x, tx, shape), wa, *stats, groups, eps,
                                     at(dx, tx, shape), coef, part, dw_part, db_part)
    if dw:
        _sum_chunks(dw_part, at(dw, tw, (c,)))
    if db:
        _sum_chunks(db_part, at(db, tb, (c,)))


@njit(cache=True, nogil=True)
def _batch_norm_fwd_at(n, c, length, x, tx, w, tw, b, tb, y, mean, var, ts, training, eps, channels_last, chunks):
    """``batch_norm_forward``: mean and var (C,) of ``ts``'s dtype, outputs in training,
    else the running statistics; channels-last, the rows' statistics in ``chunks`` chunks."""
    wa, ba = _acc_param(w, tx, tw, c), _acc_param(b, tx, tb, c)
    stats = at(mean, ts, (c,)), at(var, ts, (c,))
    if channels_last is None:
        coef = scratch(tx, (3, c))
        _batch_norm_stats(at(x, tx, (n, c, length)), wa, ba, *stats, coef, training, eps)
        _affine_runs(at(x, tx, (n, c, length)), at(y, tx, (n, c, length)), coef)
    else:
        part = np.empty((chunks, 2, c), dtype=np.float64)
        _batch_norm_cl_fwd(at(x, tx, (n * length, c)), wa, ba, at(y, tx, (n * length, c)), *stats, part, training,
                           eps)


@njit(inline="always")
def _store_all(src, dst):
    """dst = src rounded to dst's dtype (``st``)."""
    for k in range(src.shape[0]):
        st(dst, k, src[k])


@njit(cache=True, nogil=True)
def _batch_norm_bwd_at(n, c, length, dy, ty, x, tx, w, tw, mean, var, ts, training, eps, dx, dw, db, tb,
                       channels_last, chunks):
    """``batch_norm_backward``: dw and db as in ``_group_norm_bwd_at``."""
    wa = _acc_param(w, tx, tw, c)
    stats = at(mean, ts, (c,)), at(var, ts, (c,))
    dwa, dba = scratch(tx, c), scratch(tx, c)
    if channels_last is None:
        coef = scratch(tx, (6, c))
        _batch_norm_grad_sums(at(dy, ty, (n, c, length)), at(x, tx, (n, c, length)), wa, *stats, training, eps, coef,
                              dwa, dba)
        _dx_runs(at(dy, ty, (n, c, length)), at(x, tx, (n, c, length)), at(dx, tx, (n, c, length)), coef)
    else:
        part = np.empty((chunks, 3, c), dtype=np.float64)
        _batch_norm_cl_bwd(at(dy, ty, (n * length, c)), at(x, tx, (n * length, c)), wa, *stats, training, eps,
                           at(dx, tx, (n * length, c)), part, dwa, dba)
    if dw:
        _store_all(dwa, at(dw, tw, (c,)))
    if db:
        _store_all(dba, at(db, tb, (c,)))


@njit(cache=True, nogil=True)
def _running_stats_at(c, rows, running_mean, running_var, tr, mean, var, ts, n, momentum):
    """``update_running_stats`` by address: the running statistics (C,) of ``tr``'s dtype,
    the batch's (rows, C) of ``ts``'s (the accumulation type), averaged over the rows in
    float64.  The update in the accumulation type, term by term as the reference's
    torch ops compute it (their results to the bit)."""
    rm, rv = at(running_mean, tr, (c,)), at(running_var, tr, (c,))
    m, v = at(mean, ts, (rows, c)), at(var, ts, (rows, c))
    step, keep = acc(m, momentum), acc(m, 1.0 - momentum)
    unbiased = acc(m, n / (n - 1) if n > 1 else 1.0)
    for k in range(c):
        bm, bv = m[0, k], v[0, k]
        if rows > 1:
            tm, tv = 0.0, 0.0
            for r in range(rows):
                tm += m[r, k]
                tv += v[r, k]
            bm, bv = acc(m, tm / rows), acc(m, tv / rows)
        st(rm, k, step * bm + keep * acc(m, ld(rm, k)))
        st(rv, k, step * (bv * unbiased) + keep * acc(m, ld(rv, k)))


# ---------------------------------------------------------------------------
# DyT: y = w * tanh(alpha * x) + b over rows.
# ---------------------------------------------------------------------------


def tanh(a, v):
    """tanh(v) for an element of array a, without a libm call (so loops vectorize) but
    for float64 arrays.  For float32 arrays within 0.5 ulp (computed in float64).  For
    float16 and bfloat16 arrays in float32, within ~3.2 ulp of float32, which their
    rounding takes away: tanh of every finite float16 and bfloat16 value comes out
    correctly rounded (``test_dyt_tanh_of_every_value``), and DyT's w * tanh + b moves
    by one of their ulps in ~4 of 10^5 float16 and ~7 of 10^6 bfloat16 outputs against
    the float64 tanh.  ~2.2x as fast as the float64 steps (0.46 against 1.05 ns a value
    on one core of the 2-core AMD EPYC), where DyT's float16/bfloat16 rows spent most of
    their time.  DyT's float32 forward takes torch's own tanh where torch has it
    (``_tanh_f32``); its backward and the other dtypes take this one."""


@overload(tanh, inline="always")
def _tanh(a, v):
    if a.dtype == types.float64:
        return lambda a, v: np.tanh(v)
    if a.dtype == types.float32:

        def tanh_float32(a, v):
            # In float64: tanh|x| = m / (m + 2) with m = expm1(2|x|), expm1 by range
            # reduction (2|x| = k ln2 + r) and a degree-9 polynomial; within 0.5 ulp.
            u = min(abs(np.float64(v)), 10.0) * 2.0  # tanh(10) rounds to 1 in float32
            k = np.floor(u * 1.4426950408889634 + 0.5)
            r = u - k * 0.6931471805599453
            q = r * (1.0 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (
                1 / 720 + r * (1 / 5040 + r * (1 / 40320 + r * (1 / 362880)))))))))
            scale = np.int64((np.int64(k) + 1023) << 52).view(np.float64)  # 2^k
            m = scale * q + (scale - 1.0)
            t = np.float32(np.copysign(m / (m + 2.0), np.float64(v)))
            return v if v != v else t

        return tanh_float32

    def tanh_half(a, v):
        # tanh_float32's steps in float32: ln2 split in two (Cody-Waite) so that k * ln2's
        # high part is exact, and a degree-7 polynomial (|r| <= ln2 / 2)
        u = min(abs(v), np.float32(9.0)) * np.float32(2.0)  # tanh(9) rounds to 1 in float32
        k = np.floor(u * np.float32(1.4426950408889634) + np.float32(0.5))
        r = (u - k * np.float32(0.693145751953125)) - k * np.float32(1.428606765330187e-06)
        q = r * (np.float32(1.0) + r * (np.float32(1 / 2) + r * (np.float32(1 / 6) + r * (
            np.float32(1 / 24) + r * (np.float32(1 / 120) + r * (np.float32(1 / 720) + r * np.float32(1 / 5040)))))))
        scale = np.int32((np.int32(k) + 127) << 23).view(np.float32)  # 2^k
        m = scale * q + (scale - np.float32(1.0))
        t = np.float32(np.copysign(m / (m + np.float32(2.0)), v))
        return v if v != v else t

    return tanh_half


# DyT's float32 forward takes torch's own float32 tanh: MKL's ``vsTanh(n, src, dst)``
# (VML's high-accuracy mode: within 1 ulp), which torch.tanh calls and torch's Linux x86
# wheels export.  ~0.33 ns a value on one core of the Intel Xeon, against 0.93 ns for the
# float64 steps of ``tanh`` above (1.43 without FMAs): there DyT's float32 forward ran at
# 0.46x-0.96x torch's ``tanh(alpha * x) * w + b`` from 16K values.  Called on chunks of
# the rows (``_dyt_fwd_rows_f32``), it gives torch's result bit for bit (vsTanh's bits do
# not depend on the chunks).  The kernels call it by the symbol name below, which numba's
# linker resolves in each process as it loads a kernel from the cache: no process's
# address is baked into cached code.  Without MKL the name is ``tanh`` above, on chunks.
_TANH_SYMBOL = "addnorm_float32_tanh"
_TANH_CHUNK = 2048  # float32 values per call: 8 KB, in L1 with the x they came from
_tanh_f32 = types.ExternalFunction(_TANH_SYMBOL, types.void(types.int32, types.voidptr, types.voidptr))


def _torch_float32_tanh() -> int | None:
    """The address of MKL's ``vsTanh`` in torch's own library, already loaded; None where
    torch has no MKL (ARM, macOS) or does not export it (Windows)."""
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        try:
            lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", name),
                              mode=getattr(os, "RTLD_NOLOAD", 0))
            return ctypes.cast(lib.vsTanh, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


def _own_float32_tanh() -> int:
    """``tanh`` above as a C function of vsTanh's signature (compiled only where torch has
    no vsTanh)."""

    @numba.cfunc(types.void(types.int32, types.voidptr, types.voidptr), cache=True, nogil=True,
                 fastmath=_FASTMATH_FMA, error_model="numpy")
    def own_tanh(n, src, dst):
        xs, ys = numba.carray(src, (n,), np.float32), numba.carray(dst, (n,), np.float32)
        for j in range(n):
            ys[j] = tanh(xs, xs[j])

    return own_tanh.address


_torch_tanh_address = _torch_float32_tanh()
TORCH_FLOAT32_TANH = _torch_tanh_address is not None  # DyT's float32 forward is torch's, bit for bit
llvm.add_symbol(_TANH_SYMBOL, _torch_tanh_address or _own_float32_tanh())


def _dyt_fwd_rows(x, alpha, w, b, y, lo, hi):
    """y = w * tanh(alpha * x) + b on rows lo..hi-1, on the calling thread: the body of
    each of ``_dyt_fwd``'s tasks, and the whole of a call too small to share (where
    starting the parallel loop costs more than the rows).  float32 with torch's tanh
    (``_dyt_fwd_rows_f32``), other dtypes with ``tanh`` (``_dyt_fwd_rows_own``)."""


@overload(_dyt_fwd_rows)
def _dyt_fwd_rows_by_dtype(x, alpha, w, b, y, lo, hi):
    kernel = _dyt_fwd_rows_f32 if x.dtype == types.float32 else _dyt_fwd_rows_own
    return lambda x, alpha, w, b, y, lo, hi: kernel(x, alpha, w, b, y, lo, hi)


@njit(inline="always")
def _tanh_rows(columns, d):
    """Rows per chunk of ``_tanh_chunk`` for a range of ``columns`` of rows of d values:
    as many whole rows as fit a chunk; one (in chunks of its columns) where the range is
    not whole rows or a row is longer than a chunk."""
    return max(1, _TANH_CHUNK // d) if columns == d else 1


@njit(inline="always")
def _tanh_chunk(x, a, t, i0, i1, j0, j1):
    """t[i, j] = tanh(a * x[i, j]) over rows i0..i1-1 and columns j0..j1-1 of float32
    (n, d) arrays, by torch's tanh (``_tanh_f32``) in place in t: whole rows or one row
    (``_tanh_rows``), so that the chunk is contiguous."""
    for i in range(i0, i1):
        xr, tr = x[i], t[i]
        for j in range(np.uintp(j0), np.uintp(j1)):  # (unsigned: as in _dyt_bwd_blocks_own)
            tr[j] = a * xr[j]
    first = t[i0, j0:]
    _tanh_f32(np.int32((i1 - i0) * (j1 - j0)), first.ctypes, first.ctypes)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _dyt_fwd_rows_f32(x, alpha, w, b, y, lo, hi):
    """``_dyt_fwd_rows`` of float32 rows, per chunk of whole rows (or of one long row's
    columns): alpha * x into y, tanh of that in place (``_tanh_f32``), then y * w + b,
    each step rounded as torch rounds it (``_FASTMATH`` fuses no multiply-add)."""
    a = ld(alpha, 0)
    d = x.shape[1]
    rows = _tanh_rows(d, d)
    for i0 in range(lo, hi, rows):
        i1 = min(hi, i0 + rows)
        for j0 in range(0, d, _TANH_CHUNK):
            j1 = min(d, j0 + _TANH_CHUNK)
            _tanh_chunk(x, a, y, i0, i1, j0, j1)
            for i in range(i0, i1):
                yr = y[i]
                for j in range(np.uintp(j0), np.uintp(j1)):
                    h = yr[j]
                    if w is not None:
                        h = h * ld(w, j)
                    if b is not None:
                        h = h + ld(b, j)
                    yr[j] = h


@njit(cache=True, nogil=True, fastmath=_FASTMATH_FMA)
def _dyt_fwd_rows_own(x, alpha, w, b, y, lo, hi):
    """``_dyt_fwd_rows`` with ``tanh`` inline."""
    a = ld(alpha, 0)
    for i in range(lo, hi):
        xr, yr = x[i], y[i]
        for j in range(x.shape[1]):
            h = tanh(x, a * ld(xr, j))
            if w is not None:
                h = h * ld(w, j)
            if b is not None:
                h = h + ld(b, j)
            st(yr, j, h)


@njit(**_JIT)
def _dyt_fwd(x, alpha, w, b, y):
    """``_dyt_fwd_rows`` in tasks of up to ``_ROW_BLOCK`` rows across threads."""
    n = x.shape[0]
    per = _rows_per_task(n)
    for t in prange((n + per - 1) // per):
        _dyt_fwd_rows(x, alpha, w, b, y, t * per, min(n, (t + 1) * per))


def _dyt_bwd_blocks(dy, x, alpha, w, dx, part, k0, k1, j0, j1):
    """dx on columns j0..j1-1 of the rows of blocks k0..k1-1 of ``_ROW_BLOCK`` rows, and
    there each block k's sums (in the accumulation type, added in float64 and in order
    by ``_sum_chunks``): part[0, k] of dy * t (dw), part[1, k] of dy (db), part[2, k] of
    dy * w * x * (1 - t^2) (dalpha); on the calling thread.  Each sum runs over its
    block's rows in order, whatever the columns: the same bits from any split.  float32
    with torch's tanh (``_dyt_bwd_blocks_f32``), other dtypes with ``tanh``."""


@overload(_dyt_bwd_blocks)
def _dyt_bwd_blocks_by_dtype(dy, x, alpha, w, dx, part, k0, k1, j0, j1):
    kernel = _dyt_bwd_blocks_f32 if x.dtype == types.float32 else _dyt_bwd_blocks_own
    return lambda dy, x, alpha, w, dx, part, k0, k1, j0, j1: kernel(dy, x, alpha, w, dx, part, k0, k1, j0, j1)


@njit(inline="always")
def _dyt_grads(x, xr, dyr, w, part, k, j, a, t):
    """Value j of a row in block k, given its t = tanh(a * x): its terms added to the
    block's sums (``_dyt_bwd_blocks``); -> its dx.  (The caller stores dx: numba 0.68
    dropped that store made here, inlined, as ``_total_into`` says.)"""
    xv = ld(xr, j)
    g = ld(dyr, j)
    gw = g if w is None else g * ld(w, j)
    dpre = gw * (acc(x, 1.0) - t * t)
    part[0, k, j] += g * t
    part[1, k, j] += g
    part[2, k, j] += dpre * xv
    return dpre * a


@njit(cache=True, nogil=True, fastmath=_FASTMATH_FMA)
def _dyt_bwd_blocks_own(dy, x, alpha, w, dx, part, k0, k1, j0, j1):
    """``_dyt_bwd_blocks`` with ``tanh`` inline."""
    n = x.shape[0]
    a = ld(alpha, 0)
    for k in range(k0, k1):
        part[:, k, j0:j1] = 0.0
        for i in range(k * _ROW_BLOCK, min(n, (k + 1) * _ROW_BLOCK)):
            xr, dyr, dxr = x[i], dy[i], dx[i]
            # unsigned: numba then leaves out the negative-index wraparound, which kept
            # the loop from vectorizing (6x slower) where it cannot see j >= 0
            for j in range(np.uintp(j0), np.uintp(j1)):
                st(dxr, j, _dyt_grads(x, xr, dyr, w, part, k, j, a, tanh(x, a * ld(xr, j))))


@njit(cache=True, nogil=True, fastmath=_FASTMATH_FMA)
def _dyt_bwd_blocks_f32(dy, x, alpha, w, dx, part, k0, k1, j0, j1):
    """``_dyt_bwd_blocks`` of float32 rows: t by torch's tanh into dx, a chunk at a time
    (``_tanh_chunk``; 1.5 -> ~0.5 ns a value on one core of the Intel Xeon), then each
    value's gradients over it.  Each column's sums still see the block's rows in order."""
    n, d = x.shape
    a = ld(alpha, 0)
    rows = _tanh_rows(j1 - j0, d)
    for k in range(k0, k1):
        part[:, k, j0:j1] = 0.0
        r0, r1 = k * _ROW_BLOCK, min(n, (k + 1) * _ROW_BLOCK)
        for i0 in range(r0, r1, rows):
            i1 = min(r1, i0 + rows)
            for c0 in range(j0, j1, _TANH_CHUNK):
                c1 = min(j1, c0 + _TANH_CHUNK)
                _tanh_chunk(x, a, dx, i0, i1, c0, c1)
                for i in range(i0, i1):
                    xr, dyr, dxr = x[i], dy[i], dx[i]
                    for j in range(np.uintp(c0), np.uintp(c1)):
                        dxr[j] = _dyt_grads(x, xr, dyr, w, part, k, j, a, dxr[j])


@njit(**_JIT)
def _dyt_bwd(dy, x, alpha, w, dx, part, columns):
    """``_dyt_bwd_blocks`` across threads, a task per block and each of its ``columns``
    ranges of columns (more than one where there are fewer blocks than threads: a few
    wide rows, 8 x 16384, were one task on one thread)."""
    d = x.shape[1]
    for t in prange(part.shape[1] * columns):
        k, c = t // columns, t % columns
        _dyt_bwd_blocks(dy, x, alpha, w, dx, part, k, k + 1, c * d // columns, (c + 1) * d // columns)


@njit(cache=True, nogil=True)
def _dyt_fwd_at(n, d, x, tx, alpha, ta, w, tw, b, tb, y, threaded):
    """``_dyt_fwd`` on (n, d) rows given by address (``at``): x and y of ``tx``'s dtype,
    alpha (1,) of ``ta``'s, w and b (d,) of ``tw``'s and ``tb``'s.  ``threaded`` None:
    on the calling thread (``_dyt_fwd_rows``); True: across threads (as
    ``_row_norm_fwd_at``'s)."""
    arrays = (at(x, tx, (n, d)), at(alpha, ta, (1,)), at(w, tw, (d,)), at(b, tb, (d,)), at(y, tx, (n, d)))
    if threaded is None:
        _dyt_fwd_rows(*arrays, 0, n)
    else:
        _dyt_fwd(*arrays)


@njit(cache=True, nogil=True)
def _dyt_bwd_at(n, d, blocks, dy, ty, x, tx, alpha, ta, w, tw, dx, part, tp, dalpha, dw, db, tb, threaded):
    """``_dyt_bwd`` by address: dy of ``ty``'s dtype, x and dx of ``tx``'s, part (3,
    blocks, d) of ``tp``'s (the accumulation type); then the gradients from its sums,
    in float64 in a fixed order: dw (d,) of ``tw``'s dtype and db (d,) of ``tb``'s
    (``_sum_chunks``; None: not wanted), dalpha (1,) of ``ta``'s (``_total_into``).
    ``threaded`` None: on the calling thread; else across threads in that many column
    ranges per block (``_dyt_bwd``)."""
    sums = at(part, tp, (3, blocks, d))
    arrays = (at(dy, ty, (n, d)), at(x, tx, (n, d)), at(alpha, ta, (1,)), at(w, tw, (d,)), at(dx, tx, (n, d)), sums)
    if threaded is None:
        _dyt_bwd_blocks(*arrays, 0, blocks, 0, d)
    else:
        _dyt_bwd(*arrays, threaded)
    if dw is not None:  # (numba prunes a branch on an argument's None, not on a local's)
        _sum_chunks(sums[0], at(dw, tw, (d,)))
    if db is not None:
        _sum_chunks(sums[1], at(db, tb, (d,)))
    _total_into(sums[2], at(dalpha, ta, (1,)))


@njit(cache=True, nogil=True)
def _total_into(part, out):
    """out[0] = the sum of all of part (blocks, d), in float64 in a fixed order: eight
    lanes, lane l of the columns j = l (mod 8) of every block in turn, then the lanes in
    order.  (One float64 sum in column order waited on each add: 16 µs for one block of
    16384 columns, 6 in lanes.)  Compiled on its own: numba 0.68 dropped the same
    one-value store inlined into ``_dyt_bwd_at`` (outside any loop, into an array made by
    ``at``)."""
    lanes = np.zeros(8, dtype=np.float64)
    d = part.shape[1]
    body = d - d % 8
    for k in range(part.shape[0]):
        row = part[k]
        for j0 in range(0, body, 8):
            run = row[j0 : j0 + 8]
            for lane in range(8):
                lanes[lane] += run[lane]
        for j in range(body, d):
            lanes[j - body] += row[j]
    total = 0.0
    for lane in range(8):
        total += lanes[lane]
    st(out, 0, total)


# ---------------------------------------------------------------------------
# ScaleNorm: y = g * x / max(||x||, eps) over rows, g one value.
# ---------------------------------------------------------------------------


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _scale_norm_fwd_rows(x, w, y, rnorm, eps, lo, hi):
    """Rows lo..hi-1 on the calling thread (as ``_dyt_fwd_rows``): each row's rnorm =
    1 / max(||x_i||, eps) in the accumulation type, the squares summed as the row norms'
    (``_run_sums``), then y = x * (rnorm * g), rounded once.  Narrow float16/bfloat16
    rows go in chunks, as the row norms' (``_chunk_rows``): the chunk's norms, then its
    rows scaled in one call (bfloat16 65536x64 659 -> 494 µs, 4096x256 117 -> 89); float32
    and wide rows one by one (float32 65536x64 470 against 584 chunked)."""
    g, eps_, zero = ld(w, 0), acc(x, eps), acc(x, 0.0)
    per = max(1, min(hi - lo, _chunk_rows(x))) if narrow(x) else 1
    if per == 1:
        for i in range(lo, hi):
            s, numbers = _row_scale(x[i], g, eps_, zero, rnorm, i)
            _scale_row(x[i], y[i], s, numbers)
        return
    scale = scratch(x, per)
    numbers = np.empty(per, dtype=np.bool_)
    for c0 in range(lo, hi, per):
        c1 = min(hi, c0 + per)
        for i in range(c0, c1):
            scale[i - c0], numbers[i - c0] = _row_scale(x[i], g, eps_, zero, rnorm, i)
        _scaled_rows(x, y, scale, numbers, c0, c1)


@njit(inline="always")
def _row_scale(xr, g, eps_, zero, rnorm, i):
    """(rnorm * g, whether no y of the row can be NaN) of ScaleNorm's row xr, with rnorm[i]
    = rnorm stored where wanted.  A finite norm holds no NaN or Inf, so with a finite g no
    y is NaN: the row's stores may skip bfloat16's NaN select."""
    norm = acc(xr, np.sqrt(_run_sums(xr, zero, True)[1]))
    r = acc(xr, 1.0) / (eps_ if norm < eps_ else norm)  # (not max(): a NaN norm stays NaN)
    if rnorm is not None:  # (None: not wanted, where no gradient is recorded)
        rnorm[i] = r
    return r * g, np.isfinite(norm) and np.isfinite(g)


@njit(inline="always")
def _scale_row(xr, yr, s, numbers):
    """yr = xr * s, rounded once; ``numbers``: no value is NaN (``_row_scale``)."""
    if numbers:
        for j in range(xr.shape[0]):
            st_number(yr, j, ld(xr, j) * s)
    else:
        for j in range(xr.shape[0]):
            st(yr, j, ld(xr, j) * s)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _scaled_rows(x, y, scale, numbers, lo, hi):
    """``_scale_row`` on rows lo..hi-1, scale[i - lo] and numbers[i - lo] each: a chunk of
    narrow rows in one call."""
    for i in range(lo, hi):
        _scale_row(x[i], y[i], scale[i - lo], numbers[i - lo])


@njit(**_JIT)
def _scale_norm_fwd(x, w, y, rnorm, eps):
    n = x.shape[0]
    per = _rows_per_task(n)
    for t in prange((n + per - 1) // per):
        _scale_norm_fwd_rows(x, w, y, rnorm, eps, t * per, min(n, (t + 1) * per))


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _scale_norm_bwd_rows(dy, x, w, rnorm, dx, dots, eps, lo, hi):
    """Rows lo..hi-1: with r = rnorm and S = sum(dy * x) (``_grad_sums``, float64),
    dx = g * (r * dy - x * r^3 * S) where the norm was above eps, g * r * dy where it
    was clamped (r constant there); dots[i] = r * S, the row's sum(dy * x * r), whose
    total is g's gradient."""
    g, zero = ld(w, 0), acc(x, 0.0)
    # clamped where r reached 1 / eps: the reference's test, in the accumulation type
    limit = acc(x, 1.0 / eps) if eps > 0 else acc(x, np.inf)
    for i in range(lo, hi):
        xr, dyr, dxr = x[i], dy[i], dx[i]
        r = rnorm[i]
        s = _grad_sums(dyr, xr, zero, None, zero)[0]
        dots[i] = s * r
        c3 = r * r * r * acc(x, s) if r < limit or not eps > 0 else zero
        for j in range(xr.shape[0]):
            st(dxr, j, g * (r * ld(dyr, j) - ld(xr, j) * c3))


@njit(**_JIT)
def _scale_norm_bwd(dy, x, w, rnorm, dx, dots, eps):
    n = x.shape[0]
    per = _rows_per_task(n)
    for t in prange((n + per - 1) // per):
        _scale_norm_bwd_rows(dy, x, w, rnorm, dx, dots, eps, t * per, min(n, (t + 1) * per))


@njit(cache=True, nogil=True)
def _scale_norm_fwd_at(n, d, x, tx, w, tw, y, rnorm, ts, eps, threaded):
    """``_scale_norm_fwd`` by address: x and y (n, d) of ``tx``'s dtype, w (1,) of
    ``tw``'s, rnorm (n,) of ``ts``'s; ``threaded`` as ``_dyt_fwd_at``'s."""
    arrays = (at(x, tx, (n, d)), at(w, tw, (1,)), at(y, tx, (n, d)), at(rnorm, ts, (n,)))
    if threaded is None:
        _scale_norm_fwd_rows(*arrays, eps, 0, n)
    else:
        _scale_norm_fwd(*arrays, eps)


@njit(cache=True, nogil=True)
def _scale_norm_bwd_at(n, d, dy, ty, x, tx, w, tw, rnorm, ts, dx, dots, td, eps, threaded):
    """``_scale_norm_bwd`` by address: dy of ``ty``'s dtype, x and dx of ``tx``'s, w of
    ``tw``'s, rnorm of ``ts``'s, dots (n,) of ``td``'s (float64)."""
    arrays = (at(dy, ty, (n, d)), at(x, tx, (n, d)), at(w, tw, (1,)), at(rnorm, ts, (n,)), at(dx, tx, (n, d)),
              at(dots, td, (n,)))
    if threaded is None:
        _scale_norm_bwd_rows(*arrays, eps, 0, n)
    else:
        _scale_norm_bwd(*arrays, eps)


# ---------------------------------------------------------------------------
# torch <-> numpy, and the functions addnorm.ops calls.
# ---------------------------------------------------------------------------


def _np(t: torch.Tensor | None):
    """A zero-copy numpy view; bfloat16 as its uint16 bits, float16 as its int16 bits."""
    if t is None:
        return None
    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy()
    return t.numpy()


_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.bfloat16: np.uint16,
    torch.float16: np.int16,
}


_FRESH_MMAP_BYTES = 32 << 20  # glibc serves larger blocks from a fresh mmap every time


def _empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized tensor of contiguous t's shape, of t's dtype or ``dtype``.  Blocks
    of 32 MB and more come from a fresh mmap on every call (glibc's largest mmap
    threshold), and first touching a 64 MB one costs ~15 ms of page faults on 4 KB pages:
    numpy asks the kernel for huge pages there (madvise), which cuts that to ~3 ms.  The
    result is an ordinary CPU tensor (only not resizable).  Smaller blocks are reused from
    the heap: torch's allocator is best, and ``empty_like`` its cheapest call (~1.4 µs)."""
    dtype = dtype or t.dtype
    if t.numel() * dtype.itemsize < _FRESH_MMAP_BYTES:
        return torch.empty_like(t) if dtype is t.dtype else torch.empty_like(t, dtype=dtype)
    e = torch.from_numpy(np.empty(t.shape, dtype=_NUMPY_DTYPES[dtype]))
    return e.view(dtype) if dtype in (torch.bfloat16, torch.float16) else e


_TOKENS = {dtype: np.empty(0, dtype=np_dtype) for dtype, np_dtype in _NUMPY_DTYPES.items()}


# the thread count last given to numba, as numba keeps it: per calling thread in its own
# layers, as torch's; one for the process on torch's threads (``_torch_threads``)
_thread_count = SimpleNamespace() if _torch_threads.installed() else threading.local()
# Work (elements) below which a kernel runs on the calling thread alone: starting the
# other threads costs more than sharing this much work saves.  On torch's threads, still
# spinning from torch's last op, ~2-3 µs a call (two cores: 64K elements of RMSNorm run
# 1.05-1.4x faster on both, 16K-32K 0.85-1.2x); waking TBB's sleeping pool costs ~8 µs.
_ONE_THREAD_BELOW = 1 << 16 if _torch_threads.installed() else 1 << 17


def _threads(work: int) -> int:
    """numba runs as many threads as torch (``torch.set_num_threads``), or one for less
    than ``_ONE_THREAD_BELOW`` elements of work; set only on a change, since numba's
    setter costs ~2 µs a call.  -> that count."""
    n = 1
    if work >= _ONE_THREAD_BELOW:
        n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if getattr(_thread_count, "n", None) != n:
        numba.set_num_threads(n)
        _thread_count.n = n
    return n


def _torch_lanes(dtype: torch.dtype) -> int | None:
    """How many values of ``dtype`` (float32 or float64) torch's CPU ``sum`` adds per
    vector (``_torch_mean_square``'s ``lanes``): found once, by summing probe rows the way
    a vector of each width would and keeping the width that gives torch's own bits (16
    float32 with AVX-512, 8 with AVX2); None, our own order, where none does."""
    if dtype not in _LANES:
        g = torch.Generator().manual_seed(0)
        probes = [torch.randn(n, generator=g, dtype=dtype) * 3 for n in (3, 29, 100, 1000, 4133, 20000)]
        expected = [p.pow(2).mean() for p in probes]
        lanes = None
        for width in (16, 8, 4, 32, 2):
            acc4 = np.empty((4, 4 * width), dtype=_NUMPY_DTYPES[dtype])
            if all(_torch_mean_square(p.numpy(), width, acc4) == e.item() for p, e in zip(probes, expected)):
                lanes = width
                break
        _LANES[dtype] = lanes
    return _LANES[dtype]


_LANES: dict[torch.dtype, int | None] = {}


class _RowTypes(NamedTuple):
    """What the row-norm kernels' wrappers derive from the argument dtypes and ``cast``:
    found once per combination (``_row_types``), since a decoding step pays ~0.1 µs for
    each line of its own."""

    out: torch.dtype  # y's dtype
    acc: torch.dtype  # the statistics'
    x: np.ndarray  # the tokens ``at`` builds each array with: x's (and r's, dy's, dx's),
    weight: np.ndarray  # the weight's, the bias's (x's where absent), y's, the statistics'
    bias: np.ndarray
    y: np.ndarray
    acc_token: np.ndarray
    rounding: int  # ``cast`` less its summation-order bit
    lanes: int | None  # ``_torch_mean_square``'s (None: our own order)


def _row_types(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, cast: int) -> _RowTypes:
    key = (x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype, cast)
    types = _ROW_TYPES.get(key)
    if types is None:
        out, acc, tx = row_norm_out_dtype(x.dtype, weight, cast), acc_dtype(x.dtype), _TOKENS[x.dtype]
        types = _ROW_TYPES[key] = _RowTypes(
            out, acc, tx, tx if weight is None else _TOKENS[weight.dtype], tx if bias is None else _TOKENS[bias.dtype],
            _TOKENS[out], _TOKENS[acc], cast & ROUNDING, _torch_lanes(acc) if cast & TORCH_ORDER else None,
        )
    return types


_ROW_TYPES: dict[tuple, _RowTypes] = {}


def row_norm_forward(x, residual, weight, bias, eps, offset, rms, cast=0, stats=True):
    # on every call, a decoding step's too: each line here costs ~0.1 µs (no generators,
    # no helper calls where an expression does)
    x = x.contiguous()
    if residual is not None:
        residual = residual.contiguous()
    if weight is not None:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    # rows of the last dim's d values, any leading shape: y comes out in x's shape, and
    # the caller's reshapes in and out (~1.7 µs of a decoding step's (1, 1, d)) are gone
    d = x.shape[-1]
    n = x.numel() // d
    serial = n * d < _ONE_THREAD_BELOW
    if not serial:  # (the serial path runs no parallel loop: numba's thread count is moot)
        _threads(n * d)
    types = _row_types(x, weight, bias, cast)
    y = torch.empty_like(x) if serial and types.out is x.dtype else _empty_like(x, types.out)
    r = None if residual is None else _empty_like(x)
    # (x.new_empty where the statistics have x's dtype: ~0.15 µs less than torch.empty's dtype argument)
    mean = None if rms else (x.new_empty(n) if types.acc is x.dtype else torch.empty(n, dtype=types.acc))
    rstd = (x.new_empty(n) if types.acc is x.dtype else torch.empty(n, dtype=types.acc)) if stats else None
    _row_norm_fwd_at(n, d, x.data_ptr(), types.x, None if residual is None else residual.data_ptr(),
                     None if weight is None else weight.data_ptr(), types.weight,
                     None if bias is None else bias.data_ptr(), types.bias, y.data_ptr(), types.y,
                     None if r is None else r.data_ptr(), None if mean is None else mean.data_ptr(),
                     0 if rstd is None else rstd.data_ptr(), types.acc_token, float(eps), float(offset),
                     types.rounding, types.lanes, None if serial else True)
    return y, r, mean, rstd


def row_norm_backward(dy, dr, r, weight, mean, rstd, offset, rms, cast, bias, wanted=(True, True, True)):
    # on every call, as ``row_norm_forward``: no generators, no helper calls where an
    # expression does (a decoding step's weight gradient is a ~2 µs kernel)
    dy, r, rstd = dy.contiguous(), r.contiguous(), rstd.contiguous()
    if weight is not None:
        weight = weight.contiguous()
    mean = None if rms else mean.contiguous()
    d = r.shape[-1]  # (rows of any leading shape, as the forward's)
    n = r.numel() // d
    serial = n * d < _ONE_THREAD_BELOW or _threads(n * d) == 1
    types = _row_types(r, weight, None, cast)
    dx = None
    if wanted[0]:
        dx = torch.empty_like(r) if serial else _empty_like(r)
        dr = None if dr is None else dr.contiguous()
    else:
        dr = None  # (dx's term)
    # the partial sums, (``_row_blocks``, d): for one block (d,), the gradient itself
    # (``_param_grad``); the kernel reads either by address
    blocks = (n + _ROW_BLOCK - 1) // _ROW_BLOCK  # (``_row_blocks`` without numba's dispatch)
    shape = (d,) if blocks == 1 else (blocks, d)
    dw_part = torch.empty(shape, dtype=types.acc) if weight is not None and wanted[1] else None
    db_part = torch.empty(shape, dtype=types.acc) if bias is not None and wanted[2] else None
    _row_norm_bwd_at(n, d, dy.data_ptr(), _TOKENS[dy.dtype], None if dr is None else dr.data_ptr(),
                     r.data_ptr(), types.x, None if weight is None else weight.data_ptr(), types.weight,
                     None if mean is None else mean.data_ptr(), rstd.data_ptr(), types.acc_token, float(offset),
                     types.rounding, None if dx is None else dx.data_ptr(),
                     None if dw_part is None else dw_part.data_ptr(),
                     None if db_part is None else db_part.data_ptr(), None if serial else True)
    return dx, _param_grad(dw_part, weight), _param_grad(db_part, bias)


_CL_CHUNK_ELEMENTS = 32768  # channels-last rows per statistics chunk: 128 KB of float32, in L2
# channels-last GroupNorm splits each sample's rows over the threads where there are fewer
# samples than threads (``_cl_split``), from this many values a sample (2x faster
# at 1x1280x64x64; at 82K values it breaks even, at 16K the two more parallel regions
# cost ~4 µs)
_CL_SPLIT_FROM = 1 << 17


def _channels_last(x: torch.Tensor) -> bool:
    return memory_format(x) is not torch.contiguous_format


def _cl_chunks(x: torch.Tensor, threads: int) -> int:
    """In how many chunks of rows (``_CL_CHUNK_ELEMENTS`` values each, at least a row) a
    channels-last BatchNorm's kernels take their statistics: by size alone, for any
    number of threads (``_cl_split``'s signature, as ``_channel_backward`` calls both)."""
    channels = x.shape[1]
    rows = x.numel() // max(1, channels)
    return max(1, min(rows, rows * channels // _CL_CHUNK_ELEMENTS))


def _channel_input(x: torch.Tensor):
    """x as the channel kernels read its storage: (x, n, c, L, channels_last), x made
    contiguous in its own layout (channels-last stays so; other strides become
    contiguous) and ``channels_last`` True or None (``_group_norm_fwd_at``)."""
    cl = _channels_last(x)
    fmt = (torch.channels_last if x.ndim == 4 else torch.channels_last_3d) if cl else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    n, c = x.shape[:2]
    return x, n, c, x.numel() // max(1, n * c), True if cl else None


def _empty_as(x: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor laid out as x (contiguous or channels-last), from
    ``_empty_like`` where it is large."""
    if x.numel() * x.itemsize < _FRESH_MMAP_BYTES:
        return torch.empty_like(x)
    if not _channels_last(x):
        return _empty_like(x)
    last = _empty_like(x.permute(0, *range(2, x.ndim), 1))  # (N, *spatial, C): x's storage order
    return last.permute(0, x.ndim - 1, *range(1, x.ndim - 1))


def _param_address(p: torch.Tensor | None, like: np.ndarray):
    """(address, dtype token) of a channel norm's weight or bias; (0, x's token) for None."""
    if p is None:
        return 0, like
    p = p.contiguous()
    return p.data_ptr(), _TOKENS[p.dtype]


def _grad_like(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else torch.empty(p.shape[0], dtype=p.dtype)


def group_norm_forward(x, weight, bias, num_groups, eps):
    acc = acc_dtype(x.dtype)
    mean, var = torch.empty(x.shape[0], num_groups, dtype=acc), torch.empty(x.shape[0], num_groups, dtype=acc)
    return _channel_forward(_group_norm_fwd_at, _cl_split, x, weight, bias, mean, var, num_groups, eps)


def _channel_forward(fwd_at, chunks, x, weight, bias, mean, var, how, eps):
    """A channel norm's forward on x's storage: ``fwd_at`` (``_group_norm_fwd_at``, with
    ``how`` the group count, or ``_batch_norm_fwd_at``, with ``how`` training), writing
    the statistics into ``mean`` and ``var`` (contiguous, the accumulation type), its
    channels-last kernels in ``chunks(x, threads)`` chunks.  -> (y, mean, var)."""
    x, n, c, length, cl = _channel_input(x)
    threads = _threads(x.numel())
    tx = _TOKENS[x.dtype]
    (w, tw), (b, tb) = _param_address(weight, tx), _param_address(bias, tx)
    y = _empty_as(x)
    fwd_at(n, c, length, x.data_ptr(), tx, w, tw, b, tb, y.data_ptr(), mean.data_ptr(), var.data_ptr(),
           _TOKENS[mean.dtype], how, float(eps), cl, chunks(x, threads) if cl else None)
    return y, mean, var


def group_norm_backward(dy, x, weight, mean, var, num_groups, eps, bias):
    return _channel_backward(_group_norm_bwd_at, _cl_split, dy, x, weight, bias, mean, var, num_groups, eps)


def _channel_backward(bwd_at, chunks, dy, x, weight, bias, mean, var, how, eps):
    """A channel norm's backward on x's storage: ``bwd_at`` (``_group_norm_bwd_at``, with
    ``how`` the group count, or ``_batch_norm_bwd_at``, with ``how`` training), its
    channels-last kernels in ``chunks(x, threads)`` chunks.  -> (dx, dw, db)."""
    x, n, c, length, cl = _channel_input(x)
    threads = _threads(x.numel())
    dy = _same_layout(dy, x)
    tx = _TOKENS[x.dtype]
    (w, tw), tb = _param_address(weight, tx), tx if bias is None else _TOKENS[bias.dtype]
    mean, var = mean.contiguous(), var.contiguous()
    dx, dw, db = _empty_as(x), _grad_like(weight), _grad_like(bias)
    bwd_at(n, c, length, dy.data_ptr(), _TOKENS[dy.dtype], x.data_ptr(), tx, w, tw, mean.data_ptr(), var.data_ptr(),
           _TOKENS[mean.dtype], how, float(eps), dx.data_ptr(), 0 if dw is None else dw.data_ptr(),
           0 if db is None else db.data_ptr(), tb, cl, chunks(x, threads) if cl else None)
    return dx, dw, db


def _same_layout(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t (a gradient of x's shape) laid out as ``_channel_input``'s x."""
    return t.contiguous(memory_format=memory_format(x))


def _cl_split(x: torch.Tensor, threads: int) -> int | None:
    """For a channels-last GroupNorm with fewer samples than ``threads`` and samples of
    ``_CL_SPLIT_FROM`` values or more, in how many chunks the split kernels take each
    sample's rows (enough for every thread); else None: one sample a thread."""
    n = x.shape[0]
    if n >= threads or x.numel() < _CL_SPLIT_FROM * n:
        return None
    return -(-threads // n)


def _param_grad(part: torch.Tensor, param: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter's gradient from per-chunk partial sums (rows of ``part``), added in
    order; in the parameter's dtype.  A 1-D ``part`` is one chunk's sums, allocated as
    the gradient itself (``row_norm_backward``), rounded once where the dtypes differ.
    None where either is None."""
    if param is None or part is None:
        return None
    if part.ndim == 1:
        return part if part.dtype is param.dtype else part.to(param.dtype)
    out = torch.empty(part.shape[1], dtype=param.dtype)
    _sum_chunks(_np(part), _np(out))
    return out


def batch_norm_forward(x, weight, bias, running_mean, running_var, training, eps):
    acc = acc_dtype(x.dtype)
    if training:
        mean, var = torch.empty(x.shape[1], dtype=acc), torch.empty(x.shape[1], dtype=acc)
    else:
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    return _channel_forward(_batch_norm_fwd_at, _cl_chunks, x, weight, bias, mean, var, training, eps)


def batch_norm_backward(dy, x, weight, mean, var, training, eps, bias):
    return _channel_backward(_batch_norm_bwd_at, _cl_chunks, dy, x, weight, bias, mean, var, training, eps)


def update_running_stats(running_mean, running_var, mean, var, n, momentum):
    rm, rv = running_mean, running_var
    if not (
        type(rm) is torch.Tensor and type(rv) is torch.Tensor and rm.is_cpu and rv.is_cpu
        and rm.dtype is rv.dtype and rm.dtype in _TOKENS and rm.is_contiguous() and rv.is_contiguous()
        and rm.numel() == rv.numel() == mean.shape[-1] and mean.dtype in _TOKENS
    ):
        return reference.update_running_stats(rm, rv, mean, var, n, momentum)
    mean, var = mean.detach().contiguous(), var.detach().contiguous()
    rows = 1 if mean.ndim == 1 else mean.shape[0]
    _running_stats_at(rm.numel(), rows, rm.data_ptr(), rv.data_ptr(), _TOKENS[rm.dtype], mean.data_ptr(),
                      var.data_ptr(), _TOKENS[mean.dtype], n, float(momentum))
    torch.autograd.graph.increment_version((rm, rv))  # written in place, as copy_ would count it


def dyt_forward(x, alpha, weight, bias):
    # on every call (as ``row_norm_forward``): the arrays by address, and no thread
    # start-up for work that fits one core
    x = x.contiguous()
    n, d = x.shape
    serial = n * d < _ONE_THREAD_BELOW
    if not serial:
        _threads(n * d)
    y = torch.empty_like(x) if serial else _empty_like(x)
    w = None if weight is None else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    tx = _TOKENS[x.dtype]
    _dyt_fwd_at(n, d, x.data_ptr(), tx, alpha.data_ptr(), _TOKENS[alpha.dtype],
                None if w is None else w.data_ptr(), tx if w is None else _TOKENS[w.dtype],
                None if b is None else b.data_ptr(), tx if b is None else _TOKENS[b.dtype],
                y.data_ptr(), None if serial else True)
    return y


def dyt_backward(dy, x, alpha, weight, bias):
    xk, dyk = x.contiguous(), dy.contiguous()
    n, d = xk.shape
    threads = 1 if n * d < _ONE_THREAD_BELOW else _threads(n * d)
    serial = threads == 1
    acc = acc_dtype(xk.dtype)
    dx = torch.empty_like(xk) if serial else _empty_like(xk)
    blocks = (n + _ROW_BLOCK - 1) // _ROW_BLOCK  # (``_row_blocks`` without numba's dispatch)
    columns = -(-threads // max(1, blocks))  # column ranges per block: a task for every thread
    part = torch.empty(3, blocks, d, dtype=acc)
    # the gradients, written by the kernel (each a Python indexing of part costs ~1 µs)
    dalpha = torch.empty_like(alpha)
    dw = None if weight is None else weight.new_empty(d)
    db = None if bias is None else bias.new_empty(d)
    w = None if weight is None else weight.contiguous()
    tx = _TOKENS[xk.dtype]
    tw = tx if w is None else _TOKENS[w.dtype]
    _dyt_bwd_at(n, d, blocks, dyk.data_ptr(), _TOKENS[dyk.dtype], xk.data_ptr(), tx, alpha.data_ptr(),
                _TOKENS[alpha.dtype], None if w is None else w.data_ptr(), tw, dx.data_ptr(), part.data_ptr(),
                _TOKENS[acc], dalpha.data_ptr(), None if dw is None else dw.data_ptr(),
                None if db is None else db.data_ptr(), tx if db is None else _TOKENS[db.dtype],
                None if serial else columns)
    return dx, dalpha, dw, db


def scale_norm_forward(x, weight, eps, stats=True):
    # (as ``dyt_forward``: by address, one thread for work that fits one core; rnorm
    # None without ``stats``, where no gradient is recorded)
    x = x.contiguous()
    n, d = x.shape
    serial = n * d < _ONE_THREAD_BELOW
    if not serial:
        _threads(n * d)
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x) if serial else _empty_like(x)
    rnorm = (x.new_empty(n) if acc is x.dtype else torch.empty(n, dtype=acc)) if stats else None
    _scale_norm_fwd_at(n, d, x.data_ptr(), _TOKENS[x.dtype], weight.data_ptr(), _TOKENS[weight.dtype], y.data_ptr(),
                       None if rnorm is None else rnorm.data_ptr(), _TOKENS[acc], float(eps), None if serial else True)
    return y, rnorm


def scale_norm_backward(dy, x, weight, rnorm, eps):
    xk, dyk, rnorm = x.contiguous(), dy.contiguous(), rnorm.contiguous()
    n, d = xk.shape
    serial = n * d < _ONE_THREAD_BELOW or _threads(n * d) == 1
    dx = torch.empty_like(xk) if serial else _empty_like(xk)
    dots = torch.empty(n, dtype=torch.float64)  # per row: in order below, whatever the threads
    _scale_norm_bwd_at(n, d, dyk.data_ptr(), _TOKENS[dyk.dtype], xk.data_ptr(), _TOKENS[xk.dtype], weight.data_ptr(),
                       _TOKENS[weight.dtype], rnorm.data_ptr(), _TOKENS[rnorm.dtype], dx.data_ptr(), dots.data_ptr(),
                       _TOKENS[torch.float64], float(eps), None if serial else True)
    return dx, dots.sum().reshape(weight.shape).to(weight.dtype)


# ---------------------------------------------------------------------------
# C entry points: the serial kernels of DyT, ScaleNorm, RMSNorm's and LayerNorm's forward
# and channels-last GroupNorm's forward as C functions (numba cfuncs), which the C++
# eager path (``addnorm/csrc/eager.cpp``, loaded by ``kernels/cpp.py``) calls by
# address, with no Python between the call and the kernel.  One function per op and
# pass serves x of every dtype (its code: ``C_DTYPES``) with parameters of x's dtype, an
# absent one a null address: numba compiles each combination into it (the by-address
# entries above with constant tokens, pruned as there).  Compiled by ``addnorm build`` (``c_entry_points``), then loaded from numba's
# cache like every kernel here.
# ---------------------------------------------------------------------------

C_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # dtype code = index
C_SERIAL_BELOW = _ONE_THREAD_BELOW  # the C++ path serves calls below this many elements
_F32, _F64, _BF16, _F16 = (_TOKENS[t] for t in C_DTYPES)


@njit(inline="always")
def _dyt_fwd_c(t, n, d, x, alpha, w, b, y):
    if w and b:
        _dyt_fwd_at(n, d, x, t, alpha, t, w, t, b, t, y, None)
    elif w:
        _dyt_fwd_at(n, d, x, t, alpha, t, w, t, None, t, y, None)
    elif b:
        _dyt_fwd_at(n, d, x, t, alpha, t, None, t, b, t, y, None)
    else:
        _dyt_fwd_at(n, d, x, t, alpha, t, None, t, None, t, y, None)


def dyt_forward_c(code, n, d, x, alpha, w, b, y):
    """``dyt_forward`` on the calling thread: y (n, d) = w * tanh(alpha * x) + b."""
    if code == 0:
        _dyt_fwd_c(_F32, n, d, x, alpha, w, b, y)
    elif code == 1:
        _dyt_fwd_c(_F64, n, d, x, alpha, w, b, y)
    elif code == 2:
        _dyt_fwd_c(_BF16, n, d, x, alpha, w, b, y)
    else:
        _dyt_fwd_c(_F16, n, d, x, alpha, w, b, y)


@njit(inline="always")
def _dyt_bwd_c(t, s, n, d, blocks, dy, x, alpha, w, dx, part, dalpha, dw, db):
    # dw with a weight, db with a bias (``dyt_backward``'s)
    if w and db:
        _dyt_bwd_at(n, d, blocks, dy, t, x, t, alpha, t, w, t, dx, part, s, dalpha, dw, db, t, None)
    elif w:
        _dyt_bwd_at(n, d, blocks, dy, t, x, t, alpha, t, w, t, dx, part, s, dalpha, dw, None, t, None)
    elif db:
        _dyt_bwd_at(n, d, blocks, dy, t, x, t, alpha, t, None, t, dx, part, s, dalpha, None, db, t, None)
    else:
        _dyt_bwd_at(n, d, blocks, dy, t, x, t, alpha, t, None, t, dx, part, s, dalpha, None, None, t, None)


def dyt_backward_c(code, n, d, blocks, dy, x, alpha, w, dx, part, dalpha, dw, db):
    """``dyt_backward`` on the calling thread, into dx, part (3, blocks, d) of the
    accumulation type, dalpha, and dw (with w) and db (non-null: wanted)."""
    if code == 0:
        _dyt_bwd_c(_F32, _F32, n, d, blocks, dy, x, alpha, w, dx, part, dalpha, dw, db)
    elif code == 1:
        _dyt_bwd_c(_F64, _F64, n, d, blocks, dy, x, alpha, w, dx, part, dalpha, dw, db)
    elif code == 2:
        _dyt_bwd_c(_BF16, _F32, n, d, blocks, dy, x, alpha, w, dx, part, dalpha, dw, db)
    else:
        _dyt_bwd_c(_F16, _F32, n, d, blocks, dy, x, alpha, w, dx, part, dalpha, dw, db)


@njit(inline="always")
def _scale_norm_fwd_c(t, s, n, d, x, w, y, rnorm, eps):
    if rnorm:
        _scale_norm_fwd_at(n, d, x, t, w, t, y, rnorm, s, eps, None)
    else:
        _scale_norm_fwd_at(n, d, x, t, w, t, y, None, s, eps, None)


def scale_norm_forward_c(code, n, d, x, w, y, rnorm, eps):
    """``scale_norm_forward`` on the calling thread; rnorm (n,) of the accumulation type,
    null where no gradient is recorded."""
    if code == 0:
        _scale_norm_fwd_c(_F32, _F32, n, d, x, w, y, rnorm, eps)
    elif code == 1:
        _scale_norm_fwd_c(_F64, _F64, n, d, x, w, y, rnorm, eps)
    elif code == 2:
        _scale_norm_fwd_c(_BF16, _F32, n, d, x, w, y, rnorm, eps)
    else:
        _scale_norm_fwd_c(_F16, _F32, n, d, x, w, y, rnorm, eps)


def scale_norm_backward_c(code, n, d, dy, x, w, rnorm, dx, dots, eps):
    """``scale_norm_backward``'s kernel on the calling thread: dx, and dots (n,) in
    float64, whose sum is g's gradient."""
    if code == 0:
        _scale_norm_bwd_at(n, d, dy, _F32, x, _F32, w, _F32, rnorm, _F32, dx, dots, _F64, eps, None)
    elif code == 1:
        _scale_norm_bwd_at(n, d, dy, _F64, x, _F64, w, _F64, rnorm, _F64, dx, dots, _F64, eps, None)
    elif code == 2:
        _scale_norm_bwd_at(n, d, dy, _BF16, x, _BF16, w, _BF16, rnorm, _F32, dx, dots, _F64, eps, None)
    else:
        _scale_norm_bwd_at(n, d, dy, _F16, x, _F16, w, _F16, rnorm, _F32, dx, dots, _F64, eps, None)


@njit(inline="always")
def _group_norm_cl_fwd_c(t, s, n, c, length, groups, x, w, b, y, mean, var, eps):
    shape = (n, length, c)
    xs, ys = at(x, t, shape), at(y, t, shape)
    means, variances = at(mean, s, (n, groups)), at(var, s, (n, groups))
    wa, ba = _acc_param(w, t, t, c), _acc_param(b, t, t, c)
    _group_norm_cl_samples(xs, wa, ba, ys, means, variances, scratch(t, (3, c)), groups, eps)


def group_norm_cl_forward_c(code, n, c, length, groups, x, w, b, y, mean, var, eps):
    """``group_norm_forward`` of n channels-last samples on the calling thread: x, y
    (n, L, C); the weight and bias of x's dtype, each absent at address 0; mean and var
    (n, groups) of the accumulation type.  The Python path's kernel, a sample at a time
    (``_group_norm_cl_fwd``): the same bits."""
    if code == 0:
        _group_norm_cl_fwd_c(_F32, _F32, n, c, length, groups, x, w, b, y, mean, var, eps)
    elif code == 1:
        _group_norm_cl_fwd_c(_F64, _F64, n, c, length, groups, x, w, b, y, mean, var, eps)
    elif code == 2:
        _group_norm_cl_fwd_c(_BF16, _F32, n, c, length, groups, x, w, b, y, mean, var, eps)
    else:
        _group_norm_cl_fwd_c(_F16, _F32, n, c, length, groups, x, w, b, y, mean, var, eps)


@njit(inline="always")
def _rms_norm_rows_c(t, s, n, d, x, res, w, y, r_out, rstd_out, eps, offset, cast, lanes):
    # the by-address entry's serial call: the same ``_row_norm_fwd_rows`` specializations
    # as the Python path's, shared in numba's cache
    _row_norm_fwd_at(n, d, x, t, res, w, t, None, t, y, t, r_out, None, rstd_out, s, eps, offset, cast, lanes, None)


@njit(inline="always")
def _rms_norm_lanes_c(t, s, n, d, x, res, w, y, r_out, rstd_out, eps, offset, cast, lanes):
    if lanes:
        _rms_norm_rows_c(t, s, n, d, x, res, w, y, r_out, rstd_out, eps, offset, cast, lanes)
    else:
        _rms_norm_rows_c(t, s, n, d, x, res, w, y, r_out, rstd_out, eps, offset, cast, None)


@njit(inline="always")
def _rms_norm_fwd_c(t, s, n, d, x, res, w, y, r_out, rstd_out, eps, offset, cast, lanes):
    # residual and weight each present or absent (a null address: None), for numba to
    # compile each combination
    if res and w:
        _rms_norm_lanes_c(t, s, n, d, x, res, w, y, r_out, rstd_out, eps, offset, cast, lanes)
    elif res:
        _rms_norm_lanes_c(t, s, n, d, x, res, None, y, r_out, rstd_out, eps, offset, cast, lanes)
    elif w:
        _rms_norm_lanes_c(t, s, n, d, x, None, w, y, None, rstd_out, eps, offset, cast, lanes)
    else:
        _rms_norm_lanes_c(t, s, n, d, x, None, None, y, None, rstd_out, eps, offset, cast, lanes)


def rms_norm_forward_c(code, n, d, x, res, w, y, r_out, rstd_out, eps, offset, cast, lanes):
    """``row_norm_forward`` of RMSNorm on the calling thread: y (and r_out = x + res with
    a residual) of (n, d) rows, the weight of x's dtype or absent; rstd_out null: no
    statistics wanted; ``cast`` the rounding bits of ``reference``'s, ``lanes`` as
    ``_torch_mean_square``'s (0: the kernel's own order)."""
    if code == 0:
        _rms_norm_fwd_c(_F32, _F32, n, d, x, res, w, y, r_out, rstd_out, eps, offset, cast, lanes)
    elif code == 1:
        _rms_norm_fwd_c(_F64, _F64, n, d, x, res, w, y, r_out, rstd_out, eps, offset, cast, lanes)
    elif code == 2:
        _rms_norm_fwd_c(_BF16, _F32, n, d, x, res, w, y, r_out, rstd_out, eps, offset, cast, lanes)
    else:
        _rms_norm_fwd_c(_F16, _F32, n, d, x, res, w, y, r_out, rstd_out, eps, offset, cast, lanes)


@njit(inline="always")
def _layer_norm_fwd_c(t, s, n, d, x, res, w, b, y, r_out, mean_out, rstd_out, eps, offset, cast):
    # the Python path's call of a LayerNorm with a weight and a bias, so that both share
    # numba's cache (offset and cast come in as arguments: the literals 0.0 and 0 would be
    # other types, other specializations)
    if res:
        _row_norm_fwd_at(n, d, x, t, res, w, t, b, t, y, t, r_out, mean_out, rstd_out, s, eps, offset, cast, None,
                         None)
    else:
        _row_norm_fwd_at(n, d, x, t, None, w, t, b, t, y, t, None, mean_out, rstd_out, s, eps, offset, cast, None,
                         None)


def layer_norm_forward_c(code, n, d, x, res, w, b, y, r_out, mean_out, rstd_out, eps, offset, cast):
    """``row_norm_forward`` of LayerNorm on the calling thread: y (and r_out = x + res
    with a residual) of (n, d) rows; w and b of x's dtype, both always given (eager.cpp
    stands ones and -0.0 in for absent ones: ``h * 1`` and ``h + -0.0`` are h, bit for bit
    and sign of zero, in ``_normalize_into``'s unfused arithmetic), so that only the
    residual makes a variant: 8 kernels to compile, not 32; mean_out (n,) always, rstd_out
    null: no statistics wanted; offset 0.0, cast 0 (a LayerNorm's)."""
    if code == 0:
        _layer_norm_fwd_c(_F32, _F32, n, d, x, res, w, b, y, r_out, mean_out, rstd_out, eps, offset, cast)
    elif code == 1:
        _layer_norm_fwd_c(_F64, _F64, n, d, x, res, w, b, y, r_out, mean_out, rstd_out, eps, offset, cast)
    elif code == 2:
        _layer_norm_fwd_c(_BF16, _F32, n, d, x, res, w, b, y, r_out, mean_out, rstd_out, eps, offset, cast)
    else:
        _layer_norm_fwd_c(_F16, _F32, n, d, x, res, w, b, y, r_out, mean_out, rstd_out, eps, offset, cast)


_i64, _f64 = types.int64, types.float64
C_SIGNATURES = {  # what eager.cpp declares for each
    "rms_norm_forward": types.void(*[_i64] * 9, _f64, _f64, _i64, _i64),
    "layer_norm_forward": types.void(*[_i64] * 11, _f64, _f64, _i64),
    "dyt_forward": types.void(*[_i64] * 8),
    "dyt_backward": types.void(*[_i64] * 13),
    "scale_norm_forward": types.void(*[_i64] * 7, _f64),
    "scale_norm_backward": types.void(*[_i64] * 9, _f64),
    "group_norm_cl_forward": types.void(*[_i64] * 11, _f64),
}


def c_entry_points(names=None, cached_only: bool = False) -> dict[str, int] | None:
    """The C entry points' addresses by name (``names``, or all), compiled (or loaded from
    numba's cache); with ``cached_only``, None unless every one is in numba's cache (they
    take ~1.5 min to compile: ``addnorm build``'s work, never a first call's).  Their code
    can reach a parallel loop (``_sum_chunks``'s, not taken at their sizes), which links
    against numba's threading layer: launched first, as loading a cached dispatcher with
    such a loop does (a cfunc loaded from the cache has no hook for it: "Symbol not
    found: allocate_sched")."""
    from numba.core import sigutils
    from numba.core.ccallback import CFunc

    numba.np.ufunc.parallel._launch_threads()
    functions = {}
    for name in C_SIGNATURES if names is None else names:
        # numba.cfunc(signature, cache=True, nogil=True), with a look into the cache first
        f = CFunc(globals()[name + "_c"], sigutils.normalize_signature(C_SIGNATURES[name]), locals={},
                  options={"nogil": True})
        f.enable_caching()
        if cached_only and f._cache.load_overload(f._sig, f._targetdescr.target_context) is None:
            return None
        functions[name] = f
    for f in functions.values():
        f.compile()  # from the cache, or compiled
    return {name: f.address for name, f in functions.items()}
