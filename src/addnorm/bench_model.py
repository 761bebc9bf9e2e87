"""``addnorm bench --model``: whole models with torch.nn's norms and with addnorm's.

The same model is built twice from the same seed, once with ``torch.nn``'s norm
classes and once with addnorm's (drop-in subclasses, so the parameters are equal), and
the two are timed interleaved in one process, eager and under ``torch.compile``:

* ``gpt``: a nanoGPT-style pre-norm decoder, one training step (forward, cross-entropy,
  backward, AdamW), with LayerNorm or RMSNorm, float32 or bfloat16.
* ``transformer``: ``addnorm.Transformer`` (Pre-LN; each residual add fused into the
  next norm) against the same model with torch.nn's norms and unfused adds, one
  training step as ``gpt``.
* ``llama``: a Llama-style decoder (RMSNorm, SwiGLU, no biases, a KV cache) in
  bfloat16: prefill of a prompt, then the latency of decoding one token after it.
* ``unet``: a diffusion-UNet-style stack of GroupNorm + SiLU + 3x3 conv residual
  blocks in channels-last between a first and a last conv: one forward (a sampling
  step), and one training step (noise-prediction loss, backward, AdamW).

Norms are a few percent of these models' time (matmuls and convolutions are the rest),
so a ratio near 1.0 is the expected answer; the point is that swapping norms never
costs a user time.  Ratios are torch's time over addnorm's (above 1: addnorm faster).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

import addnorm

from .bench import _progress, _time_rounds

NORMS = {
    "torch": {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm, "groupnorm": nn.GroupNorm},
    "addnorm": {"layernorm": addnorm.LayerNorm, "rmsnorm": addnorm.RMSNorm,
                "groupnorm": addnorm.GroupNorm},
}


# ---------------------------------------------------------------------------
# The models: a pre-norm decoder (nanoGPT's or Llama's) and a UNet-style stack.
# ---------------------------------------------------------------------------


class Attention(nn.Module):
    """Causal self-attention; with ``cache`` (a list, empty at first) it keeps the keys
    and values of earlier tokens, so a later call decodes after them."""

    def __init__(self, d: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)

    def forward(self, x, cache: list | None = None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class GELUMLP(nn.Module):
    def __init__(self, d: int, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d, bias=bias)
        self.proj = nn.Linear(4 * d, d, bias=bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class SwiGLU(nn.Module):
    def __init__(self, d: int, bias: bool = False):
        super().__init__()
        hidden = 256 * ((8 * d // 3 + 255) // 256)  # Llama's 8/3 d, rounded up to 256
        self.gate = nn.Linear(d, hidden, bias=bias)
        self.up = nn.Linear(d, hidden, bias=bias)
        self.down = nn.Linear(hidden, d, bias=bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d, heads, norm, mlp, bias):
        super().__init__()
        self.ln_1, self.attn = norm(d), Attention(d, heads, bias)
        self.ln_2, self.mlp = norm(d), mlp(d, bias)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class Decoder(nn.Module):
    """A decoder-only LM: token (+ learned position) embeddings, pre-norm blocks, a final
    norm, tied output head.  nanoGPT's: LayerNorm/RMSNorm, GELU MLP, biases; Llama's:
    RMSNorm, SwiGLU, no biases (no rotary embedding: it does not touch the norms)."""

    def __init__(self, vocab, d, heads, layers, norm, mlp=GELUMLP, bias=True, max_len=1024):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.h = nn.ModuleList(Block(d, heads, norm, mlp, bias) for _ in range(layers))
        self.ln_f = norm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, caches=None, start: int = 0):
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for i, block in enumerate(self.h):
            x = block(x, None if caches is None else caches[i])
        return self.lm_head(self.ln_f(x))


class ResBlock(nn.Module):
    """x + conv(silu(gn(conv(silu(gn(x)))))), as in a diffusion UNet."""

    def __init__(self, c, groupnorm):
        super().__init__()
        self.norm1, self.conv1 = groupnorm(32, c), nn.Conv2d(c, c, 3, padding=1)
        self.norm2, self.conv2 = groupnorm(32, c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


# ---------------------------------------------------------------------------
# The timed cases.
# ---------------------------------------------------------------------------

# (quick, full) sizes; full is what the README's and issues' numbers use
SIZES = {
    "gpt": ({"d": 256, "layers": 2, "heads": 4, "seq": 128, "batch": 4},
            {"d": 512, "layers": 8, "heads": 8, "seq": 256, "batch": 8}),
    "llama": ({"d": 512, "layers": 2, "heads": 8, "prompt": 128},
              {"d": 2048, "layers": 4, "heads": 16, "prompt": 512}),
    "unet": ({"c": 128, "blocks": 2, "batch": 1, "size": 32},
             {"c": 320, "blocks": 4, "batch": 2, "size": 32}),
}
VOCAB = 4096
LATENT = 4  # the UNet's input and output channels (Stable Diffusion's latents)


@dataclass
class ModelResult:
    model: str
    norm: str
    dtype: str
    what: str
    mode: str  # "eager" or "compiled"
    ms: dict[str, float] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    max_diff: float = 0.0  # largest |torch - addnorm| of the two models' outputs

    @property
    def ratio(self) -> float:
        return self.ms["torch"] / self.ms["addnorm"]


def _built(make: Callable[[dict], nn.Module], dtype) -> dict[str, nn.Module]:
    """The model with each side's norms, same seed, same parameters."""
    models = {}
    for side, norms in NORMS.items():
        torch.manual_seed(0)
        models[side] = make(norms).to(dtype)
    return models


