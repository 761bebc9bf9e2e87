"""Which implementation runs an op: the registry of backends and the choice among them.

A backend is a module exposing the kernel functions of ``addnorm.reference`` under the
same names and signatures (``row_norm_forward``, ``row_norm_backward``, ...).  A backend
that lacks one of them runs that op on the reference.  Backends load lazily, on first
use, so ``import addnorm`` compiles and imports no kernel framework.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Iterator
from types import ModuleType

import torch

from . import reference

# name -> (module that implements it, packages it needs)
_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "torch": ("addnorm.reference", ()),
    "numba": ("addnorm.kernels.cpu", ("numba",)),
    "triton": ("addnorm.kernels.gpu", ("triton",)),
}
# The fastest first: the default for a device is the first available one.
_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("numba", "torch"),
    "cuda": ("triton", "torch"),
}
_loaded: dict[str, ModuleType] = {"torch": reference}


class _Choice:
    """The backend forced by ``with addnorm.backend(name)``; None picks per device."""

    forced: str | None = None


def _probe(name: str) -> bool:
    """Whether backend ``name`` can load here, found without importing anything."""
    module, needs = _SOURCES[name]
    try:
        return all(importlib.util.find_spec(p) is not None for p in needs) and (
            importlib.util.find_spec(module) is not None
        )
    except ModuleNotFoundError:
        return False


# Probed once, at import (a lookup, no import): ``select`` runs inside traced code,
# where torch.compile should see a plain dict read.
_AVAILABLE: dict[str, bool] = {name: _probe(name) for name in _SOURCES}


_RETIRED: dict[str, str] = {}  # backend -> why it can no longer run in this process


def _defaults() -> dict[str, str]:
    """Each device type's default backend: its first available one."""
    return {
        device: next((name for name in names if _AVAILABLE[name]), "torch")
        for device, names in _PREFERENCE.items()
    }


_DEFAULT = _defaults()  # read on every call (``select``), so worked out once


def retire(name: str, why: str) -> None:
    """Stop choosing backend ``name`` in this process (the default falls to the next one;
    forcing it raises with ``why``)."""
    _AVAILABLE[name] = False
    _RETIRED[name] = why
    _DEFAULT.update(_defaults())


def backends() -> dict[str, bool]:
    """Every backend addnorm knows, and whether it can run here.

    ``torch``: ``reference``'s plain torch ops, on any device.  ``numba``: the CPU
    kernels, the default for CPU tensors.  ``triton`` (``pip install addnorm[gpu]``): the
    default for CUDA tensors; LayerNorm and RMSNorm (with and without the fused residual
    add, RMSNorm's casting modes), GroupNorm / InstanceNorm and DyT, forward and
    backward, are Triton kernels; BatchNorm runs torch's own kernel there (cuDNN's, by
    ``functional``'s rule), ScaleNorm the reference's torch ops on the GPU.  On CPU
    tensors it runs only through Triton's interpreter (``TRITON_INTERPRET=1`` set before
    addnorm loads it), as the tests do.

    >>> addnorm.backends()
    {'torch': True, 'numba': True, 'triton': False}
    """
    return dict(_AVAILABLE)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run every addnorm op inside the block on backend ``name``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` for a known
    backend that is not available here.  Blocks nest; leaving one restores the
    previous choice.  The choice is process-wide (a plain global, which torch.compile
    reads as a guarded constant), not per thread.
    """
    if name not in _SOURCES:
        raise ValueError(f"backend must be one of {sorted(_SOURCES)}, got {name!r}")
    if not _AVAILABLE[name]:
        why = _RETIRED.get(name) or "it needs " + (", ".join(_SOURCES[name][1]) or name)
        raise RuntimeError(f"backend {name!r} is not available here: {why}")
    previous, _Choice.forced = _Choice.forced, name
    try:
        yield
    finally:
        _Choice.forced = previous


def forced() -> bool:
    """Whether ``with addnorm.backend(name)`` chose the backend (else addnorm chooses)."""
    return _Choice.forced is not None


def select(device: torch.device) -> str:
    """The backend an op on a tensor of ``device`` runs on (``functional._forward`` reads
    the same two things inline, without making the tensor's device object)."""
    return _Choice.forced or _DEFAULT.get(device.type, "torch")


def kernel(backend_name: str, function: str):
    """The function implementing ``function`` on ``backend_name``, loaded on first use."""
    module = _loaded.get(backend_name)
    if module is None:
        module = _loaded[backend_name] = importlib.import_module(_SOURCES[backend_name][0])
    return getattr(module, function, None) or getattr(reference, function)
