"""torch.library custom ops: the boundary between addnorm's Python and its kernels.

Each norm is a forward op and a backward op.  Both dispatch to the kernel of the backend
named by their ``backend`` argument (``addnorm._backend``), have a fake implementation
so ``torch.compile`` traces them without running them, and the forward has its autograd
registered with the backward op, so compiled graphs keep forward and backward whole.
Where the triton backend runs them on a GPU, compiled graphs hold their Triton kernels
instead of the op (``_into_triton_kernels``), for inductor to launch.

``functional`` calls each norm through its ``_Entry``: where anything traces
(torch.compile, export, make_fx, a dispatch mode, a tensor subclass) it is the custom op,
so graphs keep it whole; in plain eager it is the same function called straight, in an
``autograd.Function`` with the same setup and backward, which skips the dispatcher's
per-call cost.

The first-order backward runs the backward op (the fast kernel).  When autograd records
the backward itself (``create_graph=True``: double backward, gradient penalties,
Hessian-vector products) it runs ``reference``'s backward instead, as plain
differentiable torch ops, with the statistics recomputed from the saved input so that
their dependence on it is differentiated too.

Ops never return ``None`` and never alias an input (custom ops may not): an absent
output (no residual, no weight, RMSNorm's mean) is an empty tensor, which the autograd
wiring here and the callers in ``functional`` know to ignore.

Shapes: the row norms (LayerNorm, RMSNorm) take x of shape (*, D), normalized over its
last dim, with statistics (N,) for its N = numel / D rows (``functional`` hands over a
decoding step's (1, 1, D) as it is: each reshape in and out costs ~1 µs); DyT and
ScaleNorm take contiguous rows (N, D); GroupNorm and
BatchNorm take (N, C, *spatial), contiguous or channels-last, and return outputs in the
same memory format.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

from . import reference
from ._backend import kernel
from .reference import acc_dtype, memory_format  # (functional reads ops.memory_format)

_NONE = 0  # length of the empty tensor that stands for an absent output


def _empty(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return like.new_empty(_NONE, dtype=dtype or like.dtype)


def _or_empty(t: Tensor | None, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return _empty(like, dtype) if t is None else t.contiguous()


def _param_grads(weight: Tensor | None, bias: Tensor | None, like: Tensor):
    """Fake parameter gradients: shaped like the parameter, or empty when it is absent."""
    return (
        _empty(like) if weight is None else torch.empty_like(weight),
        _empty(like) if bias is None else torch.empty_like(bias),
    )


def _present(t: Tensor, wanted: bool) -> Tensor | None:
    return t if wanted else None


def _custom_op(fn, triton_kernels=False):
    """``fn`` as the custom op ``addnorm::<fn's name without the underscore>``; with
    ``triton_kernels``, traced into where the triton backend runs it on a GPU
    (``_into_triton_kernels``): the row norms', GroupNorm's and DyT's, each compiled
    and checked on a GPU (``tests/test_cuda.py``); BatchNorm and ScaleNorm have no
    Triton kernel (torch's own, or the reference's fallback)."""
    op = torch.library.custom_op(f"addnorm::{fn.__name__.lstrip('_')}", mutates_args=())(fn)
    if triton_kernels:
        backend_at = list(inspect.signature(fn).parameters).index("backend")
        op.register_torch_dispatch(FunctionalTensorMode, functools.partial(_into_triton_kernels, fn, backend_at))
    return op


def _into_triton_kernels(fn, backend_at, mode, op, types, args, kwargs):
    """Under torch.compile's functionalization (AOTAutograd), an op that the triton
    backend runs on a GPU is replaced by its body, as ``torch.library.triton_op``'s are:
    the body's Triton kernels are launched through ``torch.library.wrap_triton``
    (``kernels.gpu._launch``), so inductor sees each kernel and launches it itself, with
    no Python of ours left in the compiled graph.  Every other op stays whole: an opaque
    call (numba's kernels cannot be traced)."""
    if (
        args[backend_at] != "triton"
        or args[0].device.type != "cuda"
        or any(t not in _TRACEABLE and not issubclass(t, FakeTensor) for t in types)
        or _triton_decomposition_disabled()
    ):
        return mode.__torch_dispatch__(op, types, args, kwargs)
    with mode:
        return fn(*args, **kwargs)


def _triton_decomposition_disabled() -> bool:
    """torch.export's switch that keeps ``triton_op``s whole (kept for ours too)."""
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    return custom_triton_ops_decomposition_disabled()


_TRACEABLE = (Tensor, FunctionalTensor)


def _traced(args: tuple) -> bool:
    """Whether anything but plain eager execution sees these arguments: torch.compile or
    export (dynamo, AOTAutograd), a dispatch or function mode (make_fx, FakeTensorMode,
    FlopCounterMode, ``with torch.device``), or a tensor subclass with a
    ``__torch_function__`` (a Parameter has none).  Those must see the custom op; plain
    eager calls skip the dispatcher (about 12 µs a call at small shapes)."""
    # is_compiling first: dynamo folds it, and traces nothing after; then two C calls, in
    # this one frame, since every call runs it
    return _is_compiling() or _len_dispatch_stack() > 0 or _has_torch_function(args)


_is_compiling = torch.compiler.is_compiling
_has_torch_function = torch._C._has_torch_function  # over one tuple of arguments
_len_dispatch_stack = torch._C._len_torch_dispatch_stack


def _run(op, fn, *args):
    """A backward op: the custom op where traced, the same function called straight else."""
    return op(*args) if _traced(args) else fn(*args)


def update_running_stats(running_mean, running_var, mean, var, n, momentum, backend):
    """``reference.update_running_stats`` after a training forward on ``backend``: by that
    backend's kernel where it has one and nothing traces (the CPU's: one call of ~2 µs,
    where the reference's torch ops take ~25, more than a small BatchNorm's kernel), else
    by the reference's torch ops."""
    args = (running_mean, running_var, mean, var)
    update = reference.update_running_stats if _traced(args) else kernel(backend, "update_running_stats")
    update(*args, n, momentum)


class _Entry:
    """What ``functional`` calls for one norm: the forward custom op where anything
    traces (see ``_traced``); in plain eager, ``eager`` (the op's function, or the same
    kernel call without the op's output contract: absent outputs None, not empty
    tensors) called straight, inside an ``autograd.Function`` with the op's own setup and
    backward when a gradient is wanted, or ``lean`` (``eager`` without the statistics,
    where the kernel can skip them) when none is.  All paths run the same kernels and
    the same backward.  An entry with ``cpp`` (DyT, ScaleNorm, the row norms: RMSNorm's
    calls) first offers a plain eager call on the numba backend to its C++ eager path
    (``csrc/eager.cpp``: small calls, the same kernels behind a C++ autograd node), which
    serves it or returns None.

    The ``autograd.Function`` has the old-style ``forward(ctx, *args)``: with a separate
    ``setup_context``, ``Function.apply`` binds the arguments through
    ``inspect.signature`` on every call (~35 µs, twice a small norm's time).  It is
    entered through the C++ ``apply`` underneath, after the one thing the Python
    ``apply`` adds outside a functorch transform, unwrapping tensors left over from a
    finished transform (another ~2 µs a call; here only the tensor arguments): inside a
    transform ``functional`` calls no op (it runs the reference's torch ops there).  The
    arguments that are no tensors travel into it as one tuple, and an absent residual
    output is left out, each ~0.3 µs less of autograd's bookkeeping.  Measured at
    (64, 256) float32, forward recording autograd: 16.9 µs through the generic wrapper
    with every output, 15.5 with the statistics kept as intermediates and only the
    tensors unwrapped."""

    registered: set = set()

    def __init__(self, op, fn, setup, backward, eager=None, lean=None, visible=None, cpp=None):
        if op not in _Entry.registered:  # an op can serve two entries (other eager kernels)
            op.register_autograd(backward, setup_context=setup)
            _Entry.registered.add(op)
        self.op, self.eager = op, eager or fn
        self.lean = lean or self.eager
        schema = op._opoverload._schema
        # the tensor arguments lead (x, then the optional ones); only those can need unwrapping
        is_tensor = ["Tensor" in str(a.type) for a in schema.arguments]
        self.tensors = is_tensor.index(False) if False in is_tensor else len(is_tensor)
        assert not any(is_tensor[self.tensors :]), f"{schema.name}: tensor arguments must lead"
        # the outputs the callers read; the rest (a row norm's statistics) the
        # ``autograd.Function`` keeps as saved intermediates, not outputs: each output costs
        # autograd ~0.4 µs a call, and the callers get None in their place; of two visible
        # outputs, an absent second one (a row norm's residual sum without a residual) is
        # left out the same way
        total = len(schema.returns)
        visible = visible or total
        self.hidden = visible < total
        # by how many outputs the ``autograd.Function`` gave: the Nones for those it left
        # out, the callers' outputs and backward's gradients alike
        self.missing = {n: (None,) * (total - n) for n in range(1, total + 1)}

        def forward(ctx, *args):
            args = args[:-1] + args[-1]  # the tensors, then the rest as one tuple (``__call__``)
            out = self.eager(*args)
            setup(ctx, args, out)
            if not self.hidden:
                return out  # (a single output is no tuple)
            shown = out[:visible]
            return shown[0] if visible == 2 and shown[1] is None else shown

        def function_backward(ctx, *grads):
            return backward(ctx, *grads, *self.missing[len(grads)])[: self.tensors] + (None,)

        function = type(
            fn.__name__.strip("_"),
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(function_backward)},
        )
        self._apply = _function_apply.__get__(None, function)
        # the C++ eager path's function of this op (``cpp``: its name in csrc/eager.cpp),
        # found on the first call; None: there is none
        self.cpp_name = cpp
        self.cpp = self._first_cpp if cpp else None

    def _first_cpp(self, *args):
        self.cpp = _cpp_function(self.cpp_name)
        return None if self.cpp is None else self.cpp(*args)

    def eager_cpp(self, *args):
        """The op's C++ eager path on ``args`` (without the backend) of a call that a
        caller has found plain eager, on the numba backend, before its own checks: its
        outputs, or None where the path does not serve the call (or there is none), an
        argument it cannot take as its type included (a list for a weight: the caller's
        checks then say what is wrong)."""
        if self.cpp is None:
            return None
        try:
            return self.cpp(*args)
        except TypeError:  # (pybind11's: "incompatible function arguments")
            return None

    def __call__(self, *args):
        if _traced(args):
            return self.op(*args)
        if self.cpp is not None and args[-1] == "numba":
            # the numba backend's kernels behind a C++ autograd node, for the calls it
            # serves (small, plain, one dtype); None for the rest, which go on below
            out = self.cpp(*args[:-1])
            if out is not None:
                return out
        if torch.is_grad_enabled():
            tensors = args[: self.tensors]
            for a in tensors:
                if a is not None and a.requires_grad:
                    unwrapped = [None if t is None else _unwrap_if_dead(t) for t in tensors]
                    out = self._apply(*unwrapped, args[self.tensors :])
                    if not self.hidden:
                        return out
                    out = (out,) if type(out) is Tensor else out
                    return out + self.missing[len(out)]
        return self.lean(*args)


