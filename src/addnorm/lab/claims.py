"""The seed articles' claims, each as: the runs that test it, the rule that turns their
records into a verdict ("holds", "does not hold", "inconclusive"), and a picture.

A run is a config dict with a unique ``key``; ``execute(config)`` returns its measured
numbers.  Verdict rules are written here, in the code, and printed in the report beside
the numbers; they are never tuned to an outcome.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"


@dataclass(frozen=True)
class Claim:
    id: int
    title: str
    rule: str
    runs: Callable[[bool, int], list[dict]]  # (quick, seeds) -> configs
    verdict: Callable[[list[dict]], tuple[str, dict]]  # records -> (verdict, evidence)
    plot: Callable[[list[dict], object], None] | None = None  # (records, axes)


# ---------------------------------------------------------------------------
# Claim 2: Post-LN becomes unstable as depth grows; Pre-LN stays stable.
# ---------------------------------------------------------------------------


def _depth_runs(quick: bool, seeds: int) -> list[dict]:
    depths = (2, 12) if quick else (2, 6, 12, 24)
    lrs = (1e-3, 1e-2) if quick else (1e-3, 3e-3, 1e-2)
    base = dict(norm="layernorm", d_model=64 if quick else 128, n_heads=4, batch=16, seq=64,
                steps=80 if quick else 400, warmup=0)
    out = []
    for placement, depth, lr, seed in itertools.product(("post", "pre"), depths, lrs, range(seeds)):
        cfg = dict(base, kind="train_lm", placement=placement, n_layers=depth, lr=lr, seed=seed)
        cfg["key"] = f"c2-{placement}-L{depth}-lr{lr:g}-s{seed}-{'q' if quick else 'f'}"
        out.append(cfg)
    return out


def _failure_rates(records: list[dict]) -> dict[tuple[str, int, float], float]:
    groups: dict[tuple, list[bool]] = defaultdict(list)
    for r in records:
        c = r["config"]
        groups[(c["placement"], c["n_layers"], c["lr"])].append(r["result"]["diverged"])
    return {k: sum(v) / len(v) for k, v in groups.items()}


def _depth_verdict(records: list[dict]) -> tuple[str, dict]:
    rates = _failure_rates(records)
    depths = sorted({k[1] for k in rates})
    lrs = sorted({k[2] for k in rates})
    witness = [(d, lr) for d in depths for lr in lrs
               if rates.get(("post", d, lr), 0) >= 2 / 3 and rates.get(("pre", d, lr), 1) == 0]
    post_by_depth = {d: sum(rates.get(("post", d, lr), 0) for lr in lrs) / len(lrs) for d in depths}
    pre_by_depth = {d: sum(rates.get(("pre", d, lr), 0) for lr in lrs) / len(lrs) for d in depths}
    grows = post_by_depth[depths[-1]] > post_by_depth[depths[0]]
    evidence = {
        "failure rate by depth (Post-LN)": post_by_depth,
        "failure rate by depth (Pre-LN)": pre_by_depth,
        "(depth, lr) where Post-LN fails in >= 2/3 of seeds and Pre-LN in none": witness,
    }
    if witness and grows:
        return HOLDS, evidence
    if any(post_by_depth[d] or pre_by_depth[d] for d in depths) and all(
        post_by_depth[d] <= pre_by_depth[d] for d in depths
    ):
        return FAILS, evidence
    return UNSURE, evidence


def _depth_plot(records: list[dict], ax) -> None:
    """Gradient norm by layer at initialisation, deepest stack, first seed (Xiong et al.)."""
    deepest = max(r["config"]["n_layers"] for r in records)
    lr = min(r["config"]["lr"] for r in records)
    for placement in ("post", "pre"):
        for r in records:
            c = r["config"]
            if (c["placement"], c["n_layers"], c["lr"], c["seed"]) == (placement, deepest, lr, 0):
                values = r["result"]["grad_norm_by_layer"].get("0") or []
                ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=f"{placement}-LN")
    ax.set_yscale("log")
    ax.set_xlabel(f"sublayer (input to output), {deepest} layers")
    ax.set_ylabel("gradient norm at step 0")
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------
# Claim 7: LayerNorm's output for one sample does not depend on the batch or on
# padding; BatchNorm's does.  Exact checks, no training.
# ---------------------------------------------------------------------------


def _independence_runs(quick: bool, seeds: int) -> list[dict]:
    return [dict(kind="independence", seed=s, key=f"c7-s{s}") for s in range(max(1, seeds))]


def independence_check(config: dict) -> dict:
    """max |difference| of sample 0's output between: alone and in a batch of 7 others;
    two batches that differ only in the other samples; with 8 padding tokens appended
    (the padding inside the statistics, as a plain BatchNorm1d over tokens has it)."""
    from .. import BatchNorm1d, LayerNorm

    g = torch.Generator().manual_seed(config["seed"])
    d = 32
    x0 = torch.randn(1, 16, d, generator=g)
    others, others2 = torch.randn(7, 16, d, generator=g), torch.randn(7, 16, d, generator=g)
    pad = torch.zeros(1, 8, d)
    out = {}
    for name, norm in (("layernorm", LayerNorm(d)), ("batchnorm", BatchNorm1d(d))):
        norm.train()

        def f(x):
            return norm(x.reshape(-1, d)).reshape(x.shape) if name == "batchnorm" else norm(x)

        alone = f(x0)[0]
        with torch.no_grad():
            out[name] = {
                "alone vs in a batch": (alone - f(torch.cat([x0, others]))[0]).abs().max().item(),
                "batch vs another batch": (f(torch.cat([x0, others]))[0] - f(torch.cat([x0, others2]))[0]).abs().max().item(),
                "unpadded vs padded": (alone - f(torch.cat([x0, pad], dim=1))[0, :16]).abs().max().item(),
            }
    return out


def _independence_verdict(records: list[dict]) -> tuple[str, dict]:
    ln = max(v for r in records for v in r["result"]["layernorm"].values())
    bn = min(v for r in records for v in r["result"]["batchnorm"].values())
    evidence = {"largest LayerNorm difference": ln, "smallest BatchNorm difference": bn}
    if ln == 0.0 and bn > 1e-3:
        return HOLDS, evidence
    if ln > 1e-6 or bn == 0.0:
        return FAILS, evidence
    return UNSURE, evidence


CLAIMS: dict[int, Claim] = {
    2: Claim(2, "Post-LN becomes unstable as depth grows; Pre-LN stays stable",
             "holds if at some (depth, lr) Post-LN fails (a non-finite loss, or a final training loss "
             "no lower than 95% of the first) in >= 2/3 of seeds while Pre-LN fails in none, and Post-LN "
             "fails more often at the largest depth than at the smallest; does not hold if some run fails "
             "and Post-LN fails no more often than Pre-LN at every depth; inconclusive otherwise (also "
             "when no run fails: the grid did not reach instability). No warm-up, AdamW.",
             _depth_runs, _depth_verdict, _depth_plot),
    7: Claim(7, "A LayerNorm's output for one sample does not depend on the batch or on padding; "
                "BatchNorm's does",
             "holds if every LayerNorm difference is exactly 0 and every BatchNorm difference exceeds "
             "1e-3; does not hold if a LayerNorm difference exceeds 1e-6 or a BatchNorm one is 0; "
             "inconclusive otherwise.",
             _independence_runs, _independence_verdict),
}


def execute(config: dict) -> dict:
    """Run one config (in this process or a worker's)."""
    if config["kind"] == "train_lm":
        from .train import train_lm

        return train_lm(config)
    if config["kind"] == "independence":
        return independence_check(config)
    raise ValueError(f"unknown run kind {config['kind']!r}")
