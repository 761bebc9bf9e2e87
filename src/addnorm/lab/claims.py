"""The seed articles' claims, each as: the runs that test it, the rule that turns their
records into a verdict ("holds", "does not hold", "inconclusive"), and a picture.

A run is a config dict with a ``key`` made from its contents (two claims that need the
same run share it; a changed setting is a new run); ``execute(config)`` returns its
measured numbers.  Verdict rules are written here, in the code, and printed in the
report beside the numbers; they are set before the runs and never tuned to an outcome.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from .train import FAILURE

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
RESULTS_VERSION = 4  # bump when a run's measured numbers change meaning: old records then rerun


@dataclass(frozen=True)
class Claim:
    id: int
    title: str
    rule: str
    runs: Callable[[str, int], list[dict]]  # (mode, seeds) -> configs
    verdict: Callable[[list[dict]], tuple[str, dict]]  # records -> (verdict, evidence)
    plot: Callable[[list[dict], object], None] | None = None  # (records, matplotlib figure)


MODES = ("tiny", "quick", "full")  # tiny: the tests' smoke run, seconds, too small to decide anything


def by_mode(mode: str, tiny, quick, full):
    """The setting for ``mode``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    return {"tiny": tiny, "quick": quick, "full": full}[mode]


def keyed(label: str, **config) -> dict:
    """``config`` with its ``key``: ``label`` and a hash of everything in it."""
    digest = hashlib.sha1(json.dumps([RESULTS_VERSION, config], sort_keys=True).encode()).hexdigest()[:8]
    return dict(config, key=f"{label}-{digest}")


def estimate(config: dict) -> float:
    """Rough seconds one run takes on one core of the 2-core CI machine: for the ETA."""
    kind, overhead = config["kind"], 0.3  # a run's set-up: building the model, the data
    if kind == "train_lm":
        return overhead + 0.0075 * config["n_layers"] * config["steps"] * (config["d_model"] / 64) ** 2
    if kind == "train_cnn":
        return overhead + config["epochs"] * (0.05 + 1.5 / config["batch"])
    if kind == "norm_cost":
        return 12.0 if config["backend"] == "torch.compile" else 1.0
    return {"train_step_cost": 3.0, "fold_cost": 1.0}.get(kind, overhead)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


# ---------------------------------------------------------------------------
# The language-model grid: placements x depths x learning rates x seeds, no warm-up.
# Claims 2, 3, 4, 5 and 9 read it (each the placements it names).
# ---------------------------------------------------------------------------


def grid(mode: str) -> dict:
    """The grid's (depth, lr) settings and the runs' common config: quick decides in
    minutes on 2 cores; the full grid goes to 24 layers at every learning rate and to
    48 at the smallest, where DeepNet's headline is to be seen at CPU scale."""
    if mode == "tiny":
        return dict(settings=[(1, 3e-3), (2, 3e-3)],
                    base=dict(kind="train_lm", d_model=32, n_heads=2, batch=4, seq=16, steps=4, warmup=0))
    settings = (list(itertools.product((2, 6), (1e-3, 3e-3))) if mode == "quick"
                else list(itertools.product((2, 6, 12, 24), (1e-3, 2e-3, 3e-3))) + [(48, 1e-3)])
    return dict(settings=settings, base=dict(kind="train_lm", d_model=64, n_heads=4, batch=16, seq=64,
                                             steps=by_mode(mode, None, 200, 300), warmup=0))


def _lm_runs(placements, mode: str, seeds: int, norm: str = "layernorm", depths=None) -> list[dict]:
    g = grid(mode)
    return [keyed(f"lm-{norm}-{p}-L{d}-lr{lr:g}-s{s}", **g["base"], norm=norm, placement=p, n_layers=d, lr=lr, seed=s)
            for p, (d, lr), s in itertools.product(placements, g["settings"], range(seeds))
            if depths is None or d in depths]


def _by_setting(records: list[dict]) -> dict[tuple, dict[int, dict]]:
    """{(norm, placement, depth, lr): {seed: result}}"""
    out: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in records:
        c = r["config"]
        out[(c["norm"], c["placement"], c["n_layers"], c["lr"])][c["seed"]] = r["result"]
    return out


def _failure_rate(runs: dict[int, dict]) -> float:
    return _mean(r["failed"] for r in runs.values())


def _settings(table: dict, norm: str = "layernorm") -> list[tuple[int, float]]:
    return sorted({(k[2], k[3]) for k in table if k[0] == norm})