class _CppPath:
    """A function of the C++ eager path that no op's entry fronts (functional's rule's
    LayerNorm, ``layer_norm_cpp``): ``function``, found on its first call; None where
    the path is not there (or is turned off, as the tests' ``python_path_only`` does)."""

    def __init__(self, name: str):
        self.name, self.function = name, self._first

    def _first(self, *args):
        self.function = _cpp_function(self.name)
        return None if self.function is None else self.function(*args)


def _cpp_function(name: str):
    """The C++ eager path's function ``name``; None where the path is not there."""
    ext = _eager_cpp()
    return None if ext is None else getattr(ext, name)


def _eager_cpp():
    """The C++ eager path's module (``kernels/cpp.py``), with the differentiable
    backwards it calls back registered; None where it is not built, its numba kernels
    are not in numba's cache, or it is turned off."""
    from .kernels import cpp

    ext = cpp.module()
    if ext is not None:
        ext.register_math(_dyt_backward_math, _scale_norm_backward_math, _row_norm_gradients, _dyt_backward_threaded,
                          _group_norm_grads)
    return ext


# torch.autograd.Function.apply's C++ half, and what the Python half does before it
# outside a functorch transform (torch/autograd/function.py, ``apply``)
_function_apply = torch._C._FunctionBase.__dict__["apply"]
_transforms_active = torch._C._are_functorch_transforms_active
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def _differentiable_backward(*grads: Tensor | None) -> bool:
    """Whether this backward must be made of torch ops rather than of our kernels: where
    autograd records it (create_graph=True: a custom op has no derivative), or where a
    vmap batches it (an incoming gradient in ``grads`` is then a batched tensor, which no
    kernel can read by address: ``torch.func.vmap`` over ``autograd.grad``, the legacy
    vmap of ``torch.autograd.functional.jacobian(vectorize=True)`` and of gradcheck's
    batched gradients)."""
    return (
        torch.is_grad_enabled()
        or _transforms_active()
        or any(g is not None and _legacy_batched(g) for g in grads)
    )