def _train_step(model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor]) -> Callable:
    """One training step: ``loss_of(model)``, its backward, an AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _train_runner(size: dict, logits_of: Callable = lambda out: out) -> Callable:
    """One training step on a fixed batch of tokens (forward, cross-entropy, backward,
    AdamW); ``logits_of`` picks the logits from the model's output."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(VOCAB, (size["batch"], size["seq"]), generator=g)
    targets = torch.randint(VOCAB, (size["batch"], size["seq"]), generator=g)

    def loss_of(model):
        return F.cross_entropy(logits_of(model(idx)).flatten(0, 1).float(), targets.flatten())
    return lambda model: _train_step(model, loss_of)


def _gpt(norm: str, dtype, size: dict) -> tuple[dict, Callable]:
    models = _built(lambda n: Decoder(VOCAB, size["d"], size["heads"], size["layers"],
                                      n[norm], max_len=size["seq"]), dtype)
    return models, _train_runner(size)


class _TorchLayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm behind a forward of its own, so that ``Residual`` does not fuse
    it: the stack adds, then calls torch's norm (the unfused baseline)."""

    def forward(self, x):
        return super().forward(x)


class _TorchRMSNorm(nn.RMSNorm):
    def forward(self, x):
        return super().forward(x)


def _transformer(norm: str, dtype, size: dict) -> tuple[dict, Callable]:
    """``addnorm.Transformer`` (Pre-LN, each residual add fused into the next norm)
    against the same model with torch.nn's norms and unfused adds."""
    models = {}
    for side in ("torch", "addnorm"):
        torch.manual_seed(0)
        model = addnorm.Transformer("decoder", VOCAB, size["d"], size["heads"], size["layers"], norm,
                                    "pre", max_len=size["seq"])
        if side == "torch":
            for module in model.modules():
                if type(module) in (addnorm.LayerNorm, addnorm.RMSNorm):
                    module.__class__ = _TorchLayerNorm if norm == "layernorm" else _TorchRMSNorm
        models[side] = model.to(dtype)
    return models, _train_runner(size, lambda out: out[0])


def _llama(what: str, dtype, size: dict) -> tuple[dict, Callable]:
    models = _built(lambda n: Decoder(VOCAB, size["d"], size["heads"], size["layers"],
                                      lambda d: n["rmsnorm"](d, eps=1e-6), SwiGLU, bias=False,
                                      max_len=size["prompt"] + 1), dtype)
    prompt = torch.randint(VOCAB, (1, size["prompt"]), generator=torch.Generator().manual_seed(1))

    def runner(model):
        def prefill(caches=None):
            with torch.no_grad():
                return model(prompt, caches)
        if what == "prefill":
            return prefill
        caches = [[] for _ in model.h]
        prefill(caches)
        token = torch.tensor([[7]])

        def decode():  # one token after the prompt; the prompt's cache stays as it was
            with torch.no_grad():
                return model(token, [list(c) for c in caches], start=size["prompt"])
        return decode
    return models, runner