def _rates(table: dict, placements: tuple[str, ...], settings) -> dict[tuple[str, int, float], float]:
    """{(placement, depth, lr): failure rate over seeds} of the LayerNorm runs."""
    return {(p, d, lr): _failure_rate(table[("layernorm", p, d, lr)]) for p in placements for d, lr in settings}


def _deepest(settings) -> tuple[int, float]:
    """The deepest stack and the smallest learning rate: where depth's effects show first."""
    return max(d for d, _ in settings), min(lr for _, lr in settings)


def _trained_in_every_seed(table, a: tuple, b: tuple, depth: int, lr: float) -> list[tuple[float, float]]:
    """(a's, b's) validation loss per seed where both (norm, placement) trained in every
    seed at (depth, lr); empty otherwise."""
    ra, rb = table.get((*a, depth, lr), {}), table.get((*b, depth, lr), {})
    seeds = sorted(set(ra) & set(rb))
    if not seeds or any(ra[s]["failed"] or rb[s]["failed"] for s in seeds):
        return []
    return [(ra[s]["val_loss"], rb[s]["val_loss"]) for s in seeds]


def _label(depth: int, lr: float) -> str:
    return f"{depth} layers, lr {lr:g}"


# ---------------------------------------------------------------------------
# Claim 1: RMSNorm costs 7%-64% less time than LayerNorm.
# ---------------------------------------------------------------------------

BACKENDS = ("torch", "torch.compile", "addnorm")


def _cost_runs(mode: str, seeds: int) -> list[dict]:
    shapes = by_mode(mode, ((64, 128),), ((4096, 256), (256, 4096)),
                     ((1, 4096), (64, 1024), (2048, 768), (4096, 4096), (16384, 1024)))
    out = []
    for backend, dtype, shape in itertools.product(BACKENDS, ("float32", "bfloat16"), shapes):
        if mode != "full" and backend == "torch.compile" and dtype != "float32":
            continue  # compiling costs seconds per shape: quick compiles float32 only
        out.append(keyed(f"cost-{backend}-{dtype}-{shape[0]}x{shape[1]}", kind="norm_cost", backend=backend,
                         dtype=dtype, shape=list(shape), rounds=by_mode(mode, 2, 15, 40), exclusive=True))
    size = by_mode(mode, dict(d=32, heads=2, layers=1, seq=16, batch=2), dict(d=128, heads=4, layers=2, seq=128, batch=8),
                   dict(d=512, heads=8, layers=8, seq=256, batch=8))
    out.append(keyed("cost-train-step", kind="train_step_cost", size=size, rounds=by_mode(mode, 1, 5, 10),
                     exclusive=True))
    return out


def _cost_cells(records: list[dict]) -> dict[str, list[tuple[str, float]]]:
    """{group: [(cell label, saving)]}: per backend its op cells; the training step apart."""
    cells: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for r in records:
        c, res = r["config"], r["result"]
        if c["kind"] == "train_step_cost":
            cells["training step (addnorm)"].append(("step", res["saving"]))
            continue
        for pass_, v in res.items():
            cells[c["backend"]].append((f"{c['shape'][0]}x{c['shape'][1]} {c['dtype']} {pass_}", v["saving"]))
    return cells


def _cost_verdict(records: list[dict]) -> tuple[str, dict]:
    cells = _cost_cells(records)
    medians = {g: statistics.median(s for _, s in v) for g, v in cells.items()}
    evidence = {
        f"{g}: median saving (range over {len(cells[g])} cells)":
            f"{medians[g]:+.0%} ({min(s for _, s in cells[g]):+.0%} to {max(s for _, s in cells[g]):+.0%})"
        for g in cells
    }
    if all(m >= 0.07 for m in medians.values()):
        return HOLDS, evidence
    if all(m < 0.07 for m in medians.values()):
        return FAILS, evidence
    return UNSURE, evidence


def _cost_plot(records: list[dict], fig) -> None:
    ax = fig.subplots()
    cells = _cost_cells(records)
    x = 0
    for group, values in cells.items():
        ax.bar([x + i for i in range(len(values))], [100 * s for _, s in values], label=group)
        x += len(values) + 1
    ax.axhspan(7, 64, color="green", alpha=0.1, label="the seed's 7%-64%")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("RMSNorm's time saving vs LayerNorm (%)")
    ax.set_xticks([])
    ax.set_xlabel("cells: shape x dtype x pass, grouped by backend")
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------
# Claim 2: Post-LN becomes unstable as depth grows; Pre-LN stays stable.
# ---------------------------------------------------------------------------