# ---------------------------------------------------------------------------
# LayerNorm / RMSNorm over rows, with or without the fused residual add.
# ---------------------------------------------------------------------------


def _row_norm(x, residual, weight, bias, eps, offset, rms, cast, backend, stats=True):
    """-> (y, residual_out or None, mean or None, rstd or None) as the backend's kernel
    gives them: the eager forward (``stats=False``: where no gradient is recorded)."""
    return kernel(backend, "row_norm_forward")(x, residual, weight, bias, eps, offset, rms, cast, stats)


def _row_norm_lean(x, residual, weight, bias, eps, offset, rms, cast, backend):
    return _row_norm(x, residual, weight, bias, eps, offset, rms, cast, backend, stats=False)


def _row_norm_fwd(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    offset: float,
    rms: bool,
    cast: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (y, residual_out or empty, mean or empty, rstd)"""
    y, r, mean, rstd = _row_norm(x, residual, weight, bias, eps, offset, rms, cast, backend)
    acc = acc_dtype(x.dtype)
    return y.contiguous(), _or_empty(r, x), _or_empty(mean, x, acc), rstd.contiguous()


row_norm_fwd = _custom_op(_row_norm_fwd, triton_kernels=True)


@row_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, offset, rms, cast, backend):
    acc = acc_dtype(x.dtype)
    rows = x.shape[:-1].numel()
    return (
        torch.empty_like(x, dtype=reference.row_norm_out_dtype(x.dtype, weight, cast)),
        _empty(x) if residual is None else torch.empty_like(x),
        _empty(x, acc) if rms else x.new_empty(rows, dtype=acc),
        x.new_empty(rows, dtype=acc),
    )


def _row_norm_grads(dy, dresidual, r, weight, bias, mean, rstd, offset, rms, cast, backend, wanted):
    """-> (dx, dweight, dbias) as the backend's kernel gives them (None where absent or not
    ``wanted``): the eager backward.  dx already includes dresidual."""
    return kernel(backend, "row_norm_backward")(
        dy, dresidual, r, weight, None if rms else mean, rstd, offset, rms, cast, bias, tuple(wanted)
    )


def _row_norm_bwd(
    dy: Tensor,
    dresidual: Tensor | None,
    r: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    offset: float,
    rms: bool,
    cast: int,
    backend: str,
    wanted: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx, dweight, dbias), each empty where absent or not ``wanted``.  mean is
    empty (the forward op's output) for RMSNorm."""
    dx, dw, db = _row_norm_grads(dy, dresidual, r, weight, bias, mean, rstd, offset, rms, cast, backend, wanted)
    return _or_empty(dx, r), _or_empty(dw, r), _or_empty(db, r)


