"""The ``triton`` backend: LayerNorm and RMSNorm rows, with or without the fused residual
add, GroupNorm (InstanceNorm's too) and DyT, forward and backward, in Triton.

Written for CUDA tensors; with ``TRITON_INTERPRET=1`` set before this module is
imported, the same kernels run on CPU tensors through Triton's interpreter, which is how
the test suite checks them on a machine without a GPU.

One kernel per direction serves every variant by compile-time flags (as flash-attn's
Triton layer norm): LayerNorm or RMSNorm, residual in and out, weight (with Gemma's
``offset``) and bias present or not, statistics stored or not.  A row that fits one
block (``_MAX_BLOCK`` values) is held in registers; a longer one is walked block by
block, once for each statistic and once to write.  GroupNorm walks each (sample, group)
in [channels, positions] tiles whose strides cover contiguous and channels-last inputs
alike.  Statistics accumulate in float32 (float64 for float64 input).

RMSNorm's casting modes are a compile-time flag too: the output rounded once ("torch",
"gemma"), or the normalized value rounded to the input's dtype before the weight
("llama"), or rstd, the normalized value and the scale each rounded ("none").  Their
``TORCH_ORDER`` bit (sum the squares in torch's CPU order, so a patched model's output is
the original's bit for bit on CPU) is not followed: on a GPU torch's own reduction order
is its CUDA kernel's, which no Triton kernel reproduces, so the statistic may differ from
the family's code in its last float32 bit, as Liger-Kernel's casting modes do.
BatchNorm and ScaleNorm are not written here: BatchNorm runs torch's own (cuDNN's) by
``functional``'s rule, ScaleNorm ``reference``'s torch ops on the same device
(``_backend``'s fallback).

Every launch goes through ``_launch``: under ``torch.compile`` the kernels are launched
through ``torch.library.wrap_triton``, so inductor sees them (``ops._into_triton_kernels``).
Launch settings (values per thread, programs per SM, the largest block) were chosen by
``benchmarks/gpu_tune.py`` on an H100.

The backward: each program takes a contiguous run of rows (a sample's group), writes
their dx and its weight and bias gradient terms into a partial-sum row of its own; the
partial rows are then added by torch's column sum, in a fixed order: results are
deterministic.
"""

from __future__ import annotations

import functools
import math
import os
import struct

import torch
import triton
import triton.language as tl

from ..reference import CAST_ONCE, ROUNDING, acc_dtype, memory_format, row_norm_out_dtype

