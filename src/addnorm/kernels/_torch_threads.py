"""numba's parallel loops on torch's own OpenMP threads.

numba runs ``prange`` loops on a thread pool of its own (TBB, GNU OpenMP or its
workqueue).  torch runs its CPU ops on another, OpenMP's, whose threads keep spinning for
a few milliseconds after each op, waiting for the next.  A kernel of ours that runs right
after a torch op (a norm after a matmul: every model) then shares each core with a
spinning torch thread, and torch's next op with ours: on 2 cores, right after torch's
own RMSNorm 512x1024 float32, ours took 92-146 µs on TBB and 48-50 µs on torch's
threads, and torch's took 136-187 µs beside TBB's threads against 104
(``benchmarks/thread_pools.py``).

This module is a numba threading layer, in numba's protocol (the functions numba's
``parallel._launch_threads`` reads from its layer modules), whose ``parallel_for`` starts
the loop's team with ``GOMP_parallel`` of the OpenMP runtime torch itself loaded: the
same threads torch's ops run on, already awake.  It is written in numba itself
(``cfunc``), so it needs no compiler; ``install`` registers it as numba's "omp" layer
where torch's runtime is found (Linux builds of torch with OpenMP, the pip wheels among
them), and ``addnorm.kernels.cpu`` falls back to TBB elsewhere.

GNU OpenMP cannot start threads in a child forked after it started them (torch's own ops
hang there unless ``torch.set_num_threads(1)``, as DataLoader workers do): in a forked
child every loop runs on the calling thread, so it never waits on threads that do not
exist.  The thread count ``numba.set_num_threads`` sets is one for the process, not one
per Python thread as in numba's own layers (two threads asking for different counts at
once get one of them; the results do not depend on it).
"""

from __future__ import annotations

import ctypes
import os
import sys
import types as pytypes

import llvmlite.binding as ll
import numba
import numpy as np
import torch
from llvmlite import ir
from numba import cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

NAME = "torch's OpenMP threads"  # what ``addnorm bench`` prints as numba's threading layer

_I8P = ir.IntType(8).as_pointer()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_OPENMP = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")
# [thread count, forked]: plain memory the compiled layer reads by symbol and Python writes
_STATE = (ctypes.c_int64 * 2)()


def openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch's CPU ops run on, already loaded by torch; None where
    torch uses none (another ATen parallel backend) or it cannot be found."""
    if not sys.platform.startswith("linux") or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    bundled = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")  # pip's wheels
    for name in (bundled, "libgomp.so.1", "libiomp5.so", "libomp.so"):
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD)  # only one already loaded
        except OSError:
            continue
        if all(hasattr(lib, f) for f in _OPENMP):
            return lib
    return None


def _symbol(name: str) -> str:
    return "addnorm_" + name


# ---------------------------------------------------------------------------
# The compiled layer.  The runtime's functions, the state and the worker are reached by
# symbol names that ``_compiled`` gives llvmlite, not by addresses baked into the code:
# so the compiled functions can be cached on disk and loaded by another process.
# ---------------------------------------------------------------------------


def _state_ptr(builder, index):
    """Where ``_STATE[index]`` is (``index`` an i64 value)."""
    mod = builder.module
    name = _symbol("layer_state")
    gv = mod.globals.get(name)
    if gv is None:
        gv = ir.GlobalVariable(mod, ir.ArrayType(_I64, 2), name)
        gv.linkage = "external"
    return builder.gep(gv, [ir.Constant(_I32, 0), index])


@intrinsic
def _state(typingctx, index):
    """_STATE[index]"""

    def codegen(context, builder, sig, args):
        return builder.load(_state_ptr(builder, args[0]))

    return types.int64(types.int64), codegen


@intrinsic
def _set_state(typingctx, index, value):
    """_STATE[index] = value"""

    def codegen(context, builder, sig, args):
        builder.store(args[1], _state_ptr(builder, args[0]))
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


@intrinsic
def _team_place(typingctx):
    """(this thread's number in its OpenMP team, the team's size)"""

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(_I32, [])
        get = lambda name: builder.call(cgutils.get_or_insert_function(builder.module, fnty, _symbol(name)), [])
        place = [builder.sext(get("omp_get_thread_num"), _I64), builder.sext(get("omp_get_num_threads"), _I64)]
        return context.make_tuple(builder, sig.return_type, place)

    return types.UniTuple(types.int64, 2)(), codegen


@intrinsic
def _call_gufunc(typingctx, fn, args, dims, steps, data):
    """fn(args, dims, steps, data): the loop body numba compiled, a C function by address."""

    def codegen(context, builder, sig, a):
        fnty = ir.FunctionType(ir.VoidType(), [_I8P.as_pointer(), _I64.as_pointer(), _I64.as_pointer(), _I8P])
        f = builder.inttoptr(a[0], fnty.as_pointer())
        builder.call(f, [builder.inttoptr(v, t) for v, t in zip(a[1:], fnty.args)])
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64, types.int64), codegen


@intrinsic
def _start_team(typingctx, task, count):
    """GOMP_parallel(worker, task, count, 0): ``_worker(task)`` on each of ``count``
    threads, the calling one among them; returns when all are done."""

    def codegen(context, builder, sig, a):
        wty = ir.FunctionType(ir.VoidType(), [_I8P])
        worker = cgutils.get_or_insert_function(builder.module, wty, _symbol("layer_worker"))
        fnty = ir.FunctionType(ir.VoidType(), [wty.as_pointer(), _I8P, _I32, _I32])
        start = cgutils.get_or_insert_function(builder.module, fnty, _symbol("GOMP_parallel"))
        builder.call(start, [worker, builder.inttoptr(a[0], _I8P), builder.trunc(a[1], _I32), ir.Constant(_I32, 0)])
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


@intrinsic
def _address_array(typingctx, address, count):
    """The int64 array of ``count`` values at ``address``."""

    def codegen(context, builder, sig, a):
        ary = context.make_array(sig.return_type)(context, builder)
        ptr = builder.inttoptr(a[0], _I64.as_pointer())
        itemsize = context.get_constant(types.intp, 8)
        context.populate_array(ary, data=ptr, shape=cgutils.pack_array(builder, [a[1]]),
                               strides=cgutils.pack_array(builder, [itemsize]), itemsize=itemsize, meminfo=None)
        return ary._getvalue()

    return types.Array(types.int64, 1, "C")(types.int64, types.int64), codegen


@intrinsic
def _voidptr_address(typingctx, p):
    def codegen(context, builder, sig, a):
        return builder.ptrtoint(a[0], _I64)

    return types.int64(types.voidptr), codegen


@njit(cache=True, nogil=True)
def _run_share(task, thread, threads):
    """Thread ``thread`` of ``threads``' contiguous share of the loop's outer iterations,
    as GNU OpenMP's static ``omp for`` in numba's own OpenMP layer splits them.
    ``task``: (fn, args, dims, steps, data, inner_ndim, array_count) of ``parallel_for``."""
    fn, args, dims, steps, data, inner_ndim, array_count = task[0], task[1], task[2], task[3], task[4], task[5], task[6]
    shape = _address_array(dims, inner_ndim + 1)
    stride = _address_array(steps, array_count)
    base = _address_array(args, array_count)
    size = shape[0]
    share, extra = size // threads, size % threads
    if thread < extra:
        share += 1
        extra = 0
    lo = share * thread + extra
    count = shape.copy()
    count[0] = 1
    where = np.empty(array_count, np.int64)
    for r in range(lo, lo + share):
        for j in range(array_count):
            where[j] = base[j] + stride[j] * r if base[j] != 0 else 0
        _call_gufunc(fn, where.ctypes.data, count.ctypes.data, steps, data)


def _worker(task):
    """What each thread of a team runs (``GOMP_parallel``'s function): its share."""
    thread, threads = _team_place()
    _run_share(_address_array(_voidptr_address(task), 7), thread, threads)


_LOOP = types.void(types.int64, types.int64, types.int64, types.int64, types.int64, types.int64, types.int64,
                   types.int32)


def _parallel_for(fn, args, dims, steps, data, inner_ndim, array_count, threads):
    """numba's loop launch: ``fn`` over the outer iterations on ``threads`` threads."""
    task = np.empty(7, np.int64)
    task[0], task[1], task[2], task[3], task[4], task[5], task[6] = fn, args, dims, steps, data, inner_ndim, array_count
    if threads <= 1 or _state(1) != 0:  # (1: forked)
        _run_share(task, 0, 1)  # the calling thread alone: no team to start
    else:
        _start_team(task.ctypes.data, threads)


def _add_task(fn, args, dims, steps, data):
    _call_gufunc(fn, args, dims, steps, data)  # as numba's OpenMP layer: run at once


def _set_num_threads(count):
    _set_state(0, count)


def _get_num_threads():
    return _state(0)


def _get_thread_id():
    return _team_place()[0]


def _nothing():
    pass


def _compiled(runtime: ctypes.CDLL) -> dict[str, int]:
    """The layer's C functions by name (numba's protocol) -> their addresses: compiled (or
    loaded from numba's cache) after the symbols they use are given to llvmlite, the
    worker before the ``parallel_for`` that starts it."""
    for name in _OPENMP:
        ll.add_symbol(_symbol(name), ctypes.cast(getattr(runtime, name), ctypes.c_void_p).value)
    ll.add_symbol(_symbol("layer_state"), ctypes.addressof(_STATE))
    compile = lambda sig, fn: cfunc(sig, cache=True, nopython=True)(fn).address
    ll.add_symbol(_symbol("layer_worker"), compile(types.void(types.voidptr), _worker))
    count = compile(types.void(types.int32), _set_num_threads)
    nothing = compile(types.void(), _nothing)
    return {
        "parallel_for": compile(_LOOP, _parallel_for),
        "add_task": compile(types.void(types.int64, types.int64, types.int64, types.int64, types.int64), _add_task),
        "launch_threads": count,
        "set_num_threads": count,
        "get_num_threads": compile(types.int32(), _get_num_threads),
        "get_thread_id": compile(types.int32(), _get_thread_id),
        "synchronize": nothing,
        "ready": nothing,
    }


def install() -> bool:
    """Make this numba's threading layer (as its "omp" layer), where torch runs on an
    OpenMP runtime this module finds and numba has started no layer yet -> whether it
    did.  Call before the first parallel kernel runs."""
    from numba.np.ufunc import parallel

    if parallel._is_initialized or "numba.np.ufunc.omppool" in sys.modules:
        return False
    runtime = openmp_runtime()
    if runtime is None:
        return False
    functions = _compiled(runtime)
    from numba.np.ufunc import workqueue  # its scheduler functions: numba's own, in every layer

    layer = pytypes.ModuleType("numba.np.ufunc.omppool", __doc__)
    for name in ("do_scheduling_signed", "do_scheduling_unsigned", "allocate_sched", "deallocate_sched",
                 "set_parallel_chunksize", "get_parallel_chunksize", "get_sched_size"):
        setattr(layer, name, getattr(workqueue, name))
    for name, address in functions.items():
        setattr(layer, name, address)
    layer.openmp_vendor = NAME
    sys.modules[layer.__name__] = layer
    numba.config.THREADING_LAYER = "omp"
    return True


def installed() -> bool:
    """Whether numba's "omp" layer is this one."""
    return getattr(sys.modules.get("numba.np.ufunc.omppool"), "openmp_vendor", None) == NAME


def _after_fork() -> None:
    _STATE[1] = 1


# set in every child forked after this import, whichever layer numba runs: the layer
# here reads it, and so does the C++ eager path, which starts teams of torch's threads
# itself (``forked_flag``)
os.register_at_fork(after_in_child=_after_fork)


def forked_flag() -> int:
    """The address of the int64 that is non-zero in a child forked from this process."""
    return ctypes.addressof(_STATE) + ctypes.sizeof(ctypes.c_int64)
