"""numba's on-disk cache, made safe for processes that compile at the same time, and for
kernels that call parallel kernels.

1. Concurrent compiles.

numba keeps one index file per function (signature -> data file) and one data file per
compiled specialization.  ``IndexDataCacheFile.save`` reads the index, takes the first
free data-file number, writes the index, then writes the data, with no lock; ``load``
trusts the index, and the dispatcher runs what it loads without checking its signature.
Two processes that compile different specializations of one kernel into a cold cache
(pytest-xdist workers, DataLoader workers started with spawn, two scripts) can both take
``.1.nbc``: the index then names one signature while the file holds the other's machine
code, and every later process that loads it runs the wrong code (wrong numbers, or a
failure to unbox its arguments).  A stale data file of an older source version can be
picked up the same way.

Here each save holds an exclusive lock on a file beside the index for its whole
read-modify-write, and each load a shared one, so an index and its data always change
together.  Where ``fcntl`` is missing (Windows) numba's own behaviour is kept.

2. A kernel that calls a parallel kernel (``_row_norm_fwd_at`` calls ``_row_norm_fwd``).
The parallel code reaches numba's threading layer through symbols (``numba_parallel_for``,
``get_num_threads``, ...) that exist only once the layer is launched, so a compiled
function that contains a parallel loop is cached with a hook, ``reload_init``, that
launches the layer before its code is loaded.  A caller inherits its callees' hooks, but
only from callees compiled in the same process: a callee loaded from the cache comes
back without them (numba issues #8578 and #9938; the fix, numba PR #9950, is not
released).  A caller compiled on top of a cached callee is then cached without the hook,
and a later process whose first kernel is that caller jumps to address 0 and dies of a
segmentation fault.  Three processes suffice: one that compiles the callee alone (a
script, or ``addnorm bench``'s bandwidth check, which calls ``_row_norm_fwd`` directly),
one that then compiles the caller for the same types, and a fresh one whose first kernel
is a small RMSNorm.  Here a function loaded from the cache keeps its hooks on its code
library, as one compiled in the process has them, so that its callers inherit them.

3. The same specialization compiled twice.

Two processes that want one specialization of a kernel at the same time (the test
suite's two workers, DataLoader workers, two scripts) both miss the cache and both
compile it, a few seconds each: ~70 of the suite's ~630 s of compiling, cold.  Here an
addnorm kernel's compile holds a lock on its (function, signature) across processes
while it looks in the cache and compiles: the second process waits for the first and
then loads what the first saved.
"""

from __future__ import annotations

import contextlib
import functools
import os
import zlib

from numba.core import caching, compiler, dispatcher, sigutils
from numba.core.compiler_lock import global_compiler_lock

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


@contextlib.contextmanager
def _locked(index_path: str, exclusive: bool):
    try:
        os.makedirs(os.path.dirname(index_path), exist_ok=True)
        handle = open(index_path + ".lock", "a+b")
    except OSError:  # a read-only cache folder: numba itself will not write there either
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _with_lock(method, exclusive: bool):
    @functools.wraps(method)
    def locked(self, *args):
        with _locked(self._index_path, exclusive):
            return method(self, *args)

    locked._addnorm_locked = True
    return locked


def _keeping_reload_hooks(rebuild):
    """``CompileResult._rebuild`` (a classmethod's function): the same, with the result's
    ``reload_init`` hooks put back on its library, where a caller compiled later looks
    for them (part 2 above)."""

    @functools.wraps(rebuild)
    def rebuilt(cls, *args, **kwargs):
        result = rebuild(cls, *args, **kwargs)
        hooks = getattr(result.library, "_reload_init", None)
        if hooks is not None and result.reload_init:
            hooks.update(result.reload_init)
        return result

    rebuilt._addnorm_keeps_hooks = True
    return classmethod(rebuilt)


_compile_locks: dict[str, object] = {}  # lock file -> its handle, open for the process's life


@contextlib.contextmanager
def _signature_locked(index_path: str, args):
    """An exclusive lock, across processes, on one byte of the file beside a function's
    cache index, at an offset from its signature (part 3 above).  POSIX record locks
    (``lockf``), not ``flock``: a process owns them, not a file handle, so a nested
    compile in the same process never waits for itself; the handle stays open, because
    closing any handle of the file would drop every lock the process holds on it."""
    path = index_path + ".compiling"
    handle = _compile_locks.get(path)
    if handle is None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            handle = _compile_locks[path] = open(path, "a+b")
        except OSError:  # a read-only cache folder: nothing is saved there to wait for
            yield
            return
    offset = zlib.crc32(str(tuple(args)).encode()) & 0x3FFFFFFF
    fcntl.lockf(handle, fcntl.LOCK_EX, 1, offset)
    try:
        yield
    finally:
        fcntl.lockf(handle, fcntl.LOCK_UN, 1, offset)


def _compiling_once(compile_):
    """``Dispatcher.compile``: for addnorm's kernels cached on disk, under the lock of
    its signature (part 3 above), taken inside numba's compiler lock, which numba takes
    first anyway, so that a thread holding that one and compiling a callee never waits
    for a thread that holds the callee's file lock and waits for the compiler lock."""

    @functools.wraps(compile_)
    def compile(self, sig):
        index = getattr(getattr(self._cache, "_cache_file", None), "_index_path", None)
        if index is None or not getattr(self.py_func, "__module__", "").startswith("addnorm."):
            return compile_(self, sig)
        args, _ = sigutils.normalize_signature(sig)
        if tuple(args) in self.overloads:
            return compile_(self, sig)
        with global_compiler_lock, _signature_locked(index, args):
            return compile_(self, sig)

    compile._addnorm_once = True
    return compile


def install() -> None:
    """Lock numba's cache index for every function cached in this process, keep the
    reload hooks of every function loaded from it, and compile each specialization of
    an addnorm kernel in one process at a time (idempotent)."""
    result = compiler.CompileResult
    if not getattr(result._rebuild, "_addnorm_keeps_hooks", False):
        result._rebuild = _keeping_reload_hooks(result._rebuild.__func__)
    if fcntl is not None and not getattr(dispatcher.Dispatcher.compile, "_addnorm_once", False):
        dispatcher.Dispatcher.compile = _compiling_once(dispatcher.Dispatcher.compile)
    cls = caching.IndexDataCacheFile
    if fcntl is None or getattr(cls.save, "_addnorm_locked", False):
        return
    cls.save = _with_lock(cls.save, exclusive=True)
    cls.load = _with_lock(cls.load, exclusive=False)


install()
