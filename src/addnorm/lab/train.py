"""One training run of a character-level language model, recorded as numbers."""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..diagnostics import Diagnostics
from ..transformer import Transformer
from .data import CharData


VALIDATION_SEED, VALIDATION_BATCHES = 1234, 16

# What failing to train means, for every claim that counts failures.
MARGIN = 0.1
FAILURE = ("failed to train: the loss became non-finite, or the validation loss did not get "
           f"{MARGIN} nats below the unigram line (the loss of predicting each character by its "
           "frequency alone, ~3.24 nats: a model there learned nothing about context)")


@lru_cache(maxsize=1)
def _data() -> CharData:
    return CharData()


def train_lm(config: dict) -> dict:
    """Train ``addnorm.Transformer`` (a decoder) with ``config``: norm, placement,
    n_layers, d_model, n_heads, lr, steps, warmup (steps of linear warm-up, 0: none),
    batch, seq, seed.  Returns the loss every ``log_every`` steps, the validation loss at
    the end, whether it failed to train (``failed``: see ``FAILURE``), the gradient norm
    and the activation RMS by layer at the first step and at the last (the lab records
    the wall time of every run)."""
    data = _data()
    torch.manual_seed(config["seed"])
    model = Transformer("decoder", data.vocab_size, config["d_model"], config["n_heads"], config["n_layers"],
                        config["norm"], config["placement"], max_len=config["seq"])
    # betas (0.9, 0.95): the language models' setting since GPT-3 (nanoGPT, Llama); with
    # torch's default 0.999 deep Pre-LN stacks sit at the unigram loss for hundreds of steps
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    warmup = config.get("warmup", 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    g = torch.Generator().manual_seed(config["seed"])
    diag = Diagnostics(model)
    losses = []
    log_every = max(1, config["steps"] // 20)
    first = last = math.nan
    for step in range(config["steps"]):
        record = step in (0, config["steps"] - 1)  # only the first and last steps are kept
        diag.enabled = record
        x, y = data.batch("train", config["batch"], config["seq"], g)
        loss = model(x, y)[1]
        loss.backward()
        if record:
            diag.record_gradients()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        first = value if step == 0 else first
        last = value
        if record:
            diag.step = step
            diag.end_step()
        if step % log_every == 0 or step == config["steps"] - 1:
            losses.append([step, value])
        if not math.isfinite(value):
            break
    diag.remove()
    val = math.nan
    if math.isfinite(last):
        with torch.no_grad():
            model.eval()
            # the same held-out windows for every run, whatever its seed: paired comparisons
            held_out = torch.Generator().manual_seed(VALIDATION_SEED)
            vals = [model(*data.batch("val", config["batch"], config["seq"], held_out))[1].item()
                    for _ in range(VALIDATION_BATCHES)]
            val = sum(vals) / len(vals)
    baseline = data.unigram_loss("val")
    steps_recorded = sorted({r["step"] for r in diag.records})
    return {
        "losses": losses,
        "first_loss": first,
        "final_loss": last,
        "val_loss": val,
        "unigram_loss": baseline,
        "failed": not math.isfinite(last) or not math.isfinite(val) or val > baseline - MARGIN,
        "grad_norm_by_layer": {str(s): diag.by_layer("grad_norm", s) for s in steps_recorded},
        "act_rms_by_layer": {str(s): diag.by_layer("act_rms", s) for s in steps_recorded},
    }