row_norm_bwd = _custom_op(_row_norm_bwd, triton_kernels=True)


@row_norm_bwd.register_fake
def _(dy, dresidual, r, weight, bias, mean, rstd, offset, rms, cast, backend, wanted):
    dweight, dbias = _param_grads(weight if wanted[1] else None, bias if wanted[2] else None, r)
    return (torch.empty_like(r) if wanted[0] else _empty(r)), dweight, dbias


def _row_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, offset, rms, cast, backend = inputs
    _y, r, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.eps = eps
    ctx.args = (offset, rms, cast, backend)
    source = r if ctx.has_residual else x
    if rms and source.is_inference():
        # an input made under torch.inference_mode, normalized with a trainable weight:
        # torch.nn.RMSNorm takes it (its graph keeps no inference tensor), and autograd
        # refuses to save one, so a copy (LayerNorm refuses it as torch's does)
        source = source.clone()
    ctx.save_for_backward(source, weight, bias, mean, rstd)


def _row_norm_backward(ctx, dy, dr, _dmean, _drstd):
    r, weight, bias, mean, rstd = ctx.saved_tensors
    needs, has_residual = ctx.needs_input_grad, ctx.has_residual
    # the kernels compute only what autograd asks for: dx (x's and the residual's), dw, db
    wanted = [needs[0] or (has_residual and needs[1]), needs[2], needs[3]]
    offset, rms, cast, backend = ctx.args
    dx, dw, db = _row_norm_gradients(dy, dr if has_residual else None, r, weight, bias, mean, rstd, ctx.eps, offset,
                                     rms, cast, backend, wanted)
    return (
        _present(dx, needs[0]),
        _present(dx, has_residual and needs[1]),
        _present(dw, needs[2]),
        _present(db, needs[3]),
        None,
        None,
        None,
        None,
        None,
    )


