"""The functional API: ``torch.nn.functional``'s argument order and defaults.

Every function checks its arguments here, once, before any kernel runs, and raises an
error that names the argument and what was expected; nothing is modified when it
raises.  Then it picks a backend (``addnorm.backend``) and calls the op.

Where forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``) sees the
tensors, or inside another ``torch.func`` transform (``vmap``, ``grad``, ``jacfwd``), the
custom ops cannot follow (they have a backward formula only), so the same math runs from
``reference`` as plain differentiable torch ops: tangents and batching are torch's own.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from . import _backend, ops, reference
from ._backend import _DEFAULT  # (retire updates it in place)
from .reference import rms_eps, update_running_stats

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm",
    "instance_norm",
    "group_norm",
    "dyt",
    "scale_norm",
]

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCED = (torch.float16, torch.bfloat16)
_GN_RULED = (torch.float32, *_REDUCED)  # the dtypes ``_group_norm_rule`` decides for
_ROW_DTYPES = frozenset(_FLOATING)  # (a set: one hash where a tuple compares four)
_TENSORS = (Tensor, torch.nn.Parameter)  # the types ``_check_param``'s fast path takes
_NUMBERS = (float, numbers.Real, torch.SymInt, torch.SymFloat)  # a float argument as torch takes it (float first: the common one, no ABC check)


# ---------------------------------------------------------------------------
# Argument checks.
# ---------------------------------------------------------------------------


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value or shape.  A ``ValueError``, and a ``RuntimeError`` too,
    because that is what torch.nn raises for the same mistakes: code written against torch
    that catches ``RuntimeError`` catches this."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype (torch raises ``RuntimeError`` for a wrong
    dtype); a ``TypeError`` and a ``RuntimeError``."""


def _check_input(t: object, name: str = "input") -> None:
    if not isinstance(t, Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATING:
        raise ArgumentTypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got {t.dtype}"
        )


def _check_float(value: float, name: str) -> None:
    """A float argument (eps, momentum) as torch's kernels take one: any number, or a
    0-dim tensor's value.  eps may be negative or NaN there too: rstd = 1 / sqrt(var +
    eps) is NaN where var + eps < 0 (torch.nn's own tests pass eps=-0.5).  The modules'
    ``momentum=None``, a cumulative average, is each module's own business."""
    if not (isinstance(value, _NUMBERS) or (isinstance(value, Tensor) and value.ndim == 0)):
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ArgumentTypeError(f"{name} must be a float or a 0-dim tensor, got {got}")


def _check_param(
    t: Tensor | None, name: str, shape: tuple[int, ...], input: Tensor, why: str = ""
) -> None:
    """A parameter or statistic: the given shape, input's device, and input's dtype
    (or float32 beside float16/bfloat16 input: the mixed precision torch accepts)."""
    if t is None:
        return
    if type(t) in _TENSORS and t.dtype is input.dtype and t.shape == shape and t.is_cpu and input.is_cpu:
        return  # the common case, checked in a fraction of the general check's time
    if not isinstance(t, Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != shape:
        raise ArgumentError(f"{name} must have shape {shape}{why}, got {tuple(t.shape)}")
    if t.dtype is not input.dtype and (t.dtype is not torch.float32 or input.dtype not in _REDUCED):
        allowed = (input.dtype, torch.float32) if input.dtype in _REDUCED else (input.dtype,)
        expected = " or ".join(str(d) for d in allowed)
        raise ArgumentTypeError(f"{name} must have dtype {expected} (input is {input.dtype}), got {t.dtype}")
    if t.device != input.device:
        raise ArgumentError(f"{name} must be on input's device {input.device}, got {t.device}")


def _check_one_element(t: object, name: str, input: Tensor) -> None:
    if not isinstance(t, Tensor) or t.numel() != 1:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ArgumentError(f"{name} must be a one-element tensor, got {got}")
    _check_param(t, name, tuple(t.shape), input)


def _check_same(t: object, name: str, x: Tensor) -> None:
    """The second operand of an add-norm: exactly x's shape, dtype and device."""
    if type(t) is Tensor and t.dtype is x.dtype and t.shape == x.shape and t.is_cpu and x.is_cpu:
        return  # the common case, checked in a fraction of the general check's time
    _check_input(t, name)
    if t.shape != x.shape:
        raise ArgumentError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype or t.device != x.device:
        raise ArgumentTypeError(
            f"{name} must have x's dtype {x.dtype} on {x.device}, got {t.dtype} on {t.device}"
        )


def _casting(casting_mode: str) -> int:
    """RMSNorm's ``casting_mode`` name as the kernels' ``cast``."""
    cast = reference.CASTING_MODES.get(casting_mode) if isinstance(casting_mode, str) else None
    if cast is None:
        raise ArgumentError(
            f"casting_mode must be one of {', '.join(map(repr, reference.CASTING_MODES))}, got {casting_mode!r}"
        )
    return cast


def _normalized_shape(normalized_shape: int | Sequence[int], input: Tensor) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) == 1 and type(shape[0]) is int and input.ndim and input.shape[-1] == shape[0] > 0:
        return shape  # the common case, checked in a fraction of the general check's time
    if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ArgumentError(
            f"normalized_shape must be a positive int or a non-empty sequence of them, "
            f"got {normalized_shape!r}"
        )
    if input.ndim < len(shape) or tuple(input.shape[input.ndim - len(shape) :]) != shape:
        raise ArgumentError(
            f"normalized_shape {shape} must match the trailing dims of input, "
            f"whose shape is {tuple(input.shape)}"
        )
    return shape


def _check_channels(input: Tensor, what: str) -> int:
    if input.ndim < 2:
        raise ArgumentError(
            f"{what} expects input of shape (N, C, *), got shape {tuple(input.shape)}"
        )
    return input.shape[1]


_STATS_AND_AFFINE = ("running_mean", "running_var", "weight", "bias")


