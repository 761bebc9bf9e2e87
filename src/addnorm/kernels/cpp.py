"""The C++ eager path (``addnorm/csrc/eager.cpp``): built once per machine, loaded on the
first call that can use it.

A small DyT, ScaleNorm or RMSNorm call in Python costs more than its kernel (an
``autograd.Function`` alone ~3 µs); the extension runs the same numba kernels, through
their C entry points (``cpu.c_entry_points``), behind a C++ autograd node (DyT's and
ScaleNorm's larger calls too, and channels-last GroupNorm's, their rows or samples across
torch's OpenMP threads: ``_load`` hands it the runtime's functions).  It needs a
C++ compiler and ninja, and it is built by ``addnorm build`` (``make install`` runs it)
with ``torch.utils.cpp_extension`` into ``addnorm/_build/<key>`` beside the package
(or ``~/.cache/addnorm/build/<key>`` where the package's folder is read-only), ``key``
naming the source, torch's and Python's versions.  Without a build every call takes the
Python path: the same kernels and results, slower at small sizes.
``ADDNORM_EAGER_CPP=0`` turns the path off.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch

NAME = "addnorm_eager"
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "eager.cpp"
_FLAGS = ["-O2"]


def _key() -> str:
    text = SOURCE.read_bytes() + f"{torch.__version__} {sys.version} {_FLAGS}".encode()
    return hashlib.sha256(text).hexdigest()[:16]


def _folders() -> list[Path]:
    """Where a build may lie, the package's own folder first."""
    key = _key()
    return [SOURCE.parent.parent / "_build" / key,
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "addnorm" / "build" / key]


def _off() -> bool:
    return os.environ.get("ADDNORM_EAGER_CPP", "1") == "0"


def _library(folder: Path) -> Path:
    return folder / f"{NAME}.so"


def built() -> Path | None:
    """The built extension of this source for this torch and Python, or None."""
    return next((_library(f) for f in _folders() if _library(f).exists()), None)


def build(verbose: bool = False) -> Path:
    """Compile the extension (~20 s on 2 cores, once), and the numba kernels it calls
    (~1.5 min, once), at the same time; the path of the library.  Raises what the
    compiler or ninja raised."""
    from torch.utils import cpp_extension

    from . import cpu

    try:  # pip's ninja (a dependency), whose folder is on PATH only in an activated venv
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass  # a ninja on PATH, or torch says there is none

    for folder in _folders():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            break
    else:
        raise OSError(f"no writable folder for the build among {[str(f) for f in _folders()]}")
    failure = []

    def compile_library():
        try:
            cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=_FLAGS, build_directory=str(folder),
                               verbose=verbose, is_python_module=True)
        except BaseException as e:  # raised below, on the calling thread
            failure.append(e)

    compiling = threading.Thread(target=compile_library, name="addnorm-build")
    compiling.start()  # the compiler runs in its own process while numba compiles here
    compile_kernels()
    compiling.join()
    if failure:
        raise failure[0]
    return _library(folder)


_ROWS = ("rms_norm_forward",)
_COMPILE_ROWS = f"from addnorm.kernels import cpu; cpu.c_entry_points({_ROWS!r})"


def compile_kernels() -> None:
    """The numba kernels the extension calls (``cpu.c_entry_points``), compiled into
    numba's cache where they are not there.  numba compiles on one core: RMSNorm's 32
    kernels in a second process beside the others' (2 cores, with g++ beside them:
    ~95 s where one process took ~125)."""
    from . import cpu

    package_root = str(SOURCE.parent.parent.parent)  # this addnorm, wherever it was imported from
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    helper = subprocess.Popen([sys.executable, "-c", _COMPILE_ROWS], env=env)
    cpu.c_entry_points([name for name in cpu.C_SIGNATURES if name not in _ROWS])
    helper.wait()
    cpu.c_entry_points()  # all, now from the cache (compiled here where the helper failed)


_lock = threading.Lock()
_module = None  # the loaded extension; False: none to load


def module():
    """The extension with its kernels registered, loaded once; None where it is not
    built, its numba kernels are not in numba's cache, or it is turned off."""
    global _module
    if _module is None:
        with _lock:
            if _module is None:
                _module = _load() or False
    return _module or None


def _load():
    path = None if _off() else built()
    if path is None:
        return None
    from . import _torch_threads, cpu

    addresses = cpu.c_entry_points(cached_only=True)
    if addresses is None:
        # numba's cache lacks them: after an edit of kernels/cpu.py, or with another
        # NUMBA_CACHE_DIR than the build's; compiling them here would stall a call ~1.5 min
        warnings.warn("addnorm: the C++ eager path's numba kernels are not in numba's cache (after an "
                      "edit of kernels/cpu.py, or with another NUMBA_CACHE_DIR): small calls take the "
                      "Python path; `addnorm build` compiles them (~1.5 min)", RuntimeWarning, stacklevel=2)
        return None
    spec = importlib.util.spec_from_file_location(NAME, path)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    lanes = [cpu._torch_lanes(t) or 0 for t in (torch.float32, torch.float64)]  # 0: the kernel's own order
    # the extension's threads are torch's OpenMP ones, which a forked child cannot start
    forked = _torch_threads.forked_flag()
    runtime = _torch_threads.openmp_runtime()  # the threads ScaleNorm's rows go to, where there are
    if runtime is not None:
        addresses = dict(addresses, **{f: ctypes.cast(getattr(runtime, f), ctypes.c_void_p).value
                                       for f in _torch_threads._OPENMP})
    ext.register_kernels(addresses, cpu.C_SERIAL_BELOW, cpu._FRESH_MMAP_BYTES, forked, cpu._ROW_BLOCK, *lanes)
    return ext


def state() -> str:
    """"off" (``ADDNORM_EAGER_CPP=0``), "built" or "not built": the bench's header."""
    return "off" if _off() else "built" if built() else "not built"


def status() -> str:
    """One line for ``addnorm info``."""
    return {
        "off": "off (ADDNORM_EAGER_CPP=0)",
        "built": f"built ({built()})",
        "not built": "not built: `addnorm build` compiles it (a C++ compiler, ~1-2 min once)",
    }[state()]