def _row_norm_gradients(dy, dr, r, weight, bias, mean, rstd, eps, offset, rms, cast, backend, wanted):
    """-> (dx, dw, db), None where absent or not ``wanted``: the backward of a recorded
    forward, on the rows r it normalized (x + residual where there was one), from its
    autograd.Function and from the C++ eager path's node (``csrc/eager.cpp``).  The
    kernel, or where the backward must be differentiable the reference's torch ops."""
    if _differentiable_backward(dy, dr):
        _, mean, _, rstd = reference.standardize(r, (-1,), eps, centered=not rms)
        if cast & reference.ROUNDING == reference.CAST_EACH:
            rstd = reference.round_to(rstd, r.dtype)
        return reference.row_norm_backward(
            dy, dr, r, weight, None if rms else mean.squeeze(-1), rstd.squeeze(-1), offset, rms, cast, bias, wanted
        )
    args = (dy, dr, r, weight, bias, mean, rstd, offset, rms, cast, backend, wanted)
    return _run(row_norm_bwd, _row_norm_grads, *args)


row_norm = _Entry(
    row_norm_fwd, _row_norm_fwd, _row_norm_setup, _row_norm_backward, _row_norm, _row_norm_lean, visible=2,
    cpp="row_norm",
)
# functional's rule's LayerNorm (add+LayerNorm with a residual) below its bounds: our
# forward kernel, and where autograd records the graph a C++ node whose backward is
# torch's kernel (csrc/eager.cpp's ``layer_norm``: ``function(x, residual,
# normalized_shape, weight, bias, eps)``, (y, r or None) or None)
layer_norm_cpp = _CppPath("layer_norm")


# ---------------------------------------------------------------------------
# GroupNorm (and InstanceNorm, G = C) and BatchNorm: (N, C, *spatial).
# ---------------------------------------------------------------------------