def _check_per_channel(input: Tensor, c: int, *tensors: Tensor | None) -> None:
    """The per-channel tensors of a channel norm, each None or of shape (c,): (weight,
    bias), or (running_mean, running_var, weight, bias), the running statistics given
    together or not at all."""
    # the common call (tensors of input's dtype on the CPU) in one pass over them, ~0.5 µs:
    # the general checks cost ~2 µs, as much as a small BatchNorm's kernel
    if input.is_cpu:
        dtype, shape, tensor_types = input.dtype, (c,), _TENSORS
        for t in tensors:
            if t is not None and not (type(t) in tensor_types and t.dtype is dtype and t.is_cpu and t.shape == shape):
                break
        else:
            if len(tensors) == 2 or (tensors[0] is None) is (tensors[1] is None):
                return
    names = _STATS_AND_AFFINE[-len(tensors):]
    why = f" (one value per channel of input, input.shape[1] = {c})"
    for name, t in zip(names, tensors):
        _check_param(t, name, (c,), input, why)
    if len(tensors) == 4 and (tensors[0] is None) != (tensors[1] is None):
        raise ArgumentError("running_mean and running_var must be given together or both be None")


def _foreign(*tensors: Tensor | None) -> bool:
    """Whether one of ``tensors`` is of a class that dispatches its ops in Python
    (``__torch_dispatch__``): DTensor (tensor parallelism), a nested jagged tensor,
    quantized and logging tensors.  No kernel of ours can read such a tensor's data (it
    may have none: a DTensor's is its local shard), and its class knows no addnorm op,
    so the call runs the reference's torch ops on it, as torch.nn's norms run torch's,
    which the class implements.  torch's own tracing tensors (fake and functional)
    under their dispatch mode are not foreign: the op's fake implementation serves them."""
    for t in tensors:
        if type(t) in _PLAIN or type(t).__torch_dispatch__ is _NO_DISPATCH:
            continue
        if not (isinstance(t, _TRACING) and _len_dispatch_stack()):
            return True
    return False


_PLAIN = (*_TENSORS, type(None))  # (and an absent tensor)
_NO_DISPATCH = Tensor.__torch_dispatch__
_TRACING = (FakeTensor, FunctionalTensor)


def _transformed(args: tuple) -> bool:
    """Whether a torch.func transform is active, ``torch.jit.trace`` records, or
    forward-mode AD sees a tensor in ``args``; for a caller that has already found
    torch.compile not tracing (torch.compile traces through neither: there the op is
    always what it sees).  Inside a transform every call runs the reference's torch ops,
    also on tensors the transform does not wrap (a model's Parameters, closed over): the
    ops' ``autograd.Function`` has no ``setup_context``, so torch refuses it under any
    transform.  The JIT tracer sees only torch ops (a kernel's sizes reach it as traced
    tensors, and nothing a numba kernel writes is recorded), so a traced model holds the
    reference's plain torch ops and runs, and saves, without addnorm."""
    if _functorch_level() is not None or _jit_tracing() is not None:
        return True
    if forward_ad._current_level < 0:  # the common case: no dual level is open
        return False
    return any(isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in args)


_functorch_level = torch._C._functorch.maybe_current_level
_jit_tracing = torch._C._get_tracing_state


def _forward(op, math, *args):
    """``op(*args, backend)``, with the backend for the device of the input ``args[0]``,
    or ``math(*args)`` (its reference) where ``op`` is None (a ``_foreign`` tensor), a
    transform watches (``_transformed``) or torch.compile traces a small input
    (``_inlined``)."""
    if op is None:
        return math(*args)
    if _is_compiling():
        if _inlined(args[0]):
            return math(*args)
    elif _transformed(args):
        return math(*args)
    # ``_backend.select``, inlined: on every call, and a CPU tensor's ``.device`` object
    # alone costs ~0.6 µs in this path
    x = args[0]
    return op(*args, _Choice.forced or _DEFAULT.get("cpu" if x.is_cpu else x.device.type, "torch"))


def _inlined(x: Tensor) -> bool:
    """Under torch.compile (and export), an input below ``_NATIVE_BELOW["compiled"]``
    elements, with the backend left to addnorm, traces as the reference's torch ops, not as
    the custom op: inductor then fuses the norm with its neighbours (the residual add
    before it, the projection's epilogue after), which it cannot do across an opaque op,
    and the call skips the op's dispatch (~14 µs).  Above the bound our kernel's speed
    outweighs the fusion.  The channel norms trace as their torch.nn.functional twin
    there (``_native``'s twins): inductor's own lowering of those keeps channels-last
    layouts, where the reference's group reshapes would copy.  An input whose size is
    symbolic (``dynamic=True``, export's ``Dim``) traces as torch ops too: comparing it
    with the bound would guard the traced graph to one side of it (export refused a
    dynamic batch without a maximum), and torch ops serve every size."""
    if not torch.compiler.is_compiling() or _backend.forced():
        return False
    n = x.numel()
    return type(n) is not int or n < _NATIVE_BELOW["compiled"]