def _depth_verdict(records: list[dict]) -> tuple[str, dict]:
    table = _by_setting(records)
    settings = _settings(table)
    depths = sorted({d for d, _ in settings})
    rate = _rates(table, ("post", "pre"), settings)
    witness = [_label(d, lr) for d, lr in settings if rate[("post", d, lr)] >= 2 / 3 and rate[("pre", d, lr)] == 0]
    by_depth = {p: {d: _mean(rate[(p, d, lr)] for dd, lr in settings if dd == d) for d in depths} for p in ("post", "pre")}
    grows = by_depth["post"][depths[-1]] > by_depth["post"][depths[0]]
    evidence = {
        "failure rate by depth (mean over lrs), Post-LN": {d: round(v, 2) for d, v in by_depth["post"].items()},
        "failure rate by depth (mean over lrs), Pre-LN": {d: round(v, 2) for d, v in by_depth["pre"].items()},
        "settings where Post-LN fails in >= 2/3 of seeds and Pre-LN in none": witness,
    }
    if witness and grows:
        return HOLDS, evidence
    if any(rate.values()) and all(by_depth["post"][d] <= by_depth["pre"][d] for d in depths):
        return FAILS, evidence
    return UNSURE, evidence


def _depth_plot(records: list[dict], fig) -> None:
    """Left: failure rate by depth.  Right: gradient norm by layer at initialisation in
    the deepest stack, first seed, smallest learning rate (Xiong et al. 2020's picture)."""
    left, right = fig.subplots(1, 2)
    table = _by_setting(records)
    settings = _settings(table)
    depths = sorted({d for d, _ in settings})
    for p in ("post", "pre"):
        for lr in sorted({lr for _, lr in settings}):
            at = [d for d in depths if (d, lr) in settings]
            left.plot(at, [_failure_rate(table[("layernorm", p, d, lr)]) for d in at], marker="o",
                      linestyle="-" if p == "post" else "--", label=f"{p}-LN, lr {lr:g}")
        runs = table.get(("layernorm", p, *_deepest(settings)), {})
        if runs:
            values = runs[min(runs)]["grad_norm_by_layer"].get("0") or []
            right.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=f"{p}-LN")
    left.set_xlabel("layers")
    left.set_ylabel("fraction of seeds that failed")
    left.set_ylim(-0.05, 1.05)
    left.legend(fontsize=6)
    right.set_yscale("log")
    right.set_xlabel(f"sublayer (input to output), {depths[-1]} layers")
    right.set_ylabel("gradient norm at step 0")
    right.legend(fontsize=7)


# ---------------------------------------------------------------------------
# Claim 3: DeepNorm trains deep stacks where Post-LN fails, with Post-LN-like quality.
# ---------------------------------------------------------------------------


def _deepnorm_verdict(records: list[dict]) -> tuple[str, dict]:
    table = _by_setting(records)
    settings = _settings(table)
    rate = _rates(table, ("post", "deepnorm", "pre"), settings)
    post_fails = [(d, lr) for d, lr in settings if rate[("post", d, lr)] >= 2 / 3]
    rescued = [_label(d, lr) for d, lr in post_fails if rate[("deepnorm", d, lr)] == 0]
    # DeepNet's headline: Post-LN fails where DeepNorm and Pre-LN both train
    headline = [_label(d, lr) for d, lr in post_fails
                if rate[("deepnorm", d, lr)] == 0 and rate[("pre", d, lr)] == 0]
    quality = {}
    for d, lr in settings:
        pairs = _trained_in_every_seed(table, ("layernorm", "deepnorm"), ("layernorm", "post"), d, lr)
        if pairs:
            quality[_label(d, lr)] = _mean(dn / post - 1 for dn, post in pairs)
    close = sum(v <= 0.02 for v in quality.values())
    evidence = {
        "settings where Post-LN fails in >= 2/3 of seeds": [_label(*s) for s in post_fails],
        "... of those, where DeepNorm fails in none": rescued,
        "... and Pre-LN fails in none too": headline,
        "DeepNorm's validation loss relative to Post-LN's where both train (mean over seeds)":
            {k: f"{v:+.1%}" for k, v in quality.items()},
    }
    if rescued and quality and close > len(quality) / 2:
        return HOLDS, evidence
    also_fails = all(rate[("deepnorm", d, lr)] >= 2 / 3 for d, lr in post_fails)
    if (post_fails and also_fails) or (quality and close <= len(quality) / 2):
        return FAILS, evidence
    return UNSURE, evidence


