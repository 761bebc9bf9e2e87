"""numba's on-disk cache, made safe for processes that compile at the same time.

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
"""

from __future__ import annotations

import contextlib
import functools
import os

from numba.core import caching

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


def install() -> None:
    """Lock numba's cache index for every function cached in this process (idempotent)."""
    cls = caching.IndexDataCacheFile
    if fcntl is None or getattr(cls.save, "_addnorm_locked", False):
        return
    cls.save = _with_lock(cls.save, exclusive=True)
    cls.load = _with_lock(cls.load, exclusive=False)


install()
