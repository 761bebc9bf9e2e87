"""addnorm's norms inside a model that already exists, swapped in place.

    n = addnorm.patch(model)         # every norm addnorm recognises now runs addnorm's kernel
    addnorm.unpatch(model)           # and back

A patched norm stays the same object with the same parameter tensors (nothing is
copied: optimizers, tied weights, hooks and references held elsewhere keep working);
only its class changes.  torch.nn's norms become addnorm's twin class (a subclass of the
torch.nn one; torch.nn.SyncBatchNorm becomes addnorm's, which runs on CPU tensors too).
A model family's own norm class, a ``*RMSNorm`` or ``*LayerNorm`` whose forward takes
the input alone, becomes a subclass of itself whose forward runs
addnorm's RMSNorm or LayerNorm: with its 1-D ``weight`` (and ``bias``) parameters, or
with none (OLMo's LayerNorm, nanochat's and DeepSeek-V4's RMSNorms), and its ``eps`` /
``variance_epsilon`` / ``epsilon``, or, where it keeps none, the epsilon its code has.
Which norm, with which ``offset`` (Gemma's ``1 + w``), which casting mode (where
bfloat16 / float16 results are rounded) and, where the class keeps none, which epsilon
(``_EPS_GUESSES``), is decided by what the class computes, not by its name: its own
forward runs once on a copy, in float32 and in bfloat16, beside every candidate, and
the candidate that matches it (bit for bit for an RMSNorm) is chosen.  A class no
candidate matches is left alone and listed under ``verbose=True``.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, replace

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
    nn.SyncBatchNorm: ("batchnorm", M.SyncBatchNorm),  # (no subclass of torch's: its docstring says why)
    nn.InstanceNorm1d: ("instancenorm", M.InstanceNorm1d),
    nn.InstanceNorm2d: ("instancenorm", M.InstanceNorm2d),
    nn.InstanceNorm3d: ("instancenorm", M.InstanceNorm3d),
}
_EPS_NAMES = ("variance_epsilon", "eps", "epsilon")
# The epsilons a norm class that keeps none in an attribute is tried with (OLMo's
# LayerNorm writes 1e-5 in its forward): torch's default, Llama's, a small one, and
# float32's machine epsilon (torch.rms_norm's eps=None)
_EPS_GUESSES = (1e-5, 1e-6, 1e-8, float(torch.finfo(torch.float32).eps))
_ORIGINAL = "_addnorm_original"  # instance attribute: the class a patched module had


@dataclass(frozen=True)
class FamilyNorm:
    """What a model family's norm class computes, as addnorm's arguments."""

    kind: str  # "rmsnorm" or "layernorm"
    offset: float  # RMSNorm's scale is weight + offset
    casting_mode: str  # RMSNorm's casting mode
    eps_name: str | None  # the attribute the module keeps its epsilon in; None: ``eps``
    eps: float = 0.0  # the epsilon, where the module keeps none (its code has it)
    weighted: bool = True  # whether the module's ``weight`` parameter scales the output
    # whether addnorm computes what the module does for a float16/bfloat16 input beside
    # float32 parameters (a model that keeps its norms in float32); where not, such a
    # call runs the module's own forward
    mixed: bool = True


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
    and bfloat16 (and, for ``mixed``, with float32 parameters beside a bfloat16 input);
    or why there are none."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    weighted, has_bias = isinstance(weight, nn.Parameter), isinstance(bias, nn.Parameter)
    if (weighted and weight.ndim != 1) or (has_bias and bias.ndim != 1):
        return "a weight or bias parameter that is not 1-D"
    try:
        extra = list(inspect.signature(module.forward).parameters)[1:]
    except (TypeError, ValueError):
        extra = []
    if extra:
        return f"its forward takes more than the input ({', '.join(extra)})"
    eps_name = next((n for n in _EPS_NAMES if isinstance(getattr(module, n, None), (int, float))), None)
    epsilons = (0.0,) if eps_name else _EPS_GUESSES
    candidates = [FamilyNorm("layernorm", 0.0, "torch", eps_name, eps, weighted) for eps in epsilons]
    if not has_bias:
        candidates += [
            FamilyNorm("rmsnorm", offset, mode, eps_name, eps, weighted)
            for eps in epsilons
            for offset in ((0.0, 1.0) if weighted else (0.0,))
            for mode in ("gemma", "llama", "none")  # torch's order
        ]
    # on the CPU whatever the model's device (meta included): the probe's values are ours
    probe = copy.deepcopy(module).to_empty(device="cpu").float()
    g = torch.Generator().manual_seed(0)
    d = weight.numel() if weighted else _width(module)
    with torch.no_grad():  # values where every candidate computes something different
        # (a weight or bias kept as a buffer too: where the forward reads one, no
        # candidate, which would not, matches)
        for name in ("weight", "bias"):
            t = getattr(probe, name, None)
            if isinstance(t, Tensor) and t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 - 0.25)
    x = torch.randn(8, d, generator=g) * 2 + 0.5
    if eps_name is None:  # rows whose variance is near the epsilons, so that they tell them apart
        x = torch.cat([x, x[:4] * 3e-4])
    x = x.reshape(-1, 4, d)  # (batch, tokens, d): a norm over another dim than the last differs
    for dtype in (torch.float32, torch.bfloat16):
        probe, xd = probe.to(dtype), x.to(dtype)
        expected = _probed(probe, xd)
        if isinstance(expected, str):
            return expected
        candidates = [c for c in candidates if _matches(c, _computed(c, probe, xd), expected)]
        if not candidates:
            return "computes none of addnorm's RMSNorm / LayerNorm variants"
    # float32 parameters beside a bfloat16 input (a model that keeps its norms in float32)
    # run addnorm only where a candidate computes what the module does there too
    probe, xd = probe.float(), x.bfloat16()
    expected = _probed(probe, xd)
    for c in candidates if isinstance(expected, Tensor) else ():
        if _matches(c, _computed(c, probe, xd), expected):
            return c
    return replace(candidates[0], mixed=False)


def _probed(probe: nn.Module, x: Tensor) -> Tensor | str:
    """The module's output for x, or why it gave none that a norm would."""
    try:
        with torch.no_grad():
            out = probe(x)
    except Exception as e:  # noqa: BLE001  (any failure means: not a norm we can stand in for)
        return f"its forward failed on a probe ({type(e).__name__}: {e})"
    if not isinstance(out, Tensor) or out.shape != x.shape:
        return "its forward does not return one tensor of the input's shape"
    return out