def _group_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (y, mean (N, G), var (N, G))"""
    y, mean, var = kernel(backend, "group_norm_forward")(x, weight, bias, num_groups, eps)
    return y.contiguous(memory_format=memory_format(x)), mean.contiguous(), var.contiguous()


group_norm_fwd = _custom_op(_group_norm_fwd, triton_kernels=True)


@group_norm_fwd.register_fake
def _(x, weight, bias, num_groups, eps, backend):
    stats = x.new_empty((x.shape[0], num_groups), dtype=acc_dtype(x.dtype))
    return torch.empty_like(x, memory_format=memory_format(x)), stats, torch.empty_like(stats)


def _group_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    num_groups: int,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = kernel(backend, "group_norm_backward")(
        dy, x, weight, mean, var, num_groups, eps, bias
    )
    return dx.contiguous(memory_format=memory_format(x)), _or_empty(dw, x), _or_empty(db, x)


group_norm_bwd = _custom_op(_group_norm_bwd, triton_kernels=True)


@group_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, var, num_groups, eps, backend):
    return (torch.empty_like(x, memory_format=memory_format(x)), *_param_grads(weight, bias, x))


def _group_norm_setup(ctx, inputs, output):
    x, weight, bias, num_groups, eps, backend = inputs
    _y, mean, var = output
    ctx.args = (num_groups, eps, backend)
    ctx.save_for_backward(x, weight, bias, mean, var)


def _group_norm_backward(ctx, dy, _dmean, _dvar):
    return _group_norm_grads(dy, *ctx.saved_tensors, *ctx.args)


def _group_norm_grads(dy, x, weight, bias, mean, var, num_groups, eps, backend):
    if _differentiable_backward(dy):
        _, mean, var = reference.group_norm_forward(x, None, None, num_groups, eps)
        dx, dw, db = reference.group_norm_backward(dy, x, weight, mean, var, num_groups, eps, bias)
    else:
        dx, dw, db = _run(group_norm_bwd, _group_norm_bwd, dy, x, weight, bias, mean, var, num_groups, eps, backend)
    return dx, _present(dw, weight is not None), _present(db, bias is not None), None, None, None


def _group_norm_eager(x, weight, bias, num_groups, eps, backend):
    """``_group_norm_fwd`` for the eager path: numba's kernel's outputs as they are (y in
    x's layout, the statistics fresh: ~1.5 µs of layout checks less a call)."""
    if backend == "numba":
        return kernel(backend, "group_norm_forward")(x, weight, bias, num_groups, eps)
    return _group_norm_fwd(x, weight, bias, num_groups, eps, backend)


group_norm = _Entry(group_norm_fwd, _group_norm_fwd, _group_norm_setup, _group_norm_backward, _group_norm_eager)
# the same op for callers that read y alone (GroupNorm; InstanceNorm reads the statistics
# for its running ones): in eager the statistics stay saved intermediates, not outputs
# (each output costs autograd ~0.4 µs a call)
group_norm_y = _Entry(group_norm_fwd, _group_norm_fwd, _group_norm_setup, _group_norm_backward, _group_norm_eager,
                      visible=1, cpp="group_norm")


def _group_norm_fwd_aten(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (y, mean, rstd) from torch's CPU kernel (``native_group_norm``), where
    ``functional``'s rule finds torch's forward the faster and its backward the slower.
    The parameters go in in the accumulation type (of a half input: ones for an absent
    weight), so that torch's statistics come out in it, not rounded to a half type.  y is
    torch's (in float16 a few values a rounding apart from its half-parameter call, no
    further from float64)."""
    n, c = x.shape[:2]
    acc = acc_dtype(x.dtype)
    w = weight.to(acc) if weight is not None else None if acc is x.dtype else x.new_ones(c, dtype=acc)
    b = None if bias is None else bias.to(acc)
    return torch.native_group_norm(x, w, b, n, c, x.numel() // (n * c), num_groups, eps)


def _group_norm_aten_backward(ctx, dy, _dmean, _drstd):
    """Our backward from torch's rstd: var = rstd^-2 - eps here, not in the forward (on 2
    cores each small op after torch's parallel kernel costs ~15-35 µs); our kernel reads
    only var + eps, which this gives to an ulp (its rstd is torch's to an ulp)."""
    x, weight, bias, mean, rstd = ctx.saved_tensors
    num_groups, eps, backend = ctx.args
    return _group_norm_grads(dy, x, weight, bias, mean, rstd.pow(-2).sub_(eps), num_groups, eps, backend)


# torch's forward kernel, our backward (the same op where anything traces); its
# statistics (torch's rstd, not var) stay inside: callers get y alone
group_norm_aten_forward = _Entry(
    group_norm_fwd, _group_norm_fwd, _group_norm_setup, _group_norm_aten_backward,
    eager=_group_norm_fwd_aten, lean=lambda *args: (_group_norm_fwd_aten(*args)[0], None, None), visible=1,
)


def _batch_norm_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (y, mean (C,), var (C,)): the batch's statistics in training, else the running ones."""
    y, mean, var = kernel(backend, "batch_norm_forward")(
        x, weight, bias, running_mean, running_var, training, eps
    )
    return y.contiguous(memory_format=memory_format(x)), mean.contiguous(), var.contiguous()


batch_norm_fwd = _custom_op(_batch_norm_fwd)


@batch_norm_fwd.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps, backend):
    stats = x.new_empty(x.shape[1], dtype=acc_dtype(x.dtype))
    return torch.empty_like(x, memory_format=memory_format(x)), stats, torch.empty_like(stats)


def _batch_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    training: bool,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = kernel(backend, "batch_norm_backward")(
        dy, x, weight, mean, var, training, eps, bias
    )
    return dx.contiguous(memory_format=memory_format(x)), _or_empty(dw, x), _or_empty(db, x)


batch_norm_bwd = _custom_op(_batch_norm_bwd)


@batch_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, var, training, eps, backend):
    return (torch.empty_like(x, memory_format=memory_format(x)), *_param_grads(weight, bias, x))