# Torch's own kernel where it is the faster one.  The rule: in plain eager execution
# (torch.compile and export always see addnorm's op), with the backend left to addnorm
# (``with addnorm.backend("numba")`` runs our kernels everywhere), a norm whose
# torch.nn.functional twin computes the same function runs that twin when its input has
# fewer elements than the bound below: there torch's C++ kernel, running from cache,
# beats our fixed per-call cost (argument conversion, numba dispatch, threads).  The
# fused add+LayerNorm runs torch's add and LayerNorm there (the same r, rounded in x's
# dtype, and the same y).  The bounds are crossovers measured with ``addnorm bench
# --sweep``.  A twin is called before our argument checks, which cost more than torch's
# whole Python wrapper (~1.9 µs for BatchNorm's four per-channel tensors): torch
# validates in C++ and changes nothing when it refuses, and a refused call falls
# through to our checks, which say why.  Only what torch's kernel would take and our
# checks (or torch.nn.functional's own) refuse is tested before it, in each function.
#
# LayerNorm's bound is by dtype: in float16/bfloat16 ours runs from 1M elements (1.0x-1.6x
# torch's in every pass at 1M-8M; at 512K 0.9x-1.15x) and the fused add+LayerNorm from
# 512K (one pass less than torch's add then LayerNorm: 1.0x-1.3x at 512K, 0.87x-1.1x at
# 256K); in float32/float64 both from 8M (between, torch's float32 kernel and ours are
# even, 0.5x-1.3x by cell).  From there on our Python path runs, our backward kernel
# included.  Below, our forward kernel runs on the C++ eager path (``ops.layer_norm_cpp``,
# below 32 MB; what it turns down, torch's kernel), which costs ~1 µs less a call than
# torch's wrapper and kernel and shares rows out to torch's threads from 16K elements:
# where autograd records nothing (no_grad, inference_mode: decoding, serving) 1.1x-1.3x
# torch's at 1-16K elements, 1.0x-1.6x from 16K to 2M (float32 at 4M-8M 0.97x-1.0x,
# where both stream from memory), add+LayerNorm 1.2x-2.1x; where it records the graph,
# the path's node calls torch's own backward kernel (``at::native_layer_norm_backward``,
# given our statistics, as torch's node is given its own), so that a forward+backward
# costs our forward and torch's backward: the forward recording its graph 1.0x-1.4x
# torch's, forward+backward 1.0x-1.3x (2-core Intel Xeon).  (Our backward kernel behind
# that node would need a C entry with its variants to compile; through Python it was
# ~10 µs behind torch's at (1, 64).)  ``_float_twin``
# reads the dtype only for inputs at or above the first bound, so a small call pays
# nothing for it.  A bias alone: LayerNorm takes torch's kernel only where torch can also
# differentiate the call (``weight is not None or bias is None or bias.dtype is
# input.dtype``, inline in ``layer_norm`` and ``add_layer_norm``, the dtype read by getattr:
# a bias that is no tensor goes on to our checks; a call costs ~0.1 µs, a tenth of a small
# call's checks); its CPU backward fails ("expected scalar type BFloat16 but found Float") for a
# bias without a weight in another dtype than a float16/bfloat16 input's, ours computes it.
#
# RMSNorm has a twin, ``torch.rms_norm``, but always runs ours: without autograd ours is
# faster at every size, and with it the two now cost the same forward below 16K elements
# (our autograd.Function against torch's C++ nodes) while our backward is 1.3-1.6x
# faster; the rule's checks on top of torch's kernel made that path 0.9x.  DyT and
# ScaleNorm have no twin.
#
# The channel norms' bounds depend on where torch's CPU kernel is slow (2 cores, the
# CNN and UNet shapes and 12.8M-element ones, each pass, against our kernel forced;
# ``_channel_rule`` picks the key): InstanceNorm (torch's runs its BatchNorm kernel on an
# (1, N*C, *) view, ~30 µs at the smallest shapes) is faster on ours from 2K elements in
# every dtype and layout (1.1x-1.9x in every pass at 2K-4K, 1.4x-10x from 64K; at 256-400
# elements 0.9x-1.6x); BatchNorm in training on a contiguous float32/float64 input from
# 128K elements (1.2x-6x in every pass; at 64K the forward 2x, forward+backward 0.87x;
# torch's kernel: 6.3 ms at 32x64x56x56 float32, where its bfloat16 one takes 1.2).  In
# float32/float64 both only where each (sample, channel) has 48 values or more (a
# ResNet's last 7x7 and up): over fewer ours falls behind (BatchNorm1d's (N, C), one value
# each, 0.05x-0.12x; InstanceNorm over 4 values 0.6x-0.98x, over 16 1.0x forward+backward);
# a float16/bfloat16 InstanceNorm over 4 values is 2.5x-3.5x faster on ours.  Every other
# BatchNorm (eval; channels-last; float16/bfloat16) runs torch's kernel at every size
# measured (ours 0.4x-1.4x, mixed; 12.8M elements included).
#
# GroupNorm on a channels-last input (``_group_norm_rule``): torch's CPU kernel loops over
# the D = C / G channels of a group in one spatial position with vector loads, and where
# they do not cover D (float16/bfloat16: D not a multiple of 16; float32: D < 8), it pays
# ~15 ns per (sample, group, position), against our ~0.2-0.4 ns per value (float32 D of
# 10, 12 or 20, not a multiple of 8, costs it less: ours is 1.0x-3.7x faster in every
# pass from 2^14 positions below 1024 spatial positions, 0.8x-1.2x at 2^13; D of 8,
# 16, 24, 40 or 48 0.6x-2.7x, mixed, so torch's).  Its forward
# does so below 1024 spatial positions (above, it splits the work by position and is
# 1.4x-3x faster than ours); its backward at every spatial size.  Measured against each
# other per pass (bfloat16, G = 32): forward 2x1280x16x16 (D = 40) ours 1.8x, 32x64x14x14
# (D = 2) 23x; backward 2x320x64x64 (D = 10) 6.2x, 32x64x64x64 26x; at D = 16 torch's is
# 1.1x-5x faster.  So where D is one of those, from 2^12 positions in float16/bfloat16
# (1.2x-3x in every pass at 2^12; 0.8x-2x at 2^11) and 2^13 in float32 (2^14 where
# autograd records the graph: at 2^13 forward+backward 0.9x, at 2^14 1.1x-2.7x in every
# pass), ours runs both passes below 1024 spatial
# positions ("group_norm_ours"); above, torch's forward with our backward where autograd
# records the graph ("group_norm_torch_forward"), and torch's kernel where it does not;
# but float16/bfloat16 recording a graph run ours at every spatial size: there our forward
# kernel (half outputs as x * scale + shift, bfloat16 stores without the NaN select where
# the statistics are finite) is 1.0x-1.5x torch's at 1024-16384 spatial positions (2-32
# samples; 0.94x-1.0x at 4x320x64x64, where both stream from memory), and the path skips
# the float32 parameter copies torch's forward is given (``ops._group_norm_fwd_aten``).
# From 8M elements ours runs, but one sample (a VAE decoder's 1x128x512x512) keeps torch's
# forward, where ours runs 0.6x-1.0x, and torch's backward but where it is slow as above
# ("group_norm_torch").  A contiguous float16 GroupNorm runs ours from 2^16 elements
# ("group_norm_float16"): torch's float16 kernel takes ~1 ns a value in both passes where
# its bfloat16 one takes ~0.35 and ours ~0.3 (ours 1.3x-1.7x in every pass at 2^16,
# 1.5x-4.9x from 2^17 to 2x320x64x64's 2.6M elements; at 2^15 0.9x-1.1x); a contiguous
# bfloat16 one where autograd records nothing from 2^20 ("group_norm_bfloat16": ours
# 1.08x-1.17x from 1M to 2.6M elements, 1.04x at 2^19, 0.74x-0.91x at 2^17-2^18);
# a contiguous float32 one, and bfloat16 recording a graph, where ours is 0.7x-1.3x
# (mixed), and everything else below 8M elements (float64) runs torch's kernel.
_EVERY_SIZE = 1 << 62
_NATIVE_BELOW = {
    "layer_norm": 1 << 20,  # every dtype; float32/float64 up to "layer_norm_float"
    "layer_norm_float": 1 << 23,
    "add_layer_norm": 1 << 19,  # the same for add+LayerNorm
    "add_layer_norm_float": 1 << 23,
    "group_norm": 1 << 23,
    "group_norm_float16": 1 << 16,  # contiguous float16, where torch's kernel is slow
    "group_norm_bfloat16": 1 << 20,  # contiguous bfloat16 where autograd records nothing
    "group_norm_ours": 0,  # channels-last, where torch's kernel is slow: ``_group_norm_rule``
    "group_norm_torch_forward": 0,  # the same, with torch's forward where only its backward is
    "group_norm_torch": _EVERY_SIZE,  # channels-last, one sample, 8M elements and more
    "instance_norm": 1 << 11,
    "instance_norm_short": _EVERY_SIZE,  # float32/float64, fewer than 48 values per (sample, channel)
    "batch_norm_train": 1 << 17,  # training, contiguous float32/float64
    "batch_norm": _EVERY_SIZE,  # every other BatchNorm
    "compiled": 1 << 22,  # every norm under torch.compile: see ``_inlined``
}
_SHORT_RUNS = 48  # values per (sample, channel) below which BatchNorm and float32/float64 InstanceNorm keep torch's kernel
_TORCH_GN_SPLIT = 1024  # spatial size from which torch's channels-last GroupNorm forward is the fast one
# Off the CPU the twin runs at every size where the device's default backend has no
# kernel of its own for the norm, so that ours would be the reference's chain of torch
# ops: BatchNorm beside the triton backend (the twin is cuDNN's on CUDA), and every norm
# where the default is the reference (a GPU without Triton, any other device).
_TWIN_OFF_CPU = {
    "triton": ("batch_norm", "batch_norm_train"),
    "torch": tuple(op for op in _NATIVE_BELOW if op != "compiled"),
}


