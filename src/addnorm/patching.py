"""addnorm's norms inside a model that already exists, swapped in place.

    n = addnorm.patch(model)         # every norm addnorm recognises now runs addnorm's kernel
    addnorm.unpatch(model)           # and back

A patched norm stays the same object with the same parameter tensors (nothing is
copied: optimizers, tied weights, hooks and references held elsewhere keep working);
only its class changes.  torch.nn's norms become addnorm's twin class (a subclass of the
torch.nn one).  A model family's own norm class, a ``*RMSNorm`` or ``*LayerNorm`` with a
1-D ``weight`` and an ``eps`` / ``variance_epsilon``, becomes a subclass of itself whose
forward runs addnorm's RMSNorm or LayerNorm.  Which one, with which ``offset`` (Gemma's
``1 + w``) and which casting mode (where bfloat16 / float16 results are rounded), is
decided by what the class computes, not by its name: its own forward runs once on a
copy, in float32 and in bfloat16, beside every candidate, and the candidate that
matches it (bit for bit for an RMSNorm) is chosen.  A class no candidate matches is
left alone and listed under ``verbose=True``.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import _backend
from . import functional as AF
from . import modules as M

__all__ = ["patch", "unpatch", "KINDS"]

KINDS = ("layernorm", "rmsnorm", "groupnorm", "batchnorm", "instancenorm")
_DEFAULT_KINDS = ("layernorm", "rmsnorm", "groupnorm", "batchnorm")

# torch.nn class -> (kind, addnorm's twin)
_TWINS: dict[type, tuple[str, type]] = {
    nn.LayerNorm: ("layernorm", M.LayerNorm),
    nn.RMSNorm: ("rmsnorm", M.RMSNorm),
    nn.GroupNorm: ("groupnorm", M.GroupNorm),
    nn.BatchNorm1d: ("batchnorm", M.BatchNorm1d),
    nn.BatchNorm2d: ("batchnorm", M.BatchNorm2d),
    nn.BatchNorm3d: ("batchnorm", M.BatchNorm3d),
    nn.InstanceNorm1d: ("instancenorm", M.InstanceNorm1d),
    nn.InstanceNorm2d: ("instancenorm", M.InstanceNorm2d),
    nn.InstanceNorm3d: ("instancenorm", M.InstanceNorm3d),
}
_EPS_NAMES = ("variance_epsilon", "eps", "epsilon")
_ORIGINAL = "_addnorm_original"  # instance attribute: the class a patched module had


@dataclass(frozen=True)
class FamilyNorm:
    """What a model family's norm class computes, as addnorm's arguments."""

    kind: str  # "rmsnorm" or "layernorm"
    offset: float  # RMSNorm's scale is weight + offset
    casting_mode: str  # RMSNorm's casting mode
    eps_name: str  # the attribute the module keeps its epsilon in


def patch(
    model: nn.Module,
    norms: str | tuple[str, ...] = _DEFAULT_KINDS,
    backend: str | None = None,
    verbose: bool = False,
) -> int:
    """Swap, in place, every norm of ``model`` of the kinds in ``norms`` (``KINDS``) for
    addnorm's; returns how many it swapped (modules patched before are not counted
    again).  ``backend`` pins the patched norms to one addnorm backend ("numba",
    "torch", ...; ``None``: addnorm chooses per call).  ``verbose`` prints what was swapped
    and every norm-like module left alone, with the reason."""
    kinds = _kinds(norms)
    if backend is not None:
        with _backend.backend(backend):  # an unknown or unavailable backend fails here
            pass
    swapped: dict[str, int] = {}
    left: dict[str, str] = {}
    recognised: dict[type, FamilyNorm | str] = {}  # a class computes what its code says: probed once
    for module in model.modules():
        if getattr(module, _ORIGINAL, None) is not None:
            continue
        cls = type(module)
        if cls.__module__.startswith("addnorm."):  # addnorm's own norms already run its kernels
            continue
        if cls in _TWINS:
            kind, twin = _TWINS[cls]
            if kind not in kinds:
                continue
            if cls is nn.RMSNorm:  # the attributes addnorm's RMSNorm adds to torch's; "gemma"
                module.offset, module.casting_mode = 0.0, "gemma"  # rounds as torch, in its order
            _swap(module, twin if backend is None else _patched_class(twin, backend), backend)
        elif cls.__name__.endswith(("RMSNorm", "LayerNorm")):
            if cls not in recognised:
                recognised[cls] = _recognise(module)
            spec = recognised[cls]
            if isinstance(spec, str):
                left.setdefault(cls.__qualname__, spec)
                continue
            if spec.kind not in kinds:
                continue
            module._addnorm_family = spec
            _swap(module, _patched_class(cls, backend), backend)
        else:
            continue
        swapped[cls.__qualname__] = swapped.get(cls.__qualname__, 0) + 1
    if verbose:
        _report(model, swapped, left)
    return sum(swapped.values())


def unpatch(model: nn.Module) -> int:
    """Restore every norm ``patch`` swapped in ``model``; returns how many."""
    restored = 0
    for module in model.modules():
        original = getattr(module, _ORIGINAL, None)
        if original is None:
            continue
        module.__class__ = original
        for name in (_ORIGINAL, "_addnorm_backend", "_addnorm_family"):
            module.__dict__.pop(name, None)
        if original is nn.RMSNorm:
            for name in ("offset", "casting_mode"):
                module.__dict__.pop(name, None)
        restored += 1
    return restored


def _kinds(norms: str | tuple[str, ...]) -> tuple[str, ...]:
    kinds = (norms,) if isinstance(norms, str) else tuple(norms)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"norms must be among {', '.join(KINDS)}; got {', '.join(map(repr, bad))}")
    return kinds


def _swap(module: nn.Module, cls: type, backend: str | None) -> None:
    module._addnorm_original = type(module)
    module._addnorm_backend = backend
    module.__class__ = cls


# ---------------------------------------------------------------------------
# A model family's own norm class: what it computes, found by running it.
# ---------------------------------------------------------------------------


def _recognise(module: nn.Module) -> FamilyNorm | str:
    """The addnorm arguments that compute what ``module`` computes (``_matches``) in float32
    and bfloat16; or why there are none."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.ndim != 1:
        return "no 1-D weight parameter"
    eps_name = next((n for n in _EPS_NAMES if isinstance(getattr(module, n, None), (int, float))), None)
    if eps_name is None:
        return f"no epsilon attribute ({', '.join(_EPS_NAMES)})"
    try:
        extra = list(inspect.signature(module.forward).parameters)[1:]
    except (TypeError, ValueError):
        extra = []
    if extra:
        return f"its forward takes more than the input ({', '.join(extra)})"
    bias = getattr(module, "bias", None)
    has_bias = isinstance(bias, nn.Parameter)
    candidates = [FamilyNorm("layernorm", 0.0, "torch", eps_name)]
    if not has_bias:
        candidates += [
            FamilyNorm("rmsnorm", offset, mode, eps_name)
            for offset in (0.0, 1.0) for mode in ("gemma", "llama", "none")  # torch's order
        ]
    # on the CPU whatever the model's device (meta included): the probe's values are ours
    probe = copy.deepcopy(module).to_empty(device="cpu").float()
    g = torch.Generator().manual_seed(0)
    d = weight.numel()
    with torch.no_grad():  # values where every candidate computes something different
        probe.weight.copy_(torch.rand(d, generator=g) * 1.5 - 0.25)
        if has_bias:
            probe.bias.copy_(torch.randn(d, generator=g))
    x = torch.randn(8, d, generator=g) * 2 + 0.5
    for dtype in (torch.float32, torch.bfloat16):
        probe = probe.to(dtype)
        xd = x.to(dtype)
        try:
            with torch.no_grad():
                expected = probe(xd)
        except Exception as e:  # noqa: BLE001  (any failure means: not a norm we can stand in for)
            return f"its forward failed on a probe ({type(e).__name__}: {e})"
        if not isinstance(expected, Tensor) or expected.shape != xd.shape:
            return "its forward does not return one tensor of the input's shape"
        candidates = [c for c in candidates if _matches(c, _computed(c, probe, xd), expected)]
    if not candidates:
        return "computes none of addnorm's RMSNorm / LayerNorm variants"
    return candidates[0]