def _unet(what: str, dtype, size: dict) -> tuple[dict, Callable]:
    """The stack on a fixed channels-last batch of latents: one forward without autograd
    (a sampling step), or a training step on the noise-prediction loss."""
    # a first conv from 4 latent channels, as a diffusion UNet's: a GroupNorm first on the
    # input (which needs no gradient) would crash torch 2.13's own backward
    models = _built(lambda n: nn.Sequential(nn.Conv2d(LATENT, size["c"], 3, padding=1),
                                            *(ResBlock(size["c"], n["groupnorm"])
                                              for _ in range(size["blocks"])),
                                            nn.Conv2d(size["c"], LATENT, 3, padding=1)), dtype)
    g = torch.Generator().manual_seed(1)
    x, noise = (torch.randn(size["batch"], LATENT, size["size"], size["size"], generator=g)
                .to(dtype).contiguous(memory_format=torch.channels_last) for _ in range(2))
    for m in models.values():
        m.to(memory_format=torch.channels_last)

    def runner(model):
        if what == "train step":
            return _train_step(model, lambda m: F.mse_loss(m(x).float(), noise.float()))

        def forward():
            with torch.no_grad():
                return model(x)
        return forward
    return models, runner


def cases(quick: bool = False) -> list[tuple[str, str, torch.dtype, str, Callable]]:
    """(model, norm, dtype, what, build) for every timed configuration."""
    pick = 0 if quick else 1
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for norm in ("rmsnorm", "layernorm"):
            out.append(("gpt", norm, dtype, "train step",
                        lambda n=norm, dt=dtype: _gpt(n, dt, SIZES["gpt"][pick])))
            out.append(("transformer", norm, dtype, "train step (fused add)",
                        lambda n=norm, dt=dtype: _transformer(n, dt, SIZES["gpt"][pick])))
    for what in ("prefill", "decode"):
        out.append(("llama", "rmsnorm", torch.bfloat16, what,
                    lambda w=what: _llama(w, torch.bfloat16, SIZES["llama"][pick])))
    for dtype in (torch.float32, torch.bfloat16):
        for what in ("forward", "train step"):
            out.append(("unet", "groupnorm", dtype, what,
                        lambda w=what, dt=dtype: _unet(w, dt, SIZES["unet"][pick])))
    return out


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def run(quick: bool = False, compile: bool = True, rounds: int | None = None,
        console: Console | None = None) -> list[ModelResult]:
    """Each case eager (and compiled): torch's norms against addnorm's, interleaved."""
    console = console or Console()
    rounds = rounds or (3 if quick else 5)
    modes = ("eager", "compiled") if compile else ("eager",)
    todo = [(c, mode) for c in cases(quick) for mode in modes]
    results = []
    with _progress(console, len(todo)) as step:
        for (model, norm, dtype, what, build), mode in todo:
            step(f"{model} {norm} {str(dtype)[6:]} {what} {mode}")
            models, runner = build()
            result = ModelResult(model, norm, str(dtype)[6:], what, mode)
            runners = {}
            for side, m in models.items():
                if mode == "compiled":
                    torch._dynamo.reset()
                    m = torch.compile(m)
                run_ = runner(m)
                t = time.perf_counter()
                out = run_()  # warm-up (compiles under torch.compile)
                result.compile_s[side] = round(time.perf_counter() - t, 2)
                run_()
                runners[side] = run_
                if side == "torch":
                    reference = out
                else:
                    result.max_diff = _max_diff(reference, out)
            result.ms = _time_rounds(runners, rounds)
            results.append(result)
            del models, runners
    return results


def table(results: list[ModelResult]) -> Table:
    t = Table(title="whole models: torch.nn norms vs addnorm's (ratio > 1: addnorm faster)")
    for col in ("model", "norm", "dtype", "what", "mode", "torch ms", "addnorm ms", "ratio",
                "max |diff|"):
        t.add_column(col, justify="right" if "ms" in col or col in ("ratio", "max |diff|") else "left")
    for r in results:
        t.add_row(r.model, r.norm, r.dtype, r.what, r.mode, f"{r.ms['torch']:.2f}",
                  f"{r.ms['addnorm']:.2f}", f"{r.ratio:.2f}x", f"{r.max_diff:.2g}")
    return t


def markdown(results: list[ModelResult]) -> str:
    lines = ["| model | norm | dtype | what | mode | torch ms | addnorm ms | ratio |",
             "|---|---|---|---|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.model} | {r.norm} | {r.dtype} | {r.what} | {r.mode} | "
                     f"{r.ms['torch']:.2f} | {r.ms['addnorm']:.2f} | {r.ratio:.2f}x |")
    return "\n".join(lines)