def _val_loss_by_depth_plot(placements: tuple[str, ...]):
    """Validation loss by depth at each learning rate, a line per placement (mean over
    seeds; a failed run counts at its loss, the unigram line drawn dotted)."""
    def plot(records: list[dict], fig) -> None:
        table = _by_setting(records)
        lrs = sorted({lr for _, lr in _settings(table)})
        axes = fig.subplots(1, len(lrs), sharey=True, squeeze=False)[0]
        baseline = next(iter(records))["result"].get("unigram_loss")
        for ax, lr in zip(axes, lrs):
            for p in placements:
                depths = sorted(d for (n, pp, d, l) in table if n == "layernorm" and pp == p and l == lr)
                ax.plot(depths, [_mean(r["val_loss"] for r in table[("layernorm", p, d, lr)].values()) for d in depths],
                        marker="o", label=p)
            if baseline:
                ax.axhline(baseline, color="gray", linestyle=":", label="unigram line")
            ax.set_title(f"lr {lr:g}", fontsize=9)
            ax.set_xlabel("layers")
        axes[0].set_ylabel("validation loss (nats/char)")
        axes[0].legend(fontsize=7)
    return plot


# ---------------------------------------------------------------------------
# Claim 4: when both train, Post-LN reaches better quality than Pre-LN.
# ---------------------------------------------------------------------------


def _quality_verdict(records: list[dict]) -> tuple[str, dict]:
    table = _by_setting(records)
    wins = {}
    for d, lr in _settings(table):
        pairs = _trained_in_every_seed(table, ("layernorm", "post"), ("layernorm", "pre"), d, lr)
        if pairs:
            wins[_label(d, lr)] = ("post" if all(a < b for a, b in pairs) else "pre" if all(b < a for a, b in pairs)
                                   else "mixed", _mean(a for a, _ in pairs), _mean(b for _, b in pairs))
    post = sum(w[0] == "post" for w in wins.values())
    pre = sum(w[0] == "pre" for w in wins.values())
    evidence = {"where both train in every seed: better in every seed (Post-LN, Pre-LN mean val loss)":
                {k: f"{w} ({a:.3f}, {b:.3f})" for k, (w, a, b) in wins.items()}}
    if wins and post > len(wins) / 2:
        return HOLDS, evidence
    if wins and pre > len(wins) / 2:
        return FAILS, evidence
    return UNSURE, evidence


# ---------------------------------------------------------------------------
# Claim 5: Sandwich-LN keeps activations bounded where Pre-LN's grow with depth; it can
# still fail in very deep stacks.
# ---------------------------------------------------------------------------


def _stream_rms(result: dict) -> list[float]:
    """The residual stream's RMS after each sublayer at the end of training."""
    return [v for v in result["act_rms_by_layer"][max(result["act_rms_by_layer"], key=int)] if v]


def _growth(result: dict) -> float:
    """The residual stream's RMS after the last sublayer over that after the first."""
    values = _stream_rms(result)
    return values[-1] / values[0]


def _sandwich_verdict(records: list[dict]) -> tuple[str, dict]:
    table = _by_setting(records)
    settings = _settings(table)
    deepest, lr = _deepest(settings)
    runs = {p: table[("layernorm", p, deepest, lr)].values() for p in ("pre", "sandwich")}
    growth = {p: _mean(_growth(r) for r in runs[p]) for p in runs}
    last = {p: _mean(_stream_rms(r)[-1] for r in runs[p]) for p in runs}
    rate = _rates(table, ("sandwich",), settings)
    failures = [_label(d, l) for d, l in settings if rate[("sandwich", d, l)] > 0]
    bounded = growth["pre"] >= 2 and growth["sandwich"] <= growth["pre"] / 2
    evidence = {f"activation RMS growth, last sublayer / first ({_label(deepest, lr)}, end of training)":
                {p: round(g, 2) for p, g in growth.items()},
                "residual stream RMS after the last sublayer (for scale)": {p: round(v, 3) for p, v in last.items()},
                "settings where Sandwich-LN fails in some seed": failures}
    if bounded and failures:
        return HOLDS, evidence
    if growth["sandwich"] >= growth["pre"]:
        return FAILS, evidence
    return UNSURE, evidence