def _computed(spec: FamilyNorm, module: nn.Module, x: Tensor) -> Tensor:
    """What addnorm computes for ``spec`` on x, with the statistics summed by torch itself
    (the reference backend), so that a bit-exact match tests the rounding alone."""
    with torch.no_grad(), _backend.backend("torch"):
        return _family_forward_impl(module, spec, x)


def _matches(spec: FamilyNorm, ours: Tensor, theirs: Tensor) -> bool:
    """Bit for bit for an RMSNorm (whose statistic addnorm sums in torch's order); a
    LayerNorm's mean and variance are summed in an order of its own, so there the last
    bit may differ (one rounding of the output's dtype)."""
    if ours.dtype != theirs.dtype:
        return False
    if spec.kind == "rmsnorm":
        return torch.equal(ours, theirs)
    return torch.allclose(ours, theirs, rtol=2 * torch.finfo(ours.dtype).eps, atol=1e-6)


def _family_forward_impl(module: nn.Module, spec: FamilyNorm, x: Tensor) -> Tensor:
    eps = getattr(module, spec.eps_name)
    d = x.shape[-1]
    if spec.kind == "rmsnorm":
        return AF.rms_norm(x, d, M._state(module, "weight"), eps, offset=spec.offset, casting_mode=spec.casting_mode)
    return AF.layer_norm(x, d, M._state(module, "weight"), M._state(module, "bias", None), eps)


