"""``addnorm lab``: the seed articles' claims answered with measurements.

``run(out, quick, claims, seeds, workers)`` runs what ``out/runs.jsonl`` does not hold
yet (a record per run, flushed as it finishes: a killed lab resumes where it stopped),
then writes ``claims.json`` and ``report.html`` there.  Claims live in ``claims.py``,
each with its runs, its verdict rule and its picture.
"""

from __future__ import annotations

import concurrent.futures as futures
import os
import platform
import time
from pathlib import Path

import torch
from rich.console import Console

from .claims import CLAIMS, execute
from .report import write
from .store import RunStore


def _versions() -> dict:
    import addnorm

    return {"addnorm": addnorm.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _one_thread() -> None:
    torch.set_num_threads(1)  # workers share the cores: one thread each


def run(out: str | os.PathLike = "lab-out", quick: bool = False, claims: list[int] | None = None,
        seeds: int | None = None, workers: int = 1, console: Console | None = None) -> list[dict]:
    console = console or Console()
    unknown = sorted(set(claims or ()) - set(CLAIMS))
    if unknown:
        raise ValueError(f"claims must be among {sorted(CLAIMS)}; got {unknown}")
    chosen = [CLAIMS[i] for i in sorted(claims or CLAIMS)]
    seeds = seeds or (2 if quick else 3)
    store = RunStore(out)
    done = store.done()
    todo = [(c.id, cfg) for c in chosen for cfg in c.runs(quick, seeds) if cfg["key"] not in done]
    console.print(f"addnorm lab: claims {[c.id for c in chosen]}, {len(todo)} runs to do "
                  f"({len(done)} already recorded in {store.path})")
    start = time.perf_counter()

    def finished(k: int, claim: int, cfg: dict, result: dict) -> None:
        store.append({"key": cfg["key"], "claim": claim, "config": cfg, "result": result,
                      "versions": _versions(), "finished": time.time()})
        elapsed = time.perf_counter() - start
        eta = elapsed / k * (len(todo) - k)
        console.print(f"[{k}/{len(todo)}] claim {claim} {cfg['key']} done, ETA {eta:.0f} s", highlight=False)

    if workers > 1 and len(todo) > 1:
        with futures.ProcessPoolExecutor(workers, initializer=_one_thread) as pool:
            jobs = {pool.submit(execute, cfg): (claim, cfg) for claim, cfg in todo}
            for k, job in enumerate(futures.as_completed(jobs), 1):
                finished(k, *jobs[job], job.result())
    else:
        for k, (claim, cfg) in enumerate(todo, 1):
            finished(k, claim, cfg, execute(cfg))
    header = (f"{'quick' if quick else 'full'} lab, {seeds} seeds; " + ", ".join(f"{k} {v}" for k, v in _versions().items())
              + f"; {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    results = write(Path(out), chosen, [r for r in store.records() if r["claim"] in {c.id for c in chosen}], header)
    for r in results:
        console.print(f"claim {r['id']}: {r['verdict']} ({r['runs']} runs) - {r['title']}", highlight=False)
    console.print(f"report: {Path(out) / 'report.html'}")
    return results


__all__ = ["run", "CLAIMS"]