def _sandwich_plot(records: list[dict], fig) -> None:
    ax = fig.subplots()
    table = _by_setting(records)
    deepest, lr = _deepest(_settings(table))
    for p in ("pre", "sandwich"):
        runs = table.get(("layernorm", p, deepest, lr), {})
        for seed, r in sorted(runs.items()):
            act = r["act_rms_by_layer"]
            for step in sorted(act, key=int):
                ax.plot(range(1, len(act[step]) + 1), act[step], marker="o", markersize=2,
                        linestyle="-" if int(step) else ":", color="C0" if p == "pre" else "C1",
                        label=f"{p}, {'end' if int(step) else 'start'}" if seed == min(runs) else None)
    ax.set_yscale("log")
    ax.set_xlabel(f"sublayer (input to output), {_label(deepest, lr)}")
    ax.set_ylabel("residual stream RMS")
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------
# Claim 6: BatchNorm degrades at small batch sizes; LayerNorm and GroupNorm do not.
# ---------------------------------------------------------------------------


def _batch_runs(mode: str, seeds: int) -> list[dict]:
    from .vision import NORMS

    batches = by_mode(mode, (8, 32), (2, 4, 32), (2, 4, 8, 16, 32))
    return [keyed(f"cnn-{n}-b{b}-s{s}", kind="train_cnn", norm=n, batch=b, epochs=by_mode(mode, 1, 8, 15), lr=0.1,
                  seed=s, width=by_mode(mode, 8, 32, 32))
            for n, b, s in itertools.product(NORMS, batches, range(seeds))]


def _errors(records: list[dict]) -> dict[str, dict[int, float]]:
    """{norm: {batch: mean test error}}"""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        groups[(r["config"]["norm"], r["config"]["batch"])].append(r["result"]["test_error"])
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for (norm, batch), values in sorted(groups.items()):
        out[norm][batch] = _mean(values)
    return out


def _batch_verdict(records: list[dict]) -> tuple[str, dict]:
    errors = _errors(records)
    rise = {n: e[min(e)] - e[max(e)] for n, e in errors.items()}
    evidence = {"test error by batch size (mean over seeds)": {n: {b: f"{v:.1%}" for b, v in e.items()}
                                                               for n, e in errors.items()},
                "rise in test error from the largest batch to the smallest (points)":
                    {n: f"{100 * v:+.1f}" for n, v in rise.items()}}
    bn, others = rise["batchnorm"], [rise["layernorm"], rise["groupnorm"]]
    if bn >= 0.02 and all(o < bn / 2 for o in others):
        return HOLDS, evidence
    if bn < 0.01 or any(o >= bn for o in others):
        return FAILS, evidence
    return UNSURE, evidence


def _batch_plot(records: list[dict], fig) -> None:
    ax = fig.subplots()
    for norm, e in _errors(records).items():
        ax.plot(list(e), [100 * v for v in e.values()], marker="o", label=norm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (learning rate scaled with it)")
    ax.set_ylabel("test error (%)")
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------
# Claim 7: a LayerNorm's output for one sample does not depend on the batch or on
# padding; BatchNorm's does.  Exact checks, no training.
# ---------------------------------------------------------------------------


def _independence_runs(mode: str, seeds: int) -> list[dict]:
    return [keyed(f"indep-s{s}", kind="independence", seed=s) for s in range(max(1, seeds))]


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

        with torch.no_grad():
            alone = f(x0)[0]
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


def _independence_plot(records: list[dict], fig) -> None:
    ax = fig.subplots()
    checks = list(records[0]["result"]["layernorm"])
    for i, norm in enumerate(("layernorm", "batchnorm")):
        worst = [max(r["result"][norm][c] for r in records) for c in checks]
        bars = ax.bar([j + 0.4 * i for j in range(len(checks))], [max(w, 1e-12) for w in worst], 0.4, label=norm)
        ax.bar_label(bars, ["exactly 0" if w == 0 else f"{w:.2g}" for w in worst], fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.2 for j in range(len(checks))], checks, fontsize=7)
    ax.set_ylabel("max |difference| of one sample's output")
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------
# Claim 8: folding BatchNorm into the preceding layer removes its inference cost and
# keeps the outputs.
# ---------------------------------------------------------------------------