# ---------------------------------------------------------------------------
# Patched classes: made once per (original class, backend), picklable.
# ---------------------------------------------------------------------------

_CLASSES: dict[tuple[type, str | None], type] = {}


def _patched_class(base: type, backend: str | None) -> type:
    """``base`` with addnorm's forward: for a family's norm, ``_family_forward`` (its own
    forward kept for TorchScript); addnorm's own class as it is.  A pinned backend is
    entered around the whole call (``_pinned_call``), so that ``forward`` keeps its
    signature and its TorchScript and torch.fx branches."""
    key = (base, backend)
    if key not in _CLASSES:
        attributes = {"__reduce_ex__": _reduce_ex, "__module__": base.__module__, "__qualname__": base.__qualname__}
        if not issubclass(base, tuple(t for _, t in _TWINS.values())):
            attributes.update(forward=_family_forward, _torch_forward=M._scripted(base.forward))
        if backend is not None:
            attributes["__call__"] = _pinned_call
        _CLASSES[key] = type(base.__name__, (base,), attributes)
    return _CLASSES[key]


def _family_forward(self, hidden_states: Tensor) -> Tensor:
    if _scripting():  # TorchScript compiles the family's own forward
        return self._torch_forward(hidden_states)
    if isinstance(hidden_states, M._Proxy):  # torch.fx: one node, as addnorm's own modules
        return M._fx_call_module(self, hidden_states)
    return _family_forward_impl(self, self._addnorm_family, hidden_states)


_scripting = torch.jit.is_scripting  # (a constant to TorchScript: see ``modules``)


def _pinned_call(self, *args, **kwargs):
    """A module with a pinned backend is called inside ``addnorm.backend``: hooks, forward
    and fx's tracing (which patches ``nn.Module.__call__``, reached through super())
    run inside it."""
    with _backend.backend(self._addnorm_backend):
        return super(type(self), self).__call__(*args, **kwargs)


def _reduce_ex(self, protocol):
    """Pickle and deepcopy by the original class and backend (the patched class is made at
    run time, so pickle could not find it by name)."""
    _, args, *rest = object.__reduce_ex__(self, max(2, protocol))
    return (_new_patched, (self.__class__.__bases__[0], self._addnorm_backend), *rest)


def _new_patched(base: type, backend: str | None):
    return object.__new__(_patched_class(base, backend))


def _report(model: nn.Module, swapped: dict[str, int], left: dict[str, str]) -> None:
    name = type(model).__name__
    if not swapped:
        print(f"addnorm.patch: no norm swapped in {name}")
    for cls, n in sorted(swapped.items()):
        print(f"addnorm.patch: swapped {n} x {cls}")
    for cls, why in sorted(left.items()):
        print(f"addnorm.patch: left {cls} alone: {why}")