def _batch_norm_setup(ctx, inputs, output):
    x, weight, bias, _rm, _rv, training, eps, backend = inputs
    _y, mean, var = output
    ctx.args = (training, eps, backend)
    ctx.save_for_backward(x, weight, bias, mean, var)


def _batch_norm_backward(ctx, dy, _dmean, _dvar):
    x, weight, bias, mean, var = ctx.saved_tensors
    training, eps, backend = ctx.args
    if _differentiable_backward(dy):
        if training:  # batch statistics depend on x; running ones are constants
            _, mean, var = reference.batch_norm_forward(x, None, None, None, None, True, eps)
        dx, dw, db = reference.batch_norm_backward(dy, x, weight, mean, var, training, eps, bias)
    else:
        dx, dw, db = _run(batch_norm_bwd, _batch_norm_bwd, dy, x, weight, bias, mean, var, training, eps, backend)
    return (
        dx,
        _present(dw, weight is not None),
        _present(db, bias is not None),
        None,
        None,
        None,
        None,
        None,
    )


batch_norm = _Entry(batch_norm_fwd, _batch_norm_fwd, _batch_norm_setup, _batch_norm_backward)


# ---------------------------------------------------------------------------
# DyT and ScaleNorm over rows.
# ---------------------------------------------------------------------------


def _dyt_fwd(
    x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, backend: str
) -> Tensor:
    return kernel(backend, "dyt_forward")(x, alpha, weight, bias).contiguous()


dyt_fwd = _custom_op(_dyt_fwd, triton_kernels=True)


@dyt_fwd.register_fake
def _(x, alpha, weight, bias, backend):
    return torch.empty_like(x)