def _channel_rule(input: Tensor, instance: bool) -> str:
    """``_NATIVE_BELOW``'s key for an InstanceNorm (``instance``) or a training BatchNorm
    call, by dtype, layout and values per (sample, channel) (the comment above it); an
    eval BatchNorm's is "batch_norm".  Anything but a tensor of 3 or more dims gets a key
    of every size: ``_native`` turns down what is no tensor, and torch's kernel takes or
    refuses the rest."""
    if type(input) is not Tensor or input.ndim < 3:
        return "instance_norm_short" if instance else "batch_norm"
    s = input.shape
    half = input.dtype in _REDUCED
    if instance:
        short = not half and input.numel() < _SHORT_RUNS * s[0] * s[1]
        return "instance_norm_short" if short else "instance_norm"
    if half or input.numel() < _SHORT_RUNS * s[0] * s[1]:
        return "batch_norm"
    return "batch_norm_train" if input.is_contiguous() else "batch_norm"


def _group_norm_rule(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None) -> str:
    """``_NATIVE_BELOW``'s key for a float32/float16/bfloat16 GroupNorm call; channels-last:
    where torch's CPU kernel is slow, by the values per group in one spatial
    position (D = C / num_groups), the spatial size, the positions (sample, group,
    spatial) and whether autograd records the graph (the comment above ``_EVERY_SIZE``).
    What torch's kernel would refuse gets "group_norm": the twin (or our checks) says why.
    A contiguous call is decided by its dtype and, in bfloat16, whether autograd records."""
    if input.is_contiguous():
        if input.dtype is torch.float16:
            return "group_norm_float16"
        if input.dtype is torch.bfloat16 and not _records_group_norm(input, weight, bias):
            return "group_norm_bfloat16"
        return "group_norm"
    s = input.shape
    if len(s) < 3 or type(num_groups) is not int or num_groups <= 0 or s[1] % num_groups or not s[1]:
        return "group_norm"
    n, d = s[0], s[1] // num_groups
    half = input.dtype in _REDUCED
    numel = input.numel()
    positions = numel // d  # (sample, group, spatial position)s
    # the cheap exits first: a small call pays only these (~0.4 µs)
    if numel < _NATIVE_BELOW["group_norm"]:
        # where torch's vector loops do not cover D: float16/bfloat16 D % 16; float32
        # D < 8, and other D % 8 from 2^14 positions below 1024 spatial positions
        slow = d % 16 if half else d < 8 or (
            d % 8 and positions >= 1 << 14 and positions // num_groups // n < _TORCH_GN_SPLIT
        )
        if positions < (1 << 12 if half else 1 << 13) or not slow:
            return "group_norm"
    elif n > 1:
        return "group_norm"
    if ops.memory_format(input) is torch.contiguous_format:  # other strides: both copy to it
        return "group_norm"
    recorded = _records_group_norm(input, weight, bias)
    if numel >= _NATIVE_BELOW["group_norm"]:
        # one sample: torch's forward (ours 0.6x-1.0x at 1x128x256x256 .. 1x512x256x256),
        # our backward where torch's is slow
        return "group_norm_torch_forward" if recorded and half and d % 16 else "group_norm_torch"
    spatial = positions // num_groups // n
    if recorded:
        if half:
            return "group_norm_ours"
        if positions >= 1 << 14:
            return "group_norm_ours" if spatial < _TORCH_GN_SPLIT else "group_norm_torch_forward"
        return "group_norm"
    return "group_norm_ours" if spatial < _TORCH_GN_SPLIT else "group_norm"


