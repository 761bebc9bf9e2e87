"""A Transformer built from addnorm's norms and placements, in the spirit of nanoGPT's
model.py: embeddings, a stack of blocks (attention and MLP, each inside a ``Residual``),
a final norm where the placement needs one, and a tied language-model head.

    model = addnorm.Transformer("decoder", vocab_size=65, d_model=128, n_heads=4,
                                n_layers=4, norm="rmsnorm", placement="pre")
    logits, loss = model(idx, targets)
    model.generate(idx, 100, top_k=10)

Placements that span layers are the builder's: ``mixln`` (Post-LN in the first
``mixln_fraction`` of the layers, Pre-LN after), ``resi-dual`` (a Post-LN stream plus a
stream that sums every sublayer's output, normed once at the end) and ``hyper``
(hyper-connections: ``streams`` parallel residual streams with learned mixing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import ArgumentError
from .modules import BatchNorm1d, DyT, LayerNorm, RMSNorm, ScaleNorm
from .residual import PLACEMENTS, Residual, add_norm, deepnorm_coefficients, norm_stream, normed, scale_init_

KINDS = ("decoder", "encoder", "encoder-decoder")
_FUSED = {"c_attn": 3, "kv_proj": 2}  # Linear layers that hold several projections, one per row block
NORMS = ("layernorm", "rmsnorm", "scalenorm", "dyt", "batchnorm", "none")
BUILDER_PLACEMENTS = tuple(p for p in PLACEMENTS if p != "peri") + ("mixln", "resi-dual", "hyper")
# placements whose stack ends un-normalized, so the model adds a final norm
_FINAL_NORM = ("pre", "sandwich", "subln", "layerscale", "lns", "rezero", "mixln", "resi-dual", "hyper")


class TokenBatchNorm(BatchNorm1d):
    """BatchNorm over the tokens of (B, T, d) input: statistics over every real token of
    the batch, padding excluded (``mask`` (B, T), True for a real token; padded positions
    pass through unchanged).  Arguments and state as :class:`BatchNorm1d` over d features."""

    takes_mask = True

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if mask is None:
            return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        return x.masked_scatter(mask[..., None], super().forward(x[mask]))


def make_norm(kind: str, d: int) -> nn.Module:
    """A norm of width d by name (``NORMS``; "none" is ``nn.Identity``)."""
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {kind!r}")
    return {
        "layernorm": LayerNorm,
        "rmsnorm": RMSNorm,
        "scalenorm": ScaleNorm,
        "dyt": DyT,
        "batchnorm": TokenBatchNorm,
        "none": lambda d: nn.Identity(),
    }[kind](d)


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``: self-attention
    (``c_attn`` projects q, k, v at once) or, with ``cross=True``, attention to an encoder's
    ``memory`` (``q_proj``, ``kv_proj``).  ``qk_norm`` norms q and k per head; ``inner_norm``
    (SubLN) norms the heads' output before ``c_proj``."""

    def __init__(self, d: int, n_heads: int, *, causal: bool, cross: bool = False, dropout: float = 0.0,
                 qk_norm: str | None = None, inner_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.n_heads, self.causal, self.cross, self.dropout = n_heads, causal, cross, dropout
        if cross:
            self.q_proj, self.kv_proj = nn.Linear(d, d), nn.Linear(d, 2 * d)
        else:
            self.c_attn = nn.Linear(d, 3 * d)
        head = d // n_heads
        self.q_norm = make_norm(qk_norm, head) if qk_norm else nn.Identity()
        self.k_norm = make_norm(qk_norm, head) if qk_norm else nn.Identity()
        self.inner_norm = inner_norm or nn.Identity()
        self.c_proj = nn.Linear(d, d)
        self.resid_dropout = nn.Dropout(dropout)

    def scale_init_(self, scale: float) -> None:
        """Scale the value and output projections (DeepNorm's β, SubLN's γ)."""
        name = "kv_proj" if self.cross else "c_attn"  # v is its last projection
        v = getattr(self, name).weight
        with torch.no_grad():
            v[-v.shape[0] // _FUSED[name]:].mul_(scale)
            self.c_proj.weight.mul_(scale)

    def forward(self, x: Tensor, mask: Tensor | None = None, memory: Tensor | None = None,
                memory_mask: Tensor | None = None, **_) -> Tensor:
        B, T, d = x.shape
        if self.cross:
            q, (k, v) = self.q_proj(x), self.kv_proj(memory).split(d, dim=-1)
            keys_mask = memory_mask
        else:
            q, k, v = self.c_attn(x).split(d, dim=-1)
            keys_mask = mask
        q, k, v = (t.view(B, t.shape[1], self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        q, k = self.q_norm(q), self.k_norm(k)
        attn_mask, is_causal = None, self.causal and not self.cross
        if keys_mask is not None:  # padding: no query attends to a padded key (but itself)
            attn_mask = keys_mask[:, None, None, :]
            if is_causal:
                attn_mask = attn_mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            if not self.cross:
                attn_mask = attn_mask | torch.eye(T, dtype=torch.bool, device=x.device)
            is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        y = self.inner_norm(y.transpose(1, 2).reshape(B, T, d))
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """c_fc, GELU, (SubLN's ``inner_norm``), c_proj, dropout."""

    def __init__(self, d: int, *, dropout: float = 0.0, inner_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.inner_norm = inner_norm or nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, **_) -> Tensor:
        return self.dropout(self.c_proj(self.inner_norm(F.gelu(self.c_fc(x)))))


class HyperConnection(nn.Module):
    """Hyper-connections (Zhu et al. 2024) around one Pre-LN ``Residual``: n streams H
    (..., n, d).  Width connections mix the streams into the sublayer's input and into the
    streams passed on, depth connections weight the sublayer's output into each stream;
    each is a static matrix plus an input-dependent term tanh(norm(H) W)·s, W zero at init.
    Static init for layer k: input from stream k mod n, streams kept (identity), output
    into every stream: with n = 1 this is exactly Pre-LN at init."""

    def __init__(self, residual: Residual, d: int, streams: int, layer: int) -> None:
        super().__init__()
        self.residual, self.n = residual, streams
        alpha = torch.zeros(streams, streams + 1)
        alpha[layer % streams, 0] = 1.0
        alpha[:, 1:] = torch.eye(streams)
        self.static_alpha, self.static_beta = nn.Parameter(alpha), nn.Parameter(torch.ones(streams))
        self.dynamic_alpha = nn.Parameter(torch.zeros(d, streams + 1))
        self.dynamic_beta = nn.Parameter(torch.zeros(d))
        self.alpha_scale, self.beta_scale = nn.Parameter(torch.tensor(0.01)), nn.Parameter(torch.tensor(0.01))
        self.norm = RMSNorm(d, elementwise_affine=False)

    def forward(self, h: Tensor, **kw) -> Tensor:
        hn = self.norm(h)
        alpha = torch.tanh(hn @ self.dynamic_alpha) * self.alpha_scale + self.static_alpha  # (..., n, n+1)
        beta = torch.tanh(hn @ self.dynamic_beta) * self.beta_scale + self.static_beta  # (..., n)
        mixed = alpha.transpose(-1, -2) @ h  # (..., n+1, d): the sublayer's input, then the n streams
        x, branch = self.residual.step(mixed[..., 0, :], None, **kw)
        return beta[..., None] * branch[..., None, :] + mixed[..., 1:, :]


class Block(nn.Module):
    """One layer: self-attention, (cross-attention,) MLP, each a ``Residual``."""

    def __init__(self, d: int, n_heads: int, norm: str, placement: str, *, causal: bool, cross: bool,
                 dropout: float, qk_norm: bool, layer: int, alpha: float, init_scale: float | None) -> None:
        super().__init__()
        qk = (norm if norm in ("layernorm", "rmsnorm") else "rmsnorm") if qk_norm else None
        inner = placement == "subln"

        def residual(sublayer: nn.Module) -> Residual:
            return Residual(sublayer, None if placement == "rezero" else make_norm(norm, d), placement,
                            alpha=alpha if placement == "deepnorm" else 1.0, init_scale=init_scale, layer=layer)

        attn = lambda cross_: Attention(d, n_heads, causal=causal, cross=cross_, dropout=dropout, qk_norm=qk,
                                        inner_norm=make_norm(norm, d) if inner else None)
        self.attn = residual(attn(False))
        self.cross_attn = residual(attn(True)) if cross else None
        self.mlp = residual(MLP(d, dropout=dropout, inner_norm=make_norm(norm, 4 * d) if inner else None))

    def residuals(self) -> list[Residual]:
        return [r for r in (self.attn, self.cross_attn, self.mlp) if r is not None]


def subln_gamma(encoder_layers: int, decoder_layers: int) -> tuple[float | None, float | None]:
    """SubLN's init scale γ per stack (Magneto, as torchscale): sqrt(log 2L) for one stack
    of L layers; encoder-decoder: encoder sqrt(log(3M)·log(2N)/3), decoder sqrt(log 3M)."""
    n, m = encoder_layers, decoder_layers
    if n and m:
        return math.sqrt(math.log(3 * m) * math.log(2 * n) / 3), math.sqrt(math.log(3 * m))
    return (math.sqrt(math.log(2 * n)) if n else None), (math.sqrt(math.log(2 * m)) if m else None)


class Transformer(nn.Module):
    """An encoder, a decoder or an encoder-decoder Transformer with the given norm and
    placement (``NORMS``, ``BUILDER_PLACEMENTS``; see ``Residual`` for the formulas).

    Arguments: ``kind``; ``vocab_size``; ``d_model``; ``n_heads`` (dividing d_model);
    ``n_layers`` (the encoder's, or the decoder's for a decoder); ``decoder_layers`` (an
    encoder-decoder's decoder, default n_layers); ``qk_norm``: norm queries and keys per
    head; ``max_len``: learned positions; ``dropout``; ``mixln_fraction``: the share of
    Post-LN layers of ``mixln``; ``streams``: hyper-connections' n.

    ``forward(idx, targets=None, *, mask=None, src=None, src_mask=None) -> (logits, loss)``:
    idx (B, T) token ids (the decoder's input for an encoder-decoder, whose encoder reads
    ``src``); masks (B, T) True for real tokens; loss is the cross-entropy against targets
    (ignore_index -100), or None.  The LM head shares the token embedding's weight.
    """

    def __init__(self, kind: str = "decoder", vocab_size: int = 256, d_model: int = 128, n_heads: int = 4,
                 n_layers: int = 4, norm: str = "layernorm", placement: str = "pre", *, qk_norm: bool = False,
                 max_len: int = 1024, dropout: float = 0.0, decoder_layers: int | None = None,
                 mixln_fraction: float = 0.25, streams: int = 4) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        if placement == "peri":
            placement = "sandwich"
        if placement not in BUILDER_PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(BUILDER_PLACEMENTS)}; got {placement!r}")
        make_norm(norm, 1)  # unknown norm: ValueError
        if norm == "none" and placement != "rezero":
            raise ArgumentError(f"placement {placement!r} needs a norm; norm='none' goes with placement='rezero'")
        if d_model % n_heads:
            raise ArgumentError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_layers < 1 or (decoder_layers is not None and decoder_layers < 1):
            raise ArgumentError(f"n_layers and decoder_layers must be >= 1, got {n_layers}, {decoder_layers}")
        if not 0.0 <= mixln_fraction <= 1.0 or streams < 1:
            raise ArgumentError(f"mixln_fraction must be in [0, 1] and streams >= 1, got {mixln_fraction}, {streams}")
        self.kind, self.placement, self.max_len, self.streams = kind, placement, max_len, streams
        n_enc = n_layers if kind != "decoder" else 0
        n_dec = 0 if kind == "encoder" else (n_layers if kind == "decoder" else decoder_layers or n_layers)
        self.wte, self.wpe = nn.Embedding(vocab_size, d_model), nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)

        def stack(layers: int, decoder: bool, alpha: float | None, scale: float | None) -> nn.ModuleList:
            blocks = nn.ModuleList()
            for i in range(layers):
                # the per-sublayer placement the stack-wide ones are built from
                place = {"resi-dual": "post", "hyper": "pre"}.get(placement, placement)
                if placement == "mixln":
                    place = "post" if i < round(mixln_fraction * layers) else "pre"
                blocks.append(Block(d_model, n_heads, norm, place, causal=decoder, cross=decoder and n_enc > 0,
                                    dropout=dropout, qk_norm=qk_norm, layer=i + 1, alpha=alpha or 1.0,
                                    init_scale=scale))
            if placement == "hyper":
                hyper = [HyperConnection(r, d_model, streams, k) for k, r in enumerate(
                    r for b in blocks for r in b.residuals())]
                self.register_module(f"hyper_{'dec' if decoder else 'enc'}", nn.ModuleList(hyper))
            return blocks

        coefficients = deepnorm_coefficients(n_enc, n_dec) if placement == "deepnorm" else None
        gammas = subln_gamma(n_enc, n_dec) if placement == "subln" else (None, None)
        self.encoder = stack(n_enc, False, coefficients and coefficients.encoder_alpha,
                             coefficients.encoder_beta if coefficients else gammas[0]) if n_enc else None
        self.decoder = stack(n_dec, True, coefficients and coefficients.decoder_alpha,
                             coefficients.decoder_beta if coefficients else gammas[1]) if n_dec else None
        final = placement in _FINAL_NORM and norm != "none"
        self.ln_enc = make_norm(norm, d_model) if final and n_enc else None
        self.ln_f = make_norm(norm, d_model) if final and n_dec else None
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self._init_weights()

    def _init_weights(self) -> None:
        """nanoGPT's (GPT-2's) init: normal(0, 0.02) weights, zero biases, and each
        sublayer's output projection (``c_proj``) at 0.02 / sqrt(number of residual
        branches), so that the stream's variance at init does not grow with depth.
        DeepNorm's and SubLN's sublayers take their papers' init instead (DeepNet's
        pseudo-code, torchscale): Xavier-normal weights (each projection of a fused q/k/v
        its own), the value, output and feed-forward ones then scaled by β (DeepNorm) or
        γ (SubLN): their derivations of β and γ assume that init."""
        residuals = [m for m in self.modules() if isinstance(m, Residual)]
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for module in residuals:
            for name, linear in module.sublayer.named_modules():
                if name.rsplit(".", 1)[-1] == "c_proj":
                    nn.init.normal_(linear.weight, 0.0, 0.02 / math.sqrt(max(1, len(residuals))))
        for module in residuals:
            if module.init_scale is not None:
                for name, linear in module.sublayer.named_modules():
                    if isinstance(linear, nn.Linear):
                        fused = _FUSED.get(name.rsplit(".", 1)[-1], 1)
                        for projection in linear.weight.data.chunk(fused, dim=0):
                            nn.init.xavier_normal_(projection)
                scale_init_(module.sublayer, module.init_scale)

    def _run(self, blocks: nn.ModuleList, x: Tensor, final: nn.Module | None, which: str, **kw) -> Tensor:
        mask = kw.get("mask")
        if self.placement == "hyper":
            h = x.unsqueeze(-2).expand(*x.shape[:-1], self.streams, x.shape[-1])
            for hc in getattr(self, f"hyper_{which}"):
                h = hc(h, **kw)
            x = h.sum(-2)
            return normed(final, x, mask) if final is not None else x
        if self.placement == "resi-dual":  # Post-LN stream x, dual stream d: out = x + N(d)
            dual = x
            for block in blocks:
                for r in block.residuals():
                    f = r.sublayer(x, **kw)
                    x, dual = add_norm(r.norm, f, x, mask)[0], dual + f
            return x + normed(final, dual, mask)
        pending = None
        for block in blocks:
            for r in block.residuals():
                x, pending = r.step(x, pending, **kw)
        if final is not None:
            return norm_stream(final, x, pending, mask)[0]
        return x if pending is None else x + pending

    def _embed(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        if T > self.max_len:
            raise ArgumentError(f"sequence length {T} exceeds max_len {self.max_len}")
        return self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, mask: Tensor | None = None,
                src: Tensor | None = None, src_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if self.kind == "encoder-decoder" and src is None:
            raise ArgumentError("an encoder-decoder needs src= (the encoder's input ids)")
        memory = None
        if self.kind == "encoder-decoder":
            memory = self._run(self.encoder, self._embed(src), self.ln_enc, "enc", mask=src_mask)
        if self.kind == "encoder":
            x = self._run(self.encoder, self._embed(idx), self.ln_enc, "enc", mask=mask)
        else:
            x = self._run(self.decoder, self._embed(idx), self.ln_f, "dec", mask=mask, memory=memory,
                          memory_mask=src_mask)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 *, generator: torch.Generator | None = None, src: Tensor | None = None) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx (B, T), nanoGPT's way: the last
        ``max_len`` tokens as context, logits / temperature, the top_k most likely kept;
        ``temperature=0`` takes the most likely token.  ``generator`` makes it repeatable."""
        if self.kind == "encoder":
            raise ArgumentError("generate needs a decoder (kind 'decoder' or 'encoder-decoder')")
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.max_len:], src=src)[0][:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1, None]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


__all__ = ["Transformer", "TokenBatchNorm", "Attention", "MLP", "Block", "HyperConnection", "make_norm",
           "subln_gamma", "KINDS", "NORMS", "BUILDER_PLACEMENTS"]