def _dyt_bwd(
    dy: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dalpha, dw, db = kernel(backend, "dyt_backward")(dy, x, alpha, weight, bias)
    return dx.contiguous(), dalpha, _or_empty(dw, x), _or_empty(db, x)


dyt_bwd = _custom_op(_dyt_bwd, triton_kernels=True)


@dyt_bwd.register_fake
def _(dy, x, alpha, weight, bias, backend):
    return (torch.empty_like(x), torch.empty_like(alpha), *_param_grads(weight, bias, x))


def _dyt_setup(ctx, inputs, output):
    x, alpha, weight, bias, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(x, alpha, weight, bias)


def _dyt_backward(ctx, dy):
    x, alpha, weight, bias = ctx.saved_tensors
    if _differentiable_backward(dy):
        return (*_dyt_backward_math(dy, x, alpha, weight, bias), None)
    dx, dalpha, dw, db = _run(dyt_bwd, _dyt_bwd, dy, x, alpha, weight, bias, ctx.backend)
    return dx, dalpha, _present(dw, weight is not None), _present(db, bias is not None), None


def _dyt_backward_math(dy, x, alpha, weight, bias):
    """DyT's backward as the reference's torch ops (differentiable; the C++ path's too)."""
    dx, dalpha, dw, db = reference.dyt_backward(dy, x, alpha, weight, bias)
    return dx, dalpha, _present(dw, weight is not None), _present(db, bias is not None)


def _dyt_backward_threaded(dy, x, alpha, weight, bias):
    """DyT's backward by numba's kernels across threads: the C++ path's node calls it for
    calls worth threads (its own C entry runs on one)."""
    dx, dalpha, dw, db = _dyt_bwd(dy, x, alpha, weight, bias, "numba")
    return dx, dalpha, _present(dw, weight is not None), _present(db, bias is not None)


dyt = _Entry(dyt_fwd, _dyt_fwd, _dyt_setup, _dyt_backward, cpp="dyt")


def _scale_norm_fwd(x: Tensor, weight: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    """-> (y, rnorm (N,)) with rnorm = 1 / max(||x||, eps)"""
    y, rnorm = kernel(backend, "scale_norm_forward")(x, weight, eps)
    return y.contiguous(), rnorm.contiguous()


def _scale_norm_lean(x, weight, eps, backend):
    """-> (y, None): the eager forward where no gradient is recorded."""
    return kernel(backend, "scale_norm_forward")(x, weight, eps, False)


scale_norm_fwd = _custom_op(_scale_norm_fwd)


@scale_norm_fwd.register_fake
def _(x, weight, eps, backend):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=acc_dtype(x.dtype))


def _scale_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, rnorm: Tensor, eps: float, backend: str
) -> tuple[Tensor, Tensor]:
    dx, dw = kernel(backend, "scale_norm_backward")(dy, x, weight, rnorm, eps)
    return dx.contiguous(), dw


scale_norm_bwd = _custom_op(_scale_norm_bwd)


@scale_norm_bwd.register_fake
def _(dy, x, weight, rnorm, eps, backend):
    return torch.empty_like(x), torch.empty_like(weight)


def _scale_norm_setup(ctx, inputs, output):
    x, weight, eps, backend = inputs
    ctx.args = (eps, backend)
    ctx.save_for_backward(x, weight, output[1])


def _scale_norm_backward(ctx, dy, _drnorm):
    x, weight, rnorm = ctx.saved_tensors
    eps, backend = ctx.args
    if _differentiable_backward(dy):
        dx, dw = _scale_norm_backward_math(dy, x, weight, eps)
    else:
        dx, dw = _run(scale_norm_bwd, _scale_norm_bwd, dy, x, weight, rnorm, eps, backend)
    return dx, dw, None, None


def _scale_norm_backward_math(dy, x, weight, eps):
    """ScaleNorm's backward as the reference's torch ops, its rnorm recomputed by them
    (differentiable; the C++ path's too)."""
    rnorm = reference.scale_norm_forward(x, weight, eps)[1]
    return reference.scale_norm_backward(dy, x, weight, rnorm, eps)


# rnorm a saved intermediate, not an output of the eager path's ``autograd.Function``
scale_norm = _Entry(scale_norm_fwd, _scale_norm_fwd, _scale_norm_setup, _scale_norm_backward, lean=_scale_norm_lean,
                    visible=1, cpp="scale_norm")