def _fold_runs(mode: str, seeds: int) -> list[dict]:
    return [keyed(f"fold-s{s}", kind="fold_cost", seed=s, width=by_mode(mode, 8, 32, 32), blocks=by_mode(mode, 1, 4, 4),
                  batch=16, rounds=by_mode(mode, 2, 10, 30), exclusive=True) for s in range(max(1, seeds))]


def _fold_verdict(records: list[dict]) -> tuple[str, dict]:
    res = [r["result"] for r in records]
    all_folded = all(r["folded"] == r["batch_norms"] for r in res)
    same = max(r["max_rel_diff"] for r in res) <= 1e-5
    faster = [r["unfolded_ms"] / r["folded_ms"] for r in res]
    evidence = {"BatchNorms folded": [f"{r['folded']}/{r['batch_norms']}" for r in res],
                "largest output difference / largest output": max(r["max_rel_diff"] for r in res),
                "inference speedup from folding (per measurement)": [f"{s:.2f}x" for s in faster]}
    if all_folded and same and all(s > 1 for s in faster):
        return HOLDS, evidence
    if not same or all(s < 1 for s in faster):
        return FAILS, evidence
    return UNSURE, evidence


def _fold_plot(records: list[dict], fig) -> None:
    ax = fig.subplots()
    for i, r in enumerate(records):
        res = r["result"]
        ax.bar([3 * i, 3 * i + 1], [res["unfolded_ms"], res["folded_ms"]], color=["C0", "C1"])
    ax.set_xticks([3 * i + 0.5 for i in range(len(records))], [f"seed {r['config']['seed']}" for r in records])
    ax.set_ylabel("ms per batch of 16 (blue: BatchNorm, orange: folded)")


# ---------------------------------------------------------------------------
# Claim 9: BatchNorm suits Transformers badly.
# ---------------------------------------------------------------------------


def _bn_lm_runs(mode: str, seeds: int) -> list[dict]:
    depths = by_mode(mode, (1,), (2,), (2, 6))
    return (_lm_runs(("pre",), mode, seeds, "layernorm", depths)
            + _lm_runs(("pre",), mode, seeds, "batchnorm", depths))


def _bn_lm_verdict(records: list[dict]) -> tuple[str, dict]:
    table = _by_setting(records)
    worse = better = 0
    detail = {}
    for d, lr in _settings(table):
        bn, ln = table.get(("batchnorm", "pre", d, lr), {}), table.get(("layernorm", "pre", d, lr), {})
        seeds = sorted(set(bn) & set(ln))
        if not seeds:
            continue
        more_failures = sum(bn[s]["failed"] for s in seeds) > sum(ln[s]["failed"] for s in seeds)
        higher = all(bn[s]["val_loss"] > ln[s]["val_loss"] or bn[s]["failed"] for s in seeds)
        lower = all(bn[s]["val_loss"] < ln[s]["val_loss"] for s in seeds) and not any(bn[s]["failed"] for s in seeds)
        worse += more_failures or higher
        better += lower
        detail[_label(d, lr)] = (f"BatchNorm {_mean(bn[s]['val_loss'] for s in seeds):.3f} "
                                 f"({sum(bn[s]['failed'] for s in seeds)} failed), LayerNorm "
                                 f"{_mean(ln[s]['val_loss'] for s in seeds):.3f} ({sum(ln[s]['failed'] for s in seeds)} failed)")
    evidence = {"Pre-LN decoder, mean validation loss": detail}
    if detail and worse > len(detail) / 2:
        return HOLDS, evidence
    if detail and better > len(detail) / 2:
        return FAILS, evidence
    return UNSURE, evidence


def _bn_lm_plot(records: list[dict], fig) -> None:
    ax = fig.subplots()
    for r in sorted(records, key=lambda r: (r["config"]["norm"], r["config"]["n_layers"], r["config"]["lr"])):
        c = r["config"]
        if c["seed"] == 0:
            steps, losses = zip(*r["result"]["losses"]) if r["result"]["losses"] else ((), ())
            ax.plot(steps, losses, color="C0" if c["norm"] == "layernorm" else "C3",
                    alpha=0.4 + 0.6 * (c["lr"] == 1e-3), label=f"{c['norm']}, {_label(c['n_layers'], c['lr'])}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (seed 0)")
    ax.legend(fontsize=6)


# ---------------------------------------------------------------------------
# Claim 10: at inference BatchNorm is faster than LayerNorm (stored statistics).
# ---------------------------------------------------------------------------