def _width(module: nn.Module) -> int:
    """The row width to probe a norm without a weight parameter with: the size it was
    built for, where it keeps one (OLMo's ``normalized_shape``; a weight buffer), else
    any (a norm over the last dim of whatever comes in)."""
    for name in ("normalized_shape", "hidden_size"):
        size = getattr(module, name, None)
        if isinstance(size, (tuple, list)) and size:
            size = size[-1]
        if isinstance(size, int) and size > 0:
            return size
    weight = getattr(module, "weight", None)
    return weight.numel() if isinstance(weight, Tensor) and weight.ndim == 1 and weight.numel() else 64


def _computed(spec: FamilyNorm, module: nn.Module, x: Tensor) -> Tensor:
    """What addnorm computes for ``spec`` on x, with the statistics summed by torch itself
    (the reference backend), so that a bit-exact match tests the rounding alone."""
    with torch.no_grad(), _backend.backend("torch"):
        return _family_norm(spec, x, *_family_state(module, spec))


def _matches(spec: FamilyNorm, ours: Tensor, theirs: Tensor) -> bool:
    """Bit for bit for an RMSNorm (whose statistic addnorm sums in torch's order); a
    LayerNorm's mean and variance are summed in an order of its own, so there the last
    bit may differ (one rounding of the output's dtype)."""
    if ours.dtype != theirs.dtype:
        return False
    if spec.kind == "rmsnorm":
        return torch.equal(ours, theirs)
    return torch.allclose(ours, theirs, rtol=2 * torch.finfo(ours.dtype).eps, atol=1e-6)


def _family_state(module: nn.Module, spec: FamilyNorm) -> tuple[Tensor | None, Tensor | None, float | None]:
    """(weight, bias, eps) of a family's norm, as ``spec`` says it computes."""
    eps = spec.eps if spec.eps_name is None else getattr(module, spec.eps_name)
    weight = M._state(module, "weight") if spec.weighted else None
    return weight, M._state(module, "bias", None) if spec.kind == "layernorm" else None, eps


def _family_norm(spec: FamilyNorm, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps) -> Tensor:
    if spec.kind == "rmsnorm":
        return AF.rms_norm(x, x.shape[-1], weight, eps, offset=spec.offset, casting_mode=spec.casting_mode)
    return AF.layer_norm(x, x.shape[-1], weight, bias, eps)


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
    spec = self._addnorm_family
    weight, bias, eps = _family_state(self, spec)
    dtype = hidden_states.dtype
    if (weight is not None and weight.dtype is not dtype) or (bias is not None and bias.dtype is not dtype):
        # the dtypes the recognition probed: parameters in the input's dtype, or float32
        # ones beside a float16/bfloat16 input where the module's own code was found to
        # compute what addnorm does there (``mixed``); any other mix runs the module's
        # own forward, whose result there was not seen
        if not (spec.mixed and dtype in AF._REDUCED and all(t is None or t.dtype is torch.float32 for t in (weight, bias))):
            return self._torch_forward(hidden_states)
    return _family_norm(spec, hidden_states, weight, bias, eps)


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

