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
"""

from __future__ import annotations

import contextlib
import functools
import os

from numba.core import caching, compiler

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


def install() -> None:
    """Lock numba's cache index for every function cached in this process, and keep the
    reload hooks of every function loaded from it (idempotent)."""
    result = compiler.CompileResult
    if not getattr(result._rebuild, "_addnorm_keeps_hooks", False):
        result._rebuild = _keeping_reload_hooks(result._rebuild.__func__)
    cls = caching.IndexDataCacheFile
    if fcntl is None or getattr(cls.save, "_addnorm_locked", False):
        return
    cls.save = _with_lock(cls.save, exclusive=True)
    cls.load = _with_lock(cls.load, exclusive=False)


install()