def _inference_runs(mode: str, seeds: int) -> list[dict]:
    shapes = by_mode(mode, ((64, 128),), ((4096, 256), (512, 4096)),
                     ((1, 4096), (64, 1024), (4096, 256), (2048, 768), (512, 4096)))
    return [keyed(f"infer-{b}-{dt}-{s[0]}x{s[1]}", kind="inference_norm_cost", backend=b, dtype=dt, shape=list(s),
                  rounds=by_mode(mode, 2, 15, 40), exclusive=True)
            for b, dt, s in itertools.product(("torch", "addnorm"), ("float32", "bfloat16"), shapes)]


def _inference_verdict(records: list[dict]) -> tuple[str, dict]:
    by_backend: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_backend[r["config"]["backend"]].append(r["result"]["speedup"])
    share = {b: sum(s > 1 for s in v) / len(v) for b, v in by_backend.items()}
    evidence = {f"{b}: cells where eval BatchNorm is faster (speedups)":
                f"{sum(s > 1 for s in v)}/{len(v)} ({', '.join(f'{s:.2f}x' for s in v)})"
                for b, v in by_backend.items()}
    if all(s >= 2 / 3 for s in share.values()):
        return HOLDS, evidence
    if all(s <= 1 / 3 for s in share.values()):
        return FAILS, evidence
    return UNSURE, evidence


def _inference_plot(records: list[dict], fig) -> None:
    ax = fig.subplots()
    for i, backend in enumerate(("torch", "addnorm")):
        mine = [r for r in records if r["config"]["backend"] == backend]
        ax.bar([j + 0.4 * i for j in range(len(mine))], [r["result"]["speedup"] for r in mine], 0.4, label=backend)
    labels = [f"{r['config']['shape'][0]}x{r['config']['shape'][1]}\n{r['config']['dtype']}"
              for r in records if r["config"]["backend"] == "torch"]
    ax.set_xticks([j + 0.2 for j in range(len(labels))], labels, fontsize=6)
    ax.axhline(1, color="black", linewidth=0.5)
    ax.set_ylabel("LayerNorm time / eval BatchNorm time")
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------

_GRID_RULE = f" Runs: a character-level decoder, AdamW (betas 0.9, 0.95), no warm-up; a run {FAILURE}."