_MAX_BLOCK = 16384  # values of a row held at once; longer rows loop over blocks of it
_MAX_ROWS = 64  # rows a forward program takes at most, where rows are narrow
_ROWS_TILE = 4096  # values a forward program takes at most where it takes several rows
_VALUES_PER_THREAD = {"fwd": 16, "bwd": 4}  # a block's values over a program's threads
_WARPS = (1, 32)  # warps a program runs, at least and at most
_VALUES_PER_SM = 8192  # the backward's programs per multiprocessor: this over the block, 1 to 4
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _row_norm_fwd_kernel(
    X, RES, W, B, Y, R_OUT, MEAN, RSTD,
    N, D, eps, eps_lo, offset,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr,
    STORE_MEAN: tl.constexpr, STORE_RSTD: tl.constexpr, CAST: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    """y = (r - mean) * rstd * (w + offset) + b, r = x (+ res): ``ROWS`` rows a program
    where a row fits one block (narrow rows share a program, so it has work enough), one
    row walked block by block otherwise."""
    if ONE_BLOCK:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        in_rows = rows < N
        mask = in_rows[:, None] & (cols < D)[None, :]
        at = rows[:, None] * D + cols[None, :]
        r = _load_row(X, RES, R_OUT, at, mask, HAS_RES, True, ACC)
        if RMS:
            mean = tl.zeros([ROWS], dtype=ACC)
            var = tl.sum(r * r, axis=1) / D
        else:
            mean = tl.sum(r, axis=1) / D
            centred = tl.where(mask, r - mean[:, None], 0.0)
            var = tl.sum(centred * centred, axis=1) / D
        rstd = _rsqrt(var + _widened(eps, eps_lo, ACC), ACC)
        if CAST == 2:  # CAST_EACH: rstd rounded too, and stored as y used it
            rstd = _rounded(rstd, X, ACC)
        _store_normalized(X, Y, W, B, r, at, mask, cols[None, :], mean[:, None], rstd[:, None], offset,
                          HAS_W, HAS_B, CAST, ACC)
        if STORE_MEAN:
            tl.store(MEAN + rows, mean, mask=in_rows)
        if STORE_RSTD:
            tl.store(RSTD + rows, rstd, mask=in_rows)
    else:
        # the statistics block by block; r recomputed from x and res in each pass, not
        # read back from R_OUT, so no pass reads what an earlier one stored
        row = tl.program_id(0).to(tl.int64)
        total = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, D, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < D
            r = _load_row(X, RES, R_OUT, row * D + cols, mask, HAS_RES, True, ACC)
            if RMS:
                total += r * r
            else:
                total += r
        if RMS:
            mean = 0.0
            var = tl.sum(total, axis=0) / D
        else:
            mean = tl.sum(total, axis=0) / D
            total = tl.zeros([BLOCK], dtype=ACC)
            for start in range(0, D, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < D
                r = _load_row(X, RES, R_OUT, row * D + cols, mask, HAS_RES, False, ACC)
                centred = tl.where(mask, r - mean, 0.0)
                total += centred * centred
            var = tl.sum(total, axis=0) / D
        rstd = _rsqrt(var + _widened(eps, eps_lo, ACC), ACC)
        if CAST == 2:
            rstd = _rounded(rstd, X, ACC)
        for start in range(0, D, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < D
            r = _load_row(X, RES, R_OUT, row * D + cols, mask, HAS_RES, False, ACC)
            _store_normalized(X, Y, W, B, r, row * D + cols, mask, cols, mean, rstd, offset, HAS_W, HAS_B,
                              CAST, ACC)
        if STORE_MEAN:
            tl.store(MEAN + row, mean)
        if STORE_RSTD:
            tl.store(RSTD + row, rstd)


@triton.jit
def _widened(hi, lo, ACC: tl.constexpr):
    """A float argument passed as ``_split``'s two parts, in ``ACC``: exact to float64's
    ~1e-15 where one float32 (what Triton makes of a Python float) would be off by ~1e-8."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _rsqrt(v, ACC: tl.constexpr):
    """1 / sqrt(v), correctly rounded (the GPU's default float32 sqrt and division are
    approximate; float64's are exact)."""
    if ACC == tl.float64:
        out = 1.0 / tl.sqrt(v)
    else:
        out = tl.div_rn(1.0, tl.sqrt_rn(v))
    return out


@triton.jit
def _load_row(X, RES, R_OUT, at, mask, HAS_RES: tl.constexpr, STORE_R: tl.constexpr, ACC: tl.constexpr):
    """r = x (+ res, rounded to x's dtype as an unfused add rounds it, and stored to R_OUT
    where ``STORE_R``) at offsets ``at``, widened to the accumulation type."""
    x = tl.load(X + at, mask=mask, other=0.0)
    if HAS_RES:
        res = tl.load(RES + at, mask=mask, other=0.0)
        x = (x.to(ACC) + res.to(ACC)).to(X.dtype.element_ty)
        if STORE_R:
            tl.store(R_OUT + at, x, mask=mask)
    return x.to(ACC)


@triton.jit
def _store_normalized(X, Y, W, B, r, at, mask, cols, mean, rstd, offset,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, CAST: tl.constexpr, ACC: tl.constexpr):
    """y = ((r - mean) * rstd) * (w + offset) + b at offsets ``at`` (w and b at ``cols``),
    rounded to y's dtype; with ``CAST`` (``reference.CAST_XHAT``, ``CAST_EACH``) the
    normalized value, and for ``CAST_EACH`` the scale, rounded to X's dtype first."""
    y = (r - mean) * rstd
    if CAST != 0:
        y = _rounded(y, X, ACC)
    if HAS_W:
        scale = tl.load(W + cols, mask=mask, other=0.0).to(ACC) + offset
        if CAST == 2:
            scale = _rounded(scale, X, ACC)
        y = y * scale
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(ACC)
    tl.store(Y + at, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rounded(v, like, ACC: tl.constexpr):
    """v rounded to the element type of the pointer ``like`` and widened back to ``ACC``
    (``reference.round_to``)."""
    return v.to(like.dtype.element_ty).to(ACC)


@triton.jit
def _row_norm_bwd_kernel(
    DY, DR, R, W, MEAN, RSTD, DX, DW_PART, DB_PART,
    N, D, rows_per_program, offset,
    HAS_DR: tl.constexpr, HAS_W: tl.constexpr, RMS: tl.constexpr, WANT_DX: tl.constexpr,
    WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, ROUND: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    """Rows [pid * rows_per_program, ...): with g = dy * (w + offset) and xhat = (r - mean)
    * rstd, dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dr), mean(g) absent for
    RMSNorm; the program's dw and db terms summed into its own partial rows.  ``ROUND``:
    the forward rounded xhat to R's dtype (a casting mode), so g is rounded as autograd
    rounds the gradient of that rounding, and dw takes the rounded xhat."""
    pid = tl.program_id(0).to(tl.int64)  # 64-bit row offsets: no overflow past 2**31 values
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, N)
    DW_PART += pid * D
    DB_PART += pid * D
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        dw = tl.zeros([BLOCK], dtype=ACC)
        db = tl.zeros([BLOCK], dtype=ACC)
        for row in range(first, last):
            at = row * D
            xhat, dy, g = _grad_terms(DY + at, R + at, W, MEAN, RSTD, row, cols, mask, offset, HAS_W, RMS,
                                      ROUND, ACC)
            if WANT_DW:
                dw += _weight_term(dy, xhat, R, ROUND, ACC)
            if WANT_DB:
                db += dy
            if WANT_DX:
                c_gx = tl.sum(g * xhat, axis=0) / D
                c_g = 0.0
                if not RMS:
                    c_g = tl.sum(g, axis=0) / D
                _store_dx(DX + at, DR + at, g, xhat, c_gx, c_g, tl.load(RSTD + row), cols, mask, HAS_DR, ACC)
        if WANT_DW:
            tl.store(DW_PART + cols, dw, mask=mask)
        if WANT_DB:
            tl.store(DB_PART + cols, db, mask=mask)
    else:
        # the partial rows start zeroed; each block's terms are added where the same
        # thread stored them for the row before (the same [BLOCK] layout every time)
        for row in range(first, last):
            at = row * D
            s_gx = tl.zeros([BLOCK], dtype=ACC)
            s_g = tl.zeros([BLOCK], dtype=ACC)
            for start in range(0, D, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < D
                xhat, dy, g = _grad_terms(DY + at, R + at, W, MEAN, RSTD, row, cols, mask, offset, HAS_W, RMS,
                                          ROUND, ACC)
                s_gx += g * xhat
                s_g += g
                if WANT_DW:
                    dw = tl.load(DW_PART + cols, mask=mask) + _weight_term(dy, xhat, R, ROUND, ACC)
                    tl.store(DW_PART + cols, dw, mask=mask)
                if WANT_DB:
                    tl.store(DB_PART + cols, tl.load(DB_PART + cols, mask=mask) + dy, mask=mask)
            if WANT_DX:
                c_gx = tl.sum(s_gx, axis=0) / D
                c_g = 0.0
                if not RMS:
                    c_g = tl.sum(s_g, axis=0) / D
                rstd = tl.load(RSTD + row)
                for start in range(0, D, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < D
                    xhat, dy, g = _grad_terms(DY + at, R + at, W, MEAN, RSTD, row, cols, mask, offset, HAS_W,
                                              RMS, ROUND, ACC)
                    _store_dx(DX + at, DR + at, g, xhat, c_gx, c_g, rstd, cols, mask, HAS_DR, ACC)


@triton.jit
def _grad_terms(DY, R, W, MEAN, RSTD, row, cols, mask, offset, HAS_W: tl.constexpr, RMS: tl.constexpr,
                ROUND: tl.constexpr, ACC: tl.constexpr):
    """(xhat, dy, g = dy * (w + offset), rounded to R's dtype where ``ROUND``) of one block
    of one row, zero outside the row."""
    r = tl.load(R + cols, mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + cols, mask=mask, other=0.0).to(ACC)
    rstd = tl.load(RSTD + row)
    if RMS:
        xhat = r * rstd
    else:
        xhat = tl.where(mask, (r - tl.load(MEAN + row)) * rstd, 0.0)
    g = dy
    if HAS_W:
        g = dy * (tl.load(W + cols, mask=mask, other=0.0).to(ACC) + offset)
    if ROUND:
        g = _rounded(g, R, ACC)
    return xhat, dy, g


@triton.jit
def _weight_term(dy, xhat, R, ROUND: tl.constexpr, ACC: tl.constexpr):
    """One row's term of the weight gradient: dy * xhat, xhat rounded as the forward
    rounded it where ``ROUND``."""
    if ROUND:
        xhat = _rounded(xhat, R, ACC)
    return dy * xhat


@triton.jit
def _store_dx(DX, DR, g, xhat, c_gx, c_g, rstd, cols, mask, HAS_DR: tl.constexpr, ACC: tl.constexpr):
    dx = (g - c_g - xhat * c_gx) * rstd
    if HAS_DR:
        dx += tl.load(DR + cols, mask=mask, other=0.0).to(ACC)
    tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=256)
def _split(v: float) -> tuple[float, float]:
    """v as float32 ``hi`` plus float32 ``lo`` (the rest), for ``_widened``: Triton passes
    a Python float as float32, which float64 statistics would otherwise add."""
    hi = _float32(v)
    return hi, _float32(v - hi)


def _float32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _launch(kernel):
    """``kernel``; while torch.compile traces an op into its kernels (``ops``'
    ``_into_triton_kernels``, under functionalization), the same kernel wrapped by
    ``torch.library.wrap_triton``, so inductor sees it.  Plain eager calls launch it
    straight (the wrapper's dispatch would cost more than the launch)."""
    if _get_dispatch_mode(_FUNCTIONAL) is not None:
        return torch.library.wrap_triton(kernel)
    return kernel


_get_dispatch_mode = torch._C._get_dispatch_mode
_FUNCTIONAL = torch._C._TorchDispatchModeKey.FUNCTIONAL


# Host-side sizes in plain Python: triton's own ``cdiv`` and ``next_power_of_2`` are
# ``constexpr_function`` objects that cost ~2 µs a call from host code (triton 3.9),
# three of them a row norm's launch, against ~0.1 µs here.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _tl_acc(dtype: torch.dtype):
    """The kernels' ``ACC``: float64 statistics for float64 input, float32 for the rest."""
    return tl.float64 if dtype is torch.float64 else tl.float32


def _warps(values: int, direction: str) -> int:
    """num_warps for a program that holds ``values`` at once: enough threads that each
    holds ``_VALUES_PER_THREAD`` of them (more spill registers; fewer leave the memory
    system idle), a power of two within ``_WARPS``."""
    want = _next_power_of_2(max(1, values // (32 * _VALUES_PER_THREAD[direction])))
    return max(_WARPS[0], min(_WARPS[1], want))


def _block(d: int) -> tuple[int, bool]:
    """(values per block, whether the row fits one block)."""
    block = min(_next_power_of_2(d), _MAX_BLOCK)
    return block, d <= block


def _check_device(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and not t.is_cuda and not _INTERPRETED:
            raise RuntimeError(
                f"the triton backend runs CUDA tensors (got one on {t.device}); CPU tensors "
                "only through Triton's interpreter (TRITON_INTERPRET=1 before addnorm loads it)"
            )


def _operand(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """t, contiguous, as a kernel's pointer; for an absent operand ``like`` stands in (its
    flag keeps the kernel from touching it)."""
    return like if t is None else t.contiguous()


def _partials(wanted: tuple[bool, bool], rows: int, cols: int, like: torch.Tensor, zeroed: bool):
    """(buffer, (dw's rows, db's rows)): the weight's and the bias's partial-sum rows,
    each (rows, cols) where ``wanted`` and None where not, in one allocation, so that one
    column sum adds both (``_summed``).  ``zeroed`` where a kernel adds into them, or
    leaves some unwritten (no program runs on an empty input)."""
    count = wanted[0] + wanted[1]
    if not count:
        return None, (None, None)
    buffer = (torch.zeros if zeroed else torch.empty)(count, rows, cols, dtype=acc_dtype(like.dtype),
                                                      device=like.device)
    views = iter(buffer.unbind(0))  # (one call: iterating a tensor unbinds it through Python)
    return buffer, tuple(next(views) if w else None for w in wanted)


def _summed(buffer: torch.Tensor | None, weight, bias, wanted: tuple[bool, bool]):
    """(dweight, dbias): ``_partials``' rows added over programs in a fixed order, each in
    its parameter's dtype; None where not ``wanted``."""
    if buffer is None:
        return None, None
    # one program's row is the sum itself (a single row's backward: no column-sum launch)
    sums = iter((buffer.select(1, 0) if buffer.shape[1] == 1 else buffer.sum(1)).unbind(0))
    return tuple(next(sums).to(p.dtype) if w else None for p, w in zip((weight, bias), wanted))


def row_norm_forward(x, residual, weight, bias, eps, offset, rms, cast=CAST_ONCE, stats=True):
    """``reference.row_norm_forward``'s contract; ``cast``'s ``TORCH_ORDER`` bit is not
    followed (see the module's docstring)."""
    _check_device(x, residual, weight, bias)
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    d = x.shape[-1]  # rows of the last dim, any leading shape (the CPU kernels' contract)
    n = x.numel() // d
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x, dtype=row_norm_out_dtype(x.dtype, weight, cast))
    r = None if residual is None else torch.empty_like(x)
    # the statistics only where a backward will read them (each allocation is host time)
    mean = None if rms or not stats else torch.empty(n, dtype=acc, device=x.device)
    rstd = torch.empty(n, dtype=acc, device=x.device) if stats else None
    block, one_block = _block(d)
    rows = max(1, min(_MAX_ROWS, _ROWS_TILE // block)) if one_block else 1
    if n:
        _launch(_row_norm_fwd_kernel)[(_cdiv(n, rows),)](
            x, _operand(residual, x), _operand(weight, x), _operand(bias, x),
            y, _operand(r, x), _operand(mean, x), _operand(rstd, x),
            n, d, *_split(eps), float(offset),
            HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, RMS=rms,
            STORE_MEAN=mean is not None, STORE_RSTD=stats, CAST=cast & ROUNDING,
            ACC=_tl_acc(x.dtype), BLOCK=block, ONE_BLOCK=one_block, ROWS=rows,
            num_warps=_warps(rows * block, "fwd"),
        )
    return y, r, mean, rstd


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(n: int, device: torch.device, block: int) -> int:
    """How many programs share the backward's rows: a few per multiprocessor for narrow
    rows, one for wide ones (each program's partial row of the parameter gradients is
    then added by one more pass; measured on an H100, ``benchmarks/gpu_tune.py``)."""
    if device.type == "cuda":
        return max(1, min(n, max(1, min(4, _VALUES_PER_SM // block)) * _sm_count(device.index)))
    return max(1, min(n, 8))


def row_norm_backward(dy, dr, r, weight, mean, rstd, offset, rms, cast, bias, wanted=(True, True, True)):
    _check_device(dy, dr, r, weight)
    dy, r = dy.contiguous(), r.contiguous()
    dr = None if dr is None else dr.contiguous()
    d = r.shape[-1]
    n = r.numel() // d
    want_dx, want_dw, want_db = wanted[0], weight is not None and wanted[1], bias is not None and wanted[2]
    block, one_block = _block(d)
    programs = _programs(n, r.device, block)
    dx = torch.empty_like(r) if want_dx else None
    # each program writes its whole partial row, where one runs: the blockwise path adds
    # into it row by row, and no program runs on no rows
    buffer, (dw_part, db_part) = _partials((want_dw, want_db), programs, d, r, zeroed=not one_block or not n)
    if n:
        _launch(_row_norm_bwd_kernel)[(programs,)](
            dy, _operand(dr, dy), r, _operand(weight, r), _operand(None if rms else mean, rstd),
            rstd.contiguous(), _operand(dx, r), _operand(dw_part, rstd), _operand(db_part, rstd),
            n, d, _cdiv(n, programs), float(offset),
            HAS_DR=dx is not None and dr is not None, HAS_W=weight is not None, RMS=rms,
            WANT_DX=want_dx, WANT_DW=want_dw, WANT_DB=want_db, ROUND=cast & ROUNDING != CAST_ONCE,
            ACC=_tl_acc(r.dtype), BLOCK=block, ONE_BLOCK=one_block, num_warps=_warps(block, "bwd"),
        )
    dw, db = _summed(buffer, weight, bias, (want_dw, want_db))
    return dx, dw, db


# ---------------------------------------------------------------------------
# GroupNorm (and InstanceNorm, G = C): (N, C, *spatial), contiguous or channels-last.
# ---------------------------------------------------------------------------


@triton.jit
def _group_tile(c0, l0, cpg, L, stride_c, stride_l, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """(offsets, mask, channel index within the group) of one [BLOCK_C, BLOCK_L] tile of a
    group: element (c, l) sits at c * stride_c + l * stride_l, which covers contiguous
    (stride_c = L, stride_l = 1) and channels-last (stride_c = 1, stride_l = C) alike."""
    cs = c0 + tl.arange(0, BLOCK_C)[:, None]
    ls = l0 + tl.arange(0, BLOCK_L)[None, :]
    return cs * stride_c + ls * stride_l, (cs < cpg) & (ls < L), cs


@triton.jit
def _group_norm_fwd_kernel(
    X, W, B, Y, MEAN, VAR,
    L, cpg, stride_n, stride_c, stride_l, groups, eps, eps_lo,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One (sample, group) per program: its mean and variance (two passes, the second
    over x - mean), then y = (x - mean) * rstd * w_c + b_c."""
    pid = tl.program_id(0).to(tl.int64)
    g = pid % groups
    base = (pid // groups) * stride_n + g * cpg * stride_c
    X += base
    Y += base
    count = cpg * L
    total = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
    for c0 in range(0, cpg, BLOCK_C):
        for l0 in range(0, L, BLOCK_L):
            at, mask, _ = _group_tile(c0, l0, cpg, L, stride_c, stride_l, BLOCK_C, BLOCK_L)
            total += tl.load(X + at, mask=mask, other=0.0).to(ACC)
    mean = tl.sum(tl.sum(total, axis=1), axis=0) / count
    total = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
    for c0 in range(0, cpg, BLOCK_C):
        for l0 in range(0, L, BLOCK_L):
            at, mask, _ = _group_tile(c0, l0, cpg, L, stride_c, stride_l, BLOCK_C, BLOCK_L)
            centred = tl.where(mask, tl.load(X + at, mask=mask, other=0.0).to(ACC) - mean, 0.0)
            total += centred * centred
    var = tl.sum(tl.sum(total, axis=1), axis=0) / count
    rstd = _rsqrt(var + _widened(eps, eps_lo, ACC), ACC)
    for c0 in range(0, cpg, BLOCK_C):
        for l0 in range(0, L, BLOCK_L):
            at, mask, cs = _group_tile(c0, l0, cpg, L, stride_c, stride_l, BLOCK_C, BLOCK_L)
            y = (tl.load(X + at, mask=mask, other=0.0).to(ACC) - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + g * cpg + cs, mask=cs < cpg, other=0.0).to(ACC)
            if HAS_B:
                y = y + tl.load(B + g * cpg + cs, mask=cs < cpg, other=0.0).to(ACC)
            tl.store(Y + at, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + pid, mean)
    tl.store(VAR + pid, var)


@triton.jit
def _group_norm_bwd_kernel(
    DY, X, W, MEAN, VAR, DX, DW_PART, DB_PART,
    L, cpg, stride_n, stride_c, stride_l, groups, C, eps, eps_lo,
    HAS_W: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One (sample, group) per program: with g = dy * w_c, dx = rstd * (g - mean(g) - xhat
    * mean(g * xhat)) over the group; the sample's dw_c and db_c terms into its partial
    row (N, C), added over samples afterwards."""
    pid = tl.program_id(0).to(tl.int64)
    grp = pid % groups
    n = pid // groups
    base = n * stride_n + grp * cpg * stride_c
    mean = tl.load(MEAN + pid)
    rstd = _rsqrt(tl.load(VAR + pid) + _widened(eps, eps_lo, ACC), ACC)
    count = cpg * L
    s_gx = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
    s_g = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
    for c0 in range(0, cpg, BLOCK_C):
        dw = tl.zeros([BLOCK_C], dtype=ACC)
        db = tl.zeros([BLOCK_C], dtype=ACC)
        for l0 in range(0, L, BLOCK_L):
            at, mask, cs = _group_tile(c0, l0, cpg, L, stride_c, stride_l, BLOCK_C, BLOCK_L)
            xhat = tl.where(mask, (tl.load(X + base + at, mask=mask, other=0.0).to(ACC) - mean) * rstd, 0.0)
            dy = tl.load(DY + base + at, mask=mask, other=0.0).to(ACC)
            g = dy
            if HAS_W:
                g = dy * tl.load(W + grp * cpg + cs, mask=cs < cpg, other=0.0).to(ACC)
            s_gx += g * xhat
            s_g += g
            dw += tl.sum(dy * xhat, axis=1)
            db += tl.sum(dy, axis=1)
        channels = grp * cpg + c0 + tl.arange(0, BLOCK_C)
        in_group = c0 + tl.arange(0, BLOCK_C) < cpg
        if WANT_DW:
            tl.store(DW_PART + n * C + channels, dw, mask=in_group)
        if WANT_DB:
            tl.store(DB_PART + n * C + channels, db, mask=in_group)
    c_gx = tl.sum(tl.sum(s_gx, axis=1), axis=0) / count
    c_g = tl.sum(tl.sum(s_g, axis=1), axis=0) / count
    for c0 in range(0, cpg, BLOCK_C):
        for l0 in range(0, L, BLOCK_L):
            at, mask, cs = _group_tile(c0, l0, cpg, L, stride_c, stride_l, BLOCK_C, BLOCK_L)
            xhat = (tl.load(X + base + at, mask=mask, other=0.0).to(ACC) - mean) * rstd
            g = tl.load(DY + base + at, mask=mask, other=0.0).to(ACC)
            if HAS_W:
                g = g * tl.load(W + grp * cpg + cs, mask=cs < cpg, other=0.0).to(ACC)
            dx = (g - c_g - xhat * c_gx) * rstd
            tl.store(DX + base + at, dx.to(DX.dtype.element_ty), mask=mask)


_GROUP_TILE = 4096  # values of a group's tile: BLOCK_C * BLOCK_L


def _group_layout(x: torch.Tensor, num_groups: int):
    """(x, geometry, tile) for the GroupNorm kernels: x contiguous or channels-last as it
    is, any other striding made contiguous; geometry = (L, channels per group, stride_n,
    stride_c, stride_l), the spatial dims flattened with one stride; tile = (BLOCK_C,
    BLOCK_L), at most ``_GROUP_TILE`` values."""
    contiguous = memory_format(x) is torch.contiguous_format
    if contiguous:
        x = x.contiguous()
    length, cpg = max(1, math.prod(x.shape[2:])), x.shape[1] // num_groups
    stride_c, stride_l = (length, 1) if contiguous else (1, x.shape[1])
    block_c = min(_next_power_of_2(cpg), 64)
    block_l = max(1, min(_next_power_of_2(length), _GROUP_TILE // block_c))
    return x, (length, cpg, x.stride(0), stride_c, stride_l), (block_c, block_l)


def group_norm_forward(x, weight, bias, num_groups, eps):
    _check_device(x, weight, bias)
    x, geometry, (block_c, block_l) = _group_layout(x, num_groups)
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x)  # x's memory format
    mean = torch.empty(x.shape[0], num_groups, dtype=acc, device=x.device)
    var = torch.empty_like(mean)
    if x.numel():
        _launch(_group_norm_fwd_kernel)[(x.shape[0] * num_groups,)](
            x, _operand(weight, x), _operand(bias, x),
            y, mean, var, *geometry, num_groups, *_split(eps),
            HAS_W=weight is not None, HAS_B=bias is not None, ACC=_tl_acc(x.dtype),
            BLOCK_C=block_c, BLOCK_L=block_l,
        )
    return y, mean, var


def group_norm_backward(dy, x, weight, mean, var, num_groups, eps, bias):
    _check_device(dy, x, weight)
    x, geometry, (block_c, block_l) = _group_layout(x, num_groups)
    dy = dy.contiguous(memory_format=memory_format(x))
    n, c = x.shape[:2]
    dx = torch.empty_like(x)
    wanted = (weight is not None, bias is not None)
    # every (sample, group) program writes its channels of its sample's row
    buffer, (dw_part, db_part) = _partials(wanted, n, c, x, zeroed=not x.numel())
    if x.numel():
        _launch(_group_norm_bwd_kernel)[(n * num_groups,)](
            dy, x, _operand(weight, x), mean.contiguous(), var.contiguous(), dx,
            _operand(dw_part, mean), _operand(db_part, mean),
            *geometry, num_groups, c, *_split(eps),
            HAS_W=weight is not None, WANT_DW=dw_part is not None, WANT_DB=db_part is not None,
            ACC=_tl_acc(x.dtype), BLOCK_C=block_c, BLOCK_L=block_l,
        )
    dw, db = _summed(buffer, weight, bias, wanted)
    return dx, dw, db


# ---------------------------------------------------------------------------
# DyT (Zhu et al., 2025): y = w * tanh(alpha * x) + b, alpha a scalar.
# ---------------------------------------------------------------------------


@triton.jit
def _tanh(v):
    """tanh from exp, for any sign without overflow: sign(v) * (1 - e) / (1 + e), e = exp(-2|v|)."""
    e = tl.exp(-2.0 * tl.abs(v))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(v < 0, -t, t)


@triton.jit
def _dyt_fwd_kernel(X, ALPHA, W, B, Y, D, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    alpha = tl.load(ALPHA).to(ACC)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        y = _tanh(alpha * tl.load(X + row * D + cols, mask=mask, other=0.0).to(ACC))
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(ACC)
        tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _dyt_bwd_kernel(DY, X, ALPHA, W, DX, PART, N, D, rows_per_program,
                    HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Rows [pid * rows_per_program, ...): dx = dy * w * alpha * (1 - t^2); the program's
    terms of dw (dy * t), db (dy) and dalpha (dy * w * x * (1 - t^2)) per column into
    PART[0..2, pid], added over programs afterwards."""
    pid = tl.program_id(0).to(tl.int64)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, N)
    alpha = tl.load(ALPHA).to(ACC)
    programs = tl.num_programs(0)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        w = tl.load(W + cols, mask=mask, other=0.0).to(ACC) if HAS_W else 1.0
        dw = tl.zeros([BLOCK], dtype=ACC)
        db = tl.zeros([BLOCK], dtype=ACC)
        da = tl.zeros([BLOCK], dtype=ACC)
        for row in range(first, last):
            x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(ACC)
            t = _tanh(alpha * x)
            dpre = dy * w * (1.0 - t * t)
            tl.store(DX + row * D + cols, (dpre * alpha).to(DX.dtype.element_ty), mask=mask)
            dw += dy * t
            db += dy
            da += dpre * x
        tl.store(PART + pid * D + cols, dw, mask=mask)
        tl.store(PART + (programs + pid) * D + cols, db, mask=mask)
        tl.store(PART + (2 * programs + pid) * D + cols, da, mask=mask)


def dyt_forward(x, alpha, weight, bias):
    _check_device(x, alpha, weight, bias)
    x = x.contiguous()
    n, d = x.shape
    y = torch.empty_like(x)
    if x.numel():
        _launch(_dyt_fwd_kernel)[(n,)](
            x, alpha.reshape(1), _operand(weight, x), _operand(bias, x), y, d,
            HAS_W=weight is not None, HAS_B=bias is not None, ACC=_tl_acc(x.dtype),
            BLOCK=_block(d)[0],
        )
    return y


def dyt_backward(dy, x, alpha, weight, bias):
    _check_device(dy, x, alpha, weight)
    x, dy = x.contiguous(), dy.contiguous()
    n, d = x.shape
    acc = acc_dtype(x.dtype)
    programs = _programs(n, x.device, _block(d)[0])
    dx = torch.empty_like(x)
    part = torch.zeros(3, programs, d, dtype=acc, device=x.device)
    if x.numel():
        _launch(_dyt_bwd_kernel)[(programs,)](
            dy, x, alpha.reshape(1), _operand(weight, x), dx, part,
            n, d, _cdiv(n, programs),
            HAS_W=weight is not None, ACC=_tl_acc(x.dtype), BLOCK=_block(d)[0],
        )
    sums = part.sum(1, dtype=torch.float64)  # (3, d): over programs, in a fixed order
    dalpha = sums[2].sum().reshape(alpha.shape).to(alpha.dtype)
    dw = None if weight is None else sums[0].to(weight.dtype)
    db = None if bias is None else sums[1].to(bias.dtype)
    return dx, dalpha, dw, db
