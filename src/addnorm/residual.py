"""Where the norm sits around a residual connection: one ``Residual`` per placement.

A Transformer layer is ``x -> x + F(x)`` with a norm somewhere; the placements differ in
where (formulas in ``Residual``'s docstring).  ``Residual`` wraps one sublayer F (an
attention or a feed-forward block) and one norm, and runs alone (``forward(x)``) or in a
stack that defers each residual add into the next norm (``step``), so that a Pre-LN stack
calls one fused ``add_rms_norm``/``add_layer_norm`` per sublayer instead of an add and a
norm (one pass over memory, as vLLM and flash-attn do).
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import functional as AF
from .functional import ArgumentError
from .modules import LayerNorm, RMSNorm, _state

PLACEMENTS = ("post", "pre", "sandwich", "peri", "deepnorm", "subln", "rezero", "layerscale", "lns")
# placements of the form x + G(norm(x)): their add can wait for the next norm
_DEFERRING = ("pre", "sandwich", "peri", "subln", "layerscale", "lns")


def add_norm(norm: nn.Module, x: Tensor, residual: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(norm(x + residual), x + residual)``: one fused kernel for a LayerNorm or RMSNorm
    (addnorm's or torch.nn's, with their own parameters), an add and a call otherwise
    (with the padding ``mask`` for a norm that reads one)."""
    if not _fusable(norm):
        r = x + residual
        return normed(norm, r, mask), r
    if isinstance(norm, nn.LayerNorm):
        return AF.add_layer_norm(
            x, residual, norm.normalized_shape, _state(norm, "weight"), _state(norm, "bias"), norm.eps
        )
    offset = getattr(norm, "offset", 0.0)
    return AF.add_rms_norm(x, residual, norm.normalized_shape, _state(norm, "weight"), norm.eps, offset=offset)


def _fusable(norm: nn.Module) -> bool:
    """A LayerNorm or RMSNorm that computes what its class's forward says (not a subclass
    with a forward of its own): its add can be fused."""
    return type(norm).forward in _FUSABLE_FORWARDS


_FUSABLE_FORWARDS = (nn.LayerNorm.forward, nn.RMSNorm.forward, LayerNorm.forward, RMSNorm.forward)