CLAIMS: dict[int, Claim] = {
    1: Claim(1, "RMSNorm costs 7%-64% less time than LayerNorm",
             "saving = 1 - RMSNorm's time / LayerNorm's, per cell (shape x dtype x pass: forward without "
             "grad, forward+backward), timed interleaved in one process. Holds if the median saving is at least "
             "7% for every backend (torch eager, torch.compile, addnorm) and on the whole training step; does "
             "not hold if it is below 7% for all of them; inconclusive where they disagree.",
             _cost_runs, _cost_verdict, _cost_plot),
    2: Claim(2, "Post-LN becomes unstable as depth grows; Pre-LN stays stable",
             "holds if at some (depth, lr) Post-LN fails in >= 2/3 of seeds while Pre-LN fails in none, and "
             "Post-LN fails more often at the largest depth than at the smallest; does not hold if some run "
             "fails and Post-LN fails no more often than Pre-LN at every depth; inconclusive otherwise (also "
             "when no run fails: the grid did not reach instability)." + _GRID_RULE,
             lambda m, s: _lm_runs(("post", "pre"), m, s), _depth_verdict, _depth_plot),
    3: Claim(3, "DeepNorm trains deep stacks where Post-LN fails, with Post-LN-like quality",
             "holds if at some (depth, lr) where Post-LN fails in >= 2/3 of seeds DeepNorm fails in none, and "
             "where both train in every seed DeepNorm's validation loss is within 2% of Post-LN's (or lower) in "
             "a majority of settings; does not hold if DeepNorm also fails in >= 2/3 of seeds wherever Post-LN "
             "does, or its loss is more than 2% worse in a majority; inconclusive otherwise (e.g. Post-LN never "
             "fails, or DeepNorm fails less often than Post-LN but not never)." + _GRID_RULE,
             lambda m, s: _lm_runs(("post", "deepnorm", "pre"), m, s), _deepnorm_verdict,
             _val_loss_by_depth_plot(("post", "deepnorm", "pre"))),
    4: Claim(4, "When both train, Post-LN reaches better quality than Pre-LN",
             "over the (depth, lr) settings where Post-LN and Pre-LN both train in every seed: holds if "
             "Post-LN's validation loss is lower than Pre-LN's in every seed in a majority of them; does not "
             "hold if Pre-LN's is lower in every seed in a majority; inconclusive otherwise." + _GRID_RULE,
             lambda m, s: _lm_runs(("post", "pre"), m, s), _quality_verdict,
             _val_loss_by_depth_plot(("post", "pre"))),
    5: Claim(5, "Sandwich-LN keeps activations bounded where Pre-LN's grow with depth; it can still fail "
                "in very deep stacks",
             "growth = residual-stream RMS after the last sublayer / after the first, end of training, deepest "
             "stack, smallest lr, mean over seeds. Holds if Pre-LN's growth is >= 2, Sandwich-LN's at most half "
             "of Pre-LN's, and Sandwich-LN fails in some setting of the grid; does not hold if Sandwich-LN's "
             "growth is not below Pre-LN's; inconclusive otherwise." + _GRID_RULE,
             lambda m, s: _lm_runs(("pre", "sandwich"), m, s), _sandwich_verdict, _sandwich_plot),
    6: Claim(6, "BatchNorm degrades at small batch sizes; LayerNorm and GroupNorm do not",
             "a 3-conv CNN on scikit-learn's digits (1,797 real 8x8 images, fixed 75/25 split), the same epochs "
             "at every batch size, learning rate scaled with the batch; rise = test error at the smallest batch "
             "- at the largest, mean over seeds. Holds if BatchNorm's rise is >= 2 points and LayerNorm's and "
             "GroupNorm's are under half of it; does not hold if BatchNorm's rise is under 1 point or not above "
             "theirs; inconclusive otherwise.",
             _batch_runs, _batch_verdict, _batch_plot),
    7: Claim(7, "A LayerNorm's output for one sample does not depend on the batch or on padding; "
                "BatchNorm's does",
             "holds if every LayerNorm difference is exactly 0 and every BatchNorm difference exceeds "
             "1e-3; does not hold if a LayerNorm difference exceeds 1e-6 or a BatchNorm one is 0; "
             "inconclusive otherwise.",
             _independence_runs, _independence_verdict, _independence_plot),
    8: Claim(8, "Folding BatchNorm into the preceding layer removes its inference cost and keeps the outputs",
             "a ResNet-style CNN (stem and 4 residual blocks, 9 BatchNorms, 32 channels, 32x32 images, batch "
             "16), eval mode, before and after addnorm.fold_batch_norm. Holds if every BatchNorm folds, the "
             "outputs agree within 1e-5 of their scale, and the folded model is faster in every measurement; "
             "does not hold if the outputs differ more or it is slower in every measurement; inconclusive "
             "otherwise.",
             _fold_runs, _fold_verdict, _fold_plot),
    9: Claim(9, "BatchNorm suits Transformers badly: a BatchNorm Transformer LM trains worse or less stably "
                "than a LayerNorm one",
             "the same Pre-LN decoder with BatchNorm over tokens and with LayerNorm. Holds if, in a majority "
             "of settings, BatchNorm fails in more seeds or has the higher validation loss in every seed; does "
             "not hold if in a majority BatchNorm's is lower in every seed with no failure; inconclusive "
             "otherwise." + _GRID_RULE,
             _bn_lm_runs, _bn_lm_verdict, _bn_lm_plot),
    10: Claim(10, "At inference BatchNorm is faster than LayerNorm, since it uses stored statistics",
              "eval-mode BatchNorm1d against LayerNorm on the same (tokens, channels) activations, no grad, "
              "timed interleaved, torch.nn's and addnorm's. Holds if BatchNorm is faster in >= 2/3 of the "
              "cells of each; does not hold if it is faster in <= 1/3 of each; inconclusive otherwise.",
              _inference_runs, _inference_verdict, _inference_plot),
}


def execute(config: dict) -> dict:
    """Run one config (in this process or a worker's)."""
    kind = config["kind"]
    if kind == "train_lm":
        from .train import train_lm

        return train_lm(config)
    if kind == "train_cnn":
        from .vision import train_cnn

        return train_cnn(config)
    if kind == "independence":
        return independence_check(config)
    from . import timing

    if kind in ("norm_cost", "train_step_cost", "fold_cost", "inference_norm_cost"):
        return getattr(timing, kind)(config)
    raise ValueError(f"unknown run kind {kind!r}")