def _records_group_norm(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether autograd records a GroupNorm of these (getattr: what is no tensor goes on
    to the checks, which say so)."""
    return torch.is_grad_enabled() and (
        input.requires_grad or getattr(weight, "requires_grad", False) or getattr(bias, "requires_grad", False)
    )


def _parameter_grads_only(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether autograd records a GroupNorm on a non-contiguous 4D/5D CPU input that
    needs no gradient while its weight or bias does (a frozen trunk under trainable
    norms, a UNet's first block), for a call that would run torch's twin (input is a
    plain tensor): torch 2.13's CPU backward, asked for the parameters' gradients alone,
    crashes the process there (a segmentation fault, channels-last or permuted input,
    every dtype), so torch's forward runs with our backward."""
    return (
        not input.requires_grad
        and (getattr(weight, "requires_grad", False) or getattr(bias, "requires_grad", False))
        and torch.is_grad_enabled()
        and input.ndim in (4, 5)
        and not input.is_contiguous()
        and input.is_cpu
    )


def _native(op: str, input: Tensor, params: tuple) -> bool:
    """Whether ``op`` on ``input`` and the tensors (or Nones) ``params`` runs torch's twin
    (the rule above); cheap: it runs first on every call."""
    # ~0.3 µs: torch.nn.functional's own wrapper around the same kernel costs ~0.45, and
    # every cell that runs torch's kernel pays this on top, so no call here that can be
    # a C call or an attribute read (params come as one tuple: no *args to pack).
    # ``is_dynamo_compiling`` (one call) rather than ``is_compiling`` (two): what it
    # misses, export's non-strict tracing, traces fake tensors under a dispatch mode,
    # turned down below by the type and dispatch-stack checks
    return (
        not _is_dynamo_compiling()  # first: dynamo folds it and traces none of the rest
        and type(input) is Tensor
        and (
            0 < input.numel() < _NATIVE_BELOW[op] or _float_twin(op, input)
            if input.is_cpu
            else _twin_off_cpu(op, input)
        )
        and _Choice.forced is None  # the backend is left to addnorm
        # is_compiling is checked above; input is a plain Tensor: params and modes are left
        # (``ops._traced``, inlined)
        and not _len_dispatch_stack()
        and not _has_torch_function(params)
    )


def _float_twin(op: str, input: Tensor) -> bool:
    """``_native``'s bound for a CPU input that ``op``'s own bound turned down: a
    float32/float64 LayerNorm (or add+LayerNorm) keeps torch's kernel up to its
    "_float" bound."""
    key = _FLOAT_BOUND.get(op)
    return key is not None and input.dtype not in _REDUCED and 0 < input.numel() < _NATIVE_BELOW[key]


_FLOAT_BOUND = {"layer_norm": "layer_norm_float", "add_layer_norm": "add_layer_norm_float"}


def _twin_off_cpu(op: str, input: Tensor) -> bool:
    """``_native``'s bound for a tensor off the CPU: ``_TWIN_OFF_CPU`` (by the device's
    backend; ``_native`` itself turns the twin down where the user forced one)."""
    return input.numel() > 0 and op in _TWIN_OFF_CPU.get(_backend.select(input.device), ())


def _numba_eager(args: tuple) -> bool:
    """Whether a CPU call of these arguments (input, then parameters) is plain eager
    execution on the numba backend, addnorm's choice: ``_forward``'s and ``ops._traced``'s
    checks together, for a caller that goes to an op's C++ eager path itself."""
    return (
        _Choice.forced is None
        and _DEFAULT.get("cpu") == "numba"
        and not _is_compiling()
        and not _transformed(args)
        and not _len_dispatch_stack()
        and not _has_torch_function(args)
    )


_is_compiling = torch.compiler.is_compiling
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling
# torch.backends.cudnn.enabled, read in C (~0.06 µs against ~0.27): the twins' last
# argument, which torch.nn.functional's wrappers pass (``_native``'s calls skip those
# wrappers, ~0.6 µs, whose checks ours have made already)
_cudnn = torch._C._get_cudnn_enabled
_Choice = _backend._Choice
_len_dispatch_stack, _has_torch_function = ops._len_dispatch_stack, ops._has_torch_function  # ``ops._traced``'s
# what torch raises for arguments it refuses: then our checks, which run next, say why
_REFUSED = (RuntimeError, TypeError, ValueError, IndexError)


def _channel_layout(x: Tensor) -> Tensor:
    """Contiguous or channels-last as it is; any other striding made contiguous."""
    if ops.memory_format(x) is not torch.contiguous_format:
        return x
    return x.contiguous()


# ---------------------------------------------------------------------------
# LayerNorm and RMSNorm, with and without the fused residual add.
# ---------------------------------------------------------------------------


def _row_norm(x, residual, normalized_shape, weight, bias, eps, offset, rms, cast=reference.CAST_ONCE):
    # The common call, checked at once, inline (a helper's call costs ~0.15 µs, each
    # tensor attribute read ~0.05): a plain CPU tensor normalized over its last dim (an
    # int, or a one-int tuple as torch.nn's modules keep it), parameters and residual of
    # its dtype and shape, a float eps (or RMSNorm's None).  Each condition is one
    # ``_checked_row_call`` accepts, which checks anything else, errors included; a
    # decoding step's RMSNorm spends ~1.3 µs less here than there.
    xs = dtype = None
    op = ops.row_norm  # None for a ``_foreign`` tensor (``_forward``)
    if type(x) is Tensor:
        xs, dtype = x.shape, x.dtype
        if eps is None and rms:
            eps = rms_eps(eps, dtype)
    # (an int, as torch takes it and patched families pass it, or a torch.Size: x.shape[-1:])
    ns = normalized_shape
    d = ns if type(ns) is int else ns[0] if type(ns) in _SHAPES and len(ns) == 1 else None
    if (
        xs
        and xs[-1] == d
        and type(eps) is float
        and x.numel() < _CPP_ROWS_BELOW
        and type(offset) is float
        and _numba_eager((x, residual, weight, bias))
    ):
        # a small call in plain eager on addnorm's backend, straight to the op's C++ eager
        # path (what ``_forward`` and the op's entry would reach, ~1.2 µs later), which
        # checks the tensors as the checks below would take them, and turns the rest
        # down: they then take those checks
        out = op.eager_cpp(x, residual, weight, bias, eps, offset, rms, cast if dtype in _REDUCED else cast & _TORCH_ORDER)
        if out is not None:
            return out[0], out[1]
    if not (
        xs
        and type(d) is int
        and xs[-1] == d > 0
        and dtype in _ROW_DTYPES
        and type(eps) is float
        and x.is_cpu
        and (weight is None or (type(weight) in _TENSORS and weight.dtype is dtype and weight.shape == (d,) and weight.is_cpu))
        and (bias is None or (type(bias) in _TENSORS and bias.dtype is dtype and bias.shape == (d,) and bias.is_cpu))
        and (residual is None or (type(residual) is Tensor and residual.dtype is dtype and residual.shape == xs and residual.is_cpu))
    ):
        d, eps, weight = _checked_row_call(x, residual, normalized_shape, weight, bias, eps, rms)
        if _foreign(x, residual, weight, bias):
            op = None
        xs, dtype = x.shape, x.dtype
        weight = None if weight is None else _flat(weight)  # (the common call's are rows already)
        bias = None if bias is None else _flat(bias)
    # x is rows of its last dim's d values already, in any leading shape (or one row),
    # which the ops take as they are (``ops``: a reshape in and one out cost a decoding
    # step ~1 µs each); a normalized_shape of several dims is made (N, d) rows and back
    rows = xs[-1] == d
    y, r, _, _ = _forward(
        op,
        _row_norm_math,
        (x if rows else x.reshape(-1, d)).contiguous(),
        None if residual is None else (residual if rows else residual.reshape(-1, d)).contiguous(),
        weight,
        bias,
        float(eps),
        float(offset),
        rms,
        cast if dtype in _REDUCED else cast & reference.TORCH_ORDER,  # no rounding in float32/64
    )
    if residual is None:  # (the traced op gives an empty r)
        return (y if rows else y.reshape(*xs)), None
    # (``*xs``: a torch.Size argument costs ~1 µs more than its ints)
    return (y, r) if rows else (y.reshape(*xs), r.reshape(*xs))


_SHAPES = (tuple, torch.Size)
_TORCH_ORDER = reference.TORCH_ORDER
# the calls ``_row_norm`` offers the C++ eager path itself: kernels/cpu.py's C_SERIAL_BELOW
# (or less: a call between goes the op's way to the same path); a larger call would pay
# ~1 µs for the offer, 5% of its time
_CPP_ROWS_BELOW = 1 << 16


def _row_norm_math(*args):
    """``reference.row_norm_forward`` without the statistics, which ``_row_norm`` does not
    read (a nested tensor's cannot be made the rows' (N,) vector either)."""
    return reference.row_norm_forward(*args, stats=False)


def _checked_row_call(x, residual, normalized_shape, weight, bias, eps, rms) -> tuple[int, float, Tensor | None]:
    """Every check of a row norm's arguments, each error naming its argument -> (d, the
    values per row; eps, RMSNorm's None made the dtype's epsilon; the weight, an RMSNorm
    weight of another float dtype converted as torch.rms_norm takes it)."""
    _check_input(x, "x" if residual is not None else "input")
    if residual is not None:
        _check_same(residual, "residual", x)
    shape = _normalized_shape(normalized_shape, x)
    if rms and isinstance(weight, Tensor) and weight.dtype is not x.dtype and weight.is_floating_point():
        # torch.rms_norm takes a weight of any float dtype: it multiplies in the
        # statistics' dtype and rounds to the input's (float32 beside float16/bfloat16
        # input is the kernels' own mixed case); the conversion is differentiable, so the
        # weight's gradient comes back in its own dtype
        weight = weight.to(reference.acc_dtype(x.dtype))
    _check_param(weight, "weight", shape, x, " (normalized_shape)")
    _check_param(bias, "bias", shape, x, " (normalized_shape)")
    if rms:
        eps = rms_eps(eps, x.dtype)
    _check_float(eps, "eps")
    return math.prod(shape), eps, weight


def _rows(t: Tensor, d: int) -> Tensor:
    """t as rows of d values."""
    return t if t.ndim == 2 and t.shape[1] == d else t.reshape(-1, d)


def _flat(t: Tensor) -> Tensor:
    """A parameter of the normalized shape as one row of its d values."""
    return t if t.ndim == 1 else t.reshape(-1)


def _reshaped(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """t.reshape(shape), skipped where t has that shape (a reshape costs ~0.9 µs; its
    shape as ints, which torch parses ~1 µs faster than a torch.Size: shape is never
    empty here, as DyT and ScaleNorm refuse a 0-dim input)."""
    return t if t.shape == shape else t.reshape(*shape)


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """LayerNorm over the trailing ``normalized_shape`` dims: y = (x - mean) * rstd * w + b."""
    # (a bias alone: the rule's exception, above ``_native``)
    if _native("layer_norm", input, (weight, bias)) and (
        weight is not None or bias is None or getattr(bias, "dtype", None) is input.dtype
    ):
        # below the bounds, our forward kernel on the C++ eager path where it serves the
        # call (with torch's backward kernel where autograd records the graph), which
        # reads the arguments itself and turns down the rest (32 MB and more, a transform
        # that watches: ``_transformed``), ~1 µs less a call than checking them here
        cpp = ops.layer_norm_cpp.function
        if cpp is not None and _DEFAULT.get("cpu") == "numba":
            out = cpp(input, None, normalized_shape, weight, bias, eps)
            if out is not None:
                return out[0]
        try:
            # normalized_shape as torch takes it, never an int (inline: a call costs ~60 ns)
            shape = (normalized_shape,) if type(normalized_shape) is int else normalized_shape
            return torch.layer_norm(input, shape, weight, bias, eps)
        except _REFUSED:
            pass  # torch validates in C++; our checks, next, say why
    return _row_norm(input, None, normalized_shape, weight, bias, eps, 0.0, False)[0]


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    offset: float = 0.0,
    casting_mode: str = "torch",
) -> Tensor:
    """RMSNorm: y = x / sqrt(mean(x^2) + eps) * (w + offset).

    ``eps=None`` is float32's machine epsilon (float64's for float64 input), as in
    torch: the epsilon of the dtype the statistics are computed in; ``offset=1.0`` is
    Gemma's ``(1 + w)`` convention.  ``casting_mode`` is where float16 and bfloat16
    results are rounded (statistics are float32 in every mode): "torch" and "gemma"
    round ``xhat * (w + offset)`` once, computed in float32; "llama" rounds xhat to the
    input's dtype and then multiplies by the weight, as Llama's ``weight *
    xhat.to(dtype)``, in the promoted dtype (float32 output for a float32 weight);
    "none" rounds rstd, xhat, the scale and the product each (Liger's mode of that
    name).  The families' modes ("gemma", "llama", "none") also sum the squares in
    torch's own order, so the output is the family's code's bit for bit in every dtype;
    "torch" sums in the kernel's faster order (the last float32 bit of rstd may differ
    from torch.rms_norm's).
    """
    return _row_norm(input, None, normalized_shape, weight, None, eps, offset, True, _casting(casting_mode))[0]


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Fused ``r = x + residual; (layer_norm(r), r)`` in one pass."""
    if (
        _native("add_layer_norm", x, (residual, weight, bias))
        and (weight is not None or bias is None or getattr(bias, "dtype", None) is x.dtype)  # (a bias alone: the rule)
        # x + residual must neither broadcast nor promote (``_check_same``'s fast path,
        # inlined: x is known a CPU tensor here, and the add refuses another device)
        and type(residual) is Tensor
        and residual.dtype is x.dtype
        and residual.shape == x.shape
    ):
        cpp = ops.layer_norm_cpp.function  # (as in ``layer_norm``)
        if cpp is not None and _DEFAULT.get("cpu") == "numba":
            out = cpp(x, residual, normalized_shape, weight, bias, eps)
            if out is not None:
                return out
        try:
            r = x + residual
            shape = (normalized_shape,) if type(normalized_shape) is int else normalized_shape
            return torch.layer_norm(r, shape, weight, bias, eps), r
        except _REFUSED:
            pass  # torch validates in C++; our checks, next, say why
    return _row_norm(x, residual, normalized_shape, weight, bias, eps, 0.0, False)


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    offset: float = 0.0,
    casting_mode: str = "torch",
) -> tuple[Tensor, Tensor]:
    """Fused ``r = x + residual; (rms_norm(r), r)`` in one pass (``casting_mode`` as
    :func:`rms_norm`)."""
    return _row_norm(x, residual, normalized_shape, weight, None, eps, offset, True, _casting(casting_mode))


# ---------------------------------------------------------------------------
# BatchNorm, InstanceNorm, GroupNorm over (N, C, *spatial).
# ---------------------------------------------------------------------------


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """BatchNorm: per channel, batch statistics over (N, *spatial) in training (updating
    the running statistics in place with ``momentum``), the running ones otherwise."""
    rule = _channel_rule(input, False) if training else "batch_norm"  # (eval: no call to pay)
    if _native(rule, input, (weight, bias, running_mean, running_var)):
        try:
            # torch's kernel validates the rest in C++ (and changes nothing when it
            # refuses), but takes what torch.nn.functional's own checks refuse (eps <= 0
            # in training, < 0 otherwise; one value per channel in training) and what
            # ours do (a weight or bias of C values in another shape)
            if (
                (eps > 0 if training else eps >= 0)
                and not (training and input.numel() == input.shape[1])
                and (weight is None or (type(weight) in _TENSORS and weight.ndim == 1))
                and (bias is None or (type(bias) in _TENSORS and bias.ndim == 1))
            ):
                return torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, _cudnn())
        except _REFUSED:
            pass  # our checks, next, say why
    _check_input(input)
    # an empty 1-D input is a batch of no channels, as torch takes it (torch.nn's own tests pass one)
    empty_1d = input.ndim == 1 and input.numel() == 0
    c = 0 if empty_1d else _check_channels(input, "batch_norm")
    _check_per_channel(input, c, running_mean, running_var, weight, bias)
    if not training and running_mean is None:
        raise ArgumentError("running_mean and running_var are required when training=False")
    values_per_channel = input.numel() // c if c else 0
    if training and values_per_channel == 1:
        raise ArgumentError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{tuple(input.shape)}"
        )
    _check_float(eps, "eps")
    if eps <= 0 if training else eps < 0:  # torch.nn.functional's bound (NaN passes, as there)
        raise ArgumentError(f"eps must be {'> 0 in training' if training else '>= 0'}, got {eps}")
    _check_float(momentum, "momentum")
    foreign = _foreign(input, weight, bias, running_mean, running_var)
    if _inlined(input) and not foreign:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    y, mean, var = _forward(
        None if foreign else ops.batch_norm, reference.batch_norm_forward,
        input.reshape(0, 0) if empty_1d else _channel_layout(input),
        weight, bias, running_mean, running_var, training, float(eps),
    )
    if training and running_mean is not None and values_per_channel > 0:
        _update_running_stats(input, running_mean, running_var, mean, var, values_per_channel, momentum, foreign)
    return y.reshape(0) if empty_1d else y


def _update_running_stats(input, running_mean, running_var, mean, var, n, momentum, foreign):
    """The running statistics' update after a training forward of ``input`` (its batch
    statistics ``mean`` and ``var``, n values each): where the forward ran the op, by
    the op's backend (``ops.update_running_stats``); traced, transformed or ``foreign``,
    where it ran the reference's torch ops, by those."""
    if foreign or _is_compiling() or _transformed((input, mean)):
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
    else:
        ops.update_running_stats(running_mean, running_var, mean, var, n, momentum, _backend.select(input.device))


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """InstanceNorm: statistics per (sample, channel) over the spatial dims (GroupNorm
    with one channel per group); with ``use_input_stats=False``, the running ones.
    Running statistics, when given, take the mean over the batch of each sample's."""
    if not use_input_stats:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    if _native(_channel_rule(input, True), input, (weight, bias, running_mean, running_var)):
        try:
            # torch.nn.functional's own check, which torch's kernel lacks: more than one
            # value per (sample, channel); the rest torch validates in C++.  And eps 0,
            # where torch's kernel gives a constant channel rstd 0 and ours 1 / 0
            # (docs/design.md): the same result at every size
            s = input.shape
            if input.numel() != s[0] * s[1] and eps != 0:
                return torch.instance_norm(input, weight, bias, running_mean, running_var, True, momentum, eps, _cudnn())
        except _REFUSED:
            pass  # our checks, next, say why
    _check_input(input)
    c = _check_channels(input, "instance_norm")
    _check_per_channel(input, c, running_mean, running_var, weight, bias)
    spatial = math.prod(input.shape[2:])
    if spatial == 1:
        raise ArgumentError(
            f"Expected more than 1 spatial element when training, got input size "
            f"{tuple(input.shape)}"
        )
    _check_float(eps, "eps")
    _check_float(momentum, "momentum")
    foreign = _foreign(input, weight, bias, running_mean, running_var)
    if _inlined(input) and not foreign:
        return F.instance_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
    y, mean, var = _forward(
        None if foreign else ops.group_norm, reference.group_norm_forward,
        _channel_layout(input), weight, bias, c, float(eps),
    )
    if running_mean is not None and input.numel() > 0:
        _update_running_stats(input, running_mean, running_var, mean, var, spatial, momentum, foreign)
    return y


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """GroupNorm: statistics per (sample, group of C / num_groups channels), then a
    per-channel affine map."""
    # float32/float16/bfloat16 ask the rule (anything else pays only this)
    rule = type(input) is Tensor and input.dtype in _GN_RULED
    key = _group_norm_rule(input, num_groups, weight, bias) if rule else "group_norm"
    if key == "group_norm_ours" and type(eps) is float and _numba_eager((input, weight, bias)):
        # The rule's call of our kernel, straight to the op's C++ eager path, which checks
        # what the checks below would (tensors, dtypes, shapes) and turns down what they
        # would refuse, which then takes them: the rule gives our kernel large calls
        # (1-3 MB), after whose kernel (and before whose, its predecessor's) each Python
        # layer costs several times its few µs, out of the caches: these layers cost ~25
        # µs of a float16 2x640x32x32 call recording its graph (Intel Xeon, 2 cores)
        out = ops.group_norm_y.eager_cpp(input, weight, bias, num_groups, eps)
        if out is not None:
            return out[0]
    if weight is None and bias is not None and (
        (bias.requires_grad and torch.is_grad_enabled()) or key == "group_norm_torch_forward"
    ):
        # torch's CPU backward fails for a bias's gradient without a weight (torch 2.13:
        # "tensor does not have a device"), ours gives it; and torch's forward rounds a
        # half input with a bias alone unlike the float32-parameter call that
        # ``ops.group_norm_aten_forward`` makes of it: ours runs both
        key = "group_norm_ours"
    if _native(key, input, (weight, bias)):
        if _parameter_grads_only(input, weight, bias):
            key = "group_norm_torch_forward"  # torch's backward would crash: ours, torch's forward
        else:
            try:
                # torch.nn.functional's own check, which torch's kernel lacks: more than one
                # value per group in the batch; the rest torch validates in C++
                if input.numel() != num_groups:
                    return torch.group_norm(input, num_groups, weight, bias, eps, _cudnn())
            except _REFUSED:
                pass  # our checks, next, say why
    _check_input(input)
    c = _check_channels(input, "group_norm")
    if not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ArgumentError(
            f"num_groups must be a positive int dividing the number of channels "
            f"(input.shape[1] = {c}), got {num_groups!r}"
        )
    _check_per_channel(input, c, weight, bias)
    if input.shape[0] * (c // num_groups) * math.prod(input.shape[2:]) == 1:
        raise ArgumentError(  # where torch raises: statistics of one value per group
            f"Expected more than 1 value per group, got input size {tuple(input.shape)} "
            f"with num_groups={num_groups}"
        )
    _check_float(eps, "eps")
    foreign = _foreign(input, weight, bias)
    if _inlined(input) and not foreign:
        return F.group_norm(input, num_groups, weight, bias, eps)
    # torch's forward kernel with our backward where the rule says so, unless a backend is
    # forced (our kernels everywhere) or anything traces (the op: our kernels)
    hybrid = key == "group_norm_torch_forward" and _Choice.forced is None and input.is_cpu
    y, _, _ = _forward(
        None if foreign else ops.group_norm_aten_forward if hybrid else ops.group_norm_y,
        reference.group_norm_forward,
        _channel_layout(input), weight, bias, num_groups, float(eps),
    )
    return y


# ---------------------------------------------------------------------------
# Norm-free and scalar-gain norms.
# ---------------------------------------------------------------------------


def dyt(
    input: Tensor, alpha: Tensor, weight: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """DyT (Dynamic Tanh, Zhu et al. 2025): y = w * tanh(alpha * x) + b, alpha a
    one-element tensor; w and b cover the trailing dims whose shape they have."""
    # The common call, checked at once, inline (as ``_row_norm``'s: ~3 µs less than the
    # checks below, as much as a small DyT's kernel): a plain CPU tensor, alpha of shape
    # (1,), w and b of its last dim, all of its dtype; anything else, errors included,
    # takes the checks below
    dtype = input.dtype if type(input) is Tensor else None
    d = input.shape[-1] if dtype in _ROW_DTYPES and input.ndim else 0
    if not (
        d
        and input.is_cpu
        and type(alpha) in _TENSORS and alpha.dtype is dtype and alpha.shape == (1,) and alpha.is_cpu
        and (weight is None or (type(weight) in _TENSORS and weight.dtype is dtype and weight.shape == (d,) and weight.is_cpu))
        and (bias is None or (type(bias) in _TENSORS and bias.dtype is dtype and bias.shape == (d,) and bias.is_cpu))
        and _jit_tracing() is None
    ):
        _check_input(input)
        _check_one_element(alpha, "alpha", input)
        given = weight if weight is not None else bias
        dims = input.shape[-1:] if given is None else given.shape
        if _jit_tracing() is not None:  # torch.jit.trace gives sizes as tensors: the parameters' are fixed
            dims = [int(s) for s in dims]
        shape = _normalized_shape(tuple(dims), input)
        _check_param(weight, "weight", shape, input)
        _check_param(bias, "bias", shape, input)
        if _foreign(input, alpha, weight, bias):  # the reference's broadcasting ops, in input's shape
            return reference.dyt_forward(input, alpha, weight, bias)
        d = math.prod(shape)
        weight = None if weight is None else _flat(weight)
        bias = None if bias is None else _flat(bias)
    y = _forward(ops.dyt, reference.dyt_forward, _rows(input, d).contiguous(), alpha, weight, bias)
    return _reshaped(y, input.shape)


def scale_norm(input: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """ScaleNorm (Nguyen & Salazar 2019): y = g * x / max(||x||_2, eps) over the last
    dim, g a one-element tensor."""
    # the common call, checked inline (as ``dyt``'s): a plain CPU tensor, g of shape (1,)
    # and its dtype, a float eps >= 0; anything else, errors included, takes the checks below
    dtype = input.dtype if type(input) is Tensor else None
    if not (
        dtype in _ROW_DTYPES
        and input.ndim
        and input.is_cpu
        and type(weight) in _TENSORS and weight.dtype is dtype and weight.shape == (1,) and weight.is_cpu
        and type(eps) is float and eps >= 0
    ):
        _check_input(input)
        if input.ndim == 0:
            raise ArgumentError("scale_norm expects input with at least 1 dim, got a 0-dim tensor")
        _check_one_element(weight, "weight", input)
        _check_float(eps, "eps")
        if not eps >= 0:  # ScaleNorm's own (torch has none): max(||x||, eps) clamps at eps
            raise ArgumentError(f"eps must be >= 0, got {eps}")
        if _foreign(input, weight):  # the reference's torch ops, in input's shape
            return reference.scale_norm_forward(input, weight, float(eps))[0]
    y, _ = _forward(
        ops.scale_norm, reference.scale_norm_forward,
        _rows(input, input.shape[-1]).contiguous(), weight, float(eps),
    )
    return _reshaped(y, input.shape)


# torch.fx: a call with a proxy among its arguments is recorded as one call_function node,
# as torch.nn.functional's norms are (through ``__torch_function__``); while it traces, fx
# swaps these names in this module's globals, which ``addnorm.functional.<name>`` reads
# (a name imported before the trace, ``from addnorm.functional import layer_norm``, is
# the function itself: fx's caveat for every wrapped function)
for _name in __all__:
    if _name[0].islower():
        torch.fx.wrap(_name)