def normed(norm: nn.Module, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """norm(x), with the padding mask for a norm that reads one (BatchNorm over tokens)."""
    return norm(x, mask) if getattr(norm, "takes_mask", False) else norm(x)


def norm_stream(norm: nn.Module, x: Tensor, pending: Tensor | None, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(norm(s), s)`` for the residual stream s = x + pending (x where pending is None),
    the deferred add fused into the norm (``add_norm``)."""
    if pending is None:
        return normed(norm, x, mask), x
    return add_norm(norm, pending, x, mask)


def scale_init_(sublayer: nn.Module, scale: float) -> None:
    """Multiply the sublayer's value, output and feed-forward projections by ``scale``
    after its own init, as torchscale does for DeepNorm (scale β) and SubLN (scale γ);
    query and key projections keep theirs.  A sublayer that knows its own layout defines
    ``scale_init_(scale)``; otherwise every ``nn.Linear`` weight is scaled except those of
    modules named like a query or key projection (``q_proj``, ``k_proj``, ``query``,
    ``key``, ``q``, ``k``)."""
    if hasattr(sublayer, "scale_init_"):
        sublayer.scale_init_(scale)
        return
    with torch.no_grad():
        for name, module in sublayer.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in _QUERY_KEY:
                module.weight.mul_(scale)


_QUERY_KEY = {"q_proj", "k_proj", "query", "key", "q", "k"}


def _width(norm: nn.Module | None, dim: int | None) -> int:
    if dim is not None:
        return dim
    shape = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)
    if shape is None:
        weight = getattr(norm, "weight", None)
        shape = None if weight is None else weight.shape
    if shape is None:
        raise ArgumentError("layerscale needs dim= (the model width): it cannot be read from the norm")
    return int(shape) if isinstance(shape, int) else math.prod(shape)


class Residual(nn.Module):
    r"""One residual connection around ``sublayer`` F, with ``norm`` placed by ``placement``:

    =============  ==============================================  =========================
    placement      x_{l+1} =                                       paper
    =============  ==============================================  =========================
    ``post``       N(x + F(x))                                     Vaswani et al. 2017
    ``pre``        x + F(N(x))                                     Xiong et al. 2020
    ``sandwich``   x + N₂(F(N(x)))  (alias ``peri``)               CogView 2021; Peri-LN 2025
    ``deepnorm``   N(α·x + F(x)), F's v/out/ffn init × β           DeepNet 2022
    ``subln``      x + F(N(x)), F with its own norm before its     Magneto (Foundation
                   output projection, v/out/ffn init × γ           Transformers) 2022
    ``rezero``     x + a·F(x), scalar a = 0 at init, no norm       ReZero 2020
    ``layerscale`` x + diag(λ)·F(N(x)), λ = ``init_scale`` at init  CaiT 2021
    ``lns``        x + F(N(x) / √ℓ), ℓ = ``layer`` (from 1)         LayerNorm Scaling 2025
    =============  ==============================================  =========================

    Arguments:
        sublayer: F, a module mapping (..., d) to (..., d).
        norm: N, any norm module (addnorm's or torch.nn's); None only for ``rezero``.
        alpha: DeepNorm's α (``deepnorm_coefficients``); default 1.
        init_scale: DeepNorm's β, SubLN's γ (F's value, output and feed-forward weights
            are multiplied by it at construction, see ``scale_init_``), or LayerScale's
            initial λ (default 1e-4); None leaves F's init alone.
        layer: the layer's index ℓ (from 1) for ``lns``.
        norm2: ``sandwich``'s second norm N₂ (default: a fresh copy of ``norm``).
        dim: the model width, for ``layerscale`` where it cannot be read from ``norm``.

    A ``subln`` sublayer must hold its inner norm itself, as an attribute ``inner_norm``
    that is not ``nn.Identity`` (the builder's attention and MLP do).  Shapes: x (..., d)
    in and out.
    """

    def __init__(
        self,
        sublayer: nn.Module,
        norm: nn.Module | None,
        placement: str = "pre",
        *,
        alpha: float = 1.0,
        init_scale: float | None = None,
        layer: int = 1,
        norm2: nn.Module | None = None,
        dim: int | None = None,
    ) -> None:
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}; got {placement!r}")
        if (norm is None) != (placement == "rezero"):
            need = "takes no norm (pass norm=None)" if placement == "rezero" else "needs a norm"
            raise ArgumentError(f"placement {placement!r} {need}")
        if placement == "subln" and isinstance(getattr(sublayer, "inner_norm", nn.Identity()), nn.Identity):
            raise ArgumentError(
                "placement 'subln' needs a sublayer with a norm before its output projection "
                "(an attribute inner_norm that is not nn.Identity)"
            )
        if placement == "lns" and not (isinstance(layer, int) and layer >= 1):
            raise ArgumentError(f"layer must be an int >= 1 for 'lns', got {layer!r}")
        self.placement = "sandwich" if placement == "peri" else placement
        self.sublayer, self.norm = sublayer, norm
        if alpha != 1.0 and self.placement != "deepnorm":
            raise ArgumentError(f"alpha applies to placement 'deepnorm' only, got alpha={alpha} for {placement!r}")
        self.alpha = float(alpha)
        self.layer = layer
        # DeepNorm's β or SubLN's γ, kept so that a model re-initializing its weights can
        # apply it again (``scale_init_``)
        self.init_scale = init_scale if self.placement in ("deepnorm", "subln") else None
        if self.placement == "sandwich":
            self.norm2 = norm2 if norm2 is not None else copy.deepcopy(norm)
        if self.placement == "rezero":
            self.gate = nn.Parameter(torch.zeros(()))
        if self.placement == "layerscale":
            scale = 1e-4 if init_scale is None else init_scale
            self.gamma = nn.Parameter(torch.full((_width(norm, dim),), float(scale)))
        elif init_scale is not None and self.placement in ("deepnorm", "subln"):
            scale_init_(sublayer, init_scale)

    def extra_repr(self) -> str:
        extra = f"placement={self.placement!r}"
        if self.placement == "deepnorm":
            extra += f", alpha={self.alpha:.4g}"
        if self.placement == "lns":
            extra += f", layer={self.layer}"
        return extra

    def branch(self, h: Tensor, **kw) -> Tensor:
        """G(h) of a deferring placement, x_{l+1} = x + G(N(x)): F and what wraps it."""
        if self.placement == "lns":
            h = h * (1.0 / math.sqrt(self.layer))
        out = self.sublayer(h, **kw)
        if self.placement == "sandwich":
            out = normed(self.norm2, out, kw.get("mask"))
        elif self.placement == "layerscale":
            out = out * self.gamma
        return out

    def step(self, x: Tensor, pending: Tensor | None = None, **kw) -> tuple[Tensor, Tensor | None]:
        """One layer inside a stack: the stream is ``x + pending`` (pending None: x), and so
        is the result.  A deferring placement returns its branch as the new ``pending``,
        for the next norm to add in its fused kernel; the others return pending None.
        It runs through the module's call, so forward hooks see ``(x, pending)``."""
        return self(x, pending, stack=True, **kw)

    def _step(self, x: Tensor, pending: Tensor | None, kw: dict) -> tuple[Tensor, Tensor | None]:
        mask = kw.get("mask")
        if self.placement in _DEFERRING:
            h, r = norm_stream(self.norm, x, pending, mask)
            return r, self.branch(h, **kw)
        if pending is not None:
            x = x + pending
        if self.placement == "rezero":
            return x + self.gate * self.sublayer(x, **kw), None
        residual = x if self.alpha == 1.0 else x * self.alpha
        return add_norm(self.norm, self.sublayer(x, **kw), residual, mask)[0], None

    def forward(self, x: Tensor, pending: Tensor | None = None, *, stack: bool = False, **kw):
        """x_{l+1} for input x (plus ``pending``); keyword arguments go to the sublayer.
        ``stack=True`` is ``step``: the result as ``(x, pending)``, the add deferred."""
        x, pending = self._step(x, pending, kw)
        if stack:
            return x, pending
        return x if pending is None else x + pending


class DeepNormCoefficients(NamedTuple):
    """DeepNorm's α (residual scale) and β (init scale) per stack; None where a stack is absent."""

    encoder_alpha: float | None
    encoder_beta: float | None
    decoder_alpha: float | None
    decoder_beta: float | None


def deepnorm_coefficients(encoder_layers: int, decoder_layers: int) -> DeepNormCoefficients:
    """DeepNorm's α and β (DeepNet, Wang et al. 2022, table 1), for N encoder and M
    decoder layers (0 for an absent stack).

    Encoder-only (M = 0) or decoder-only (N = 0) with L layers: α = (2L)^¼, β = (8L)^-¼.
    Encoder-decoder: encoder α = 0.81·(N⁴M)^1/16, β = 0.87·(N⁴M)^-1/16;
    decoder α = (3M)^¼, β = (12M)^-¼.
    """
    for name, n in (("encoder_layers", encoder_layers), ("decoder_layers", decoder_layers)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ArgumentError(f"{name} must be an int >= 0, got {n!r}")
    n, m = encoder_layers, decoder_layers
    if n == 0 and m == 0:
        raise ArgumentError("deepnorm_coefficients needs at least one layer (encoder_layers or decoder_layers >= 1)")
    if m == 0:
        return DeepNormCoefficients((2 * n) ** 0.25, (8 * n) ** -0.25, None, None)
    if n == 0:
        return DeepNormCoefficients(None, None, (2 * m) ** 0.25, (8 * m) ** -0.25)
    return DeepNormCoefficients(
        0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16), (3 * m) ** 0.25, (12 * m) ** -0.25
    )


__all__ = ["Residual", "add_norm", "scale_init_", "deepnorm_coefficients", "DeepNormCoefficients", "PLACEMENTS"]
