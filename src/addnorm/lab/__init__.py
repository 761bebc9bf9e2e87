"""``addnorm lab``: the seed articles' claims answered with measurements.

``run(out, mode, claims, seeds, workers)`` runs what ``out/runs.jsonl`` does not hold
yet (a record per run, flushed as it finishes: a killed lab resumes where it stopped),
then writes ``claims.json``, a PNG per claim and ``report.html`` there.  Claims live in
``claims.py``, each with its runs, its verdict rule and its picture.

Training runs go to ``workers`` processes of one thread each; timed runs
(``exclusive``) run afterwards in this process alone, so no worker disturbs the clock.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import os
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .claims import CLAIMS, by_mode, estimate, execute
from .report import write
from .store import RunStore


def _versions() -> dict:
    import addnorm

    return {"addnorm": addnorm.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _one_thread() -> None:
    torch.set_num_threads(1)  # workers share the cores: one thread each


def plan(claims: list[int] | None, mode: str, seeds: int) -> dict[int, list[dict]]:
    """{claim id: its run configs}; refuses an unknown claim or mode (``by_mode``)."""
    unknown = sorted(set(claims or ()) - set(CLAIMS))
    if unknown:
        raise ValueError(f"claims must be among {sorted(CLAIMS)}; got {unknown}")
    return {i: CLAIMS[i].runs(mode, seeds) for i in sorted(claims or CLAIMS)}


class _Progress:
    """Which claim, which run, and an ETA from the runs' estimated costs: a rich bar on a
    terminal, a line per finished run otherwise (CI logs, pipes)."""

    def __init__(self, console: Console, todo: list[tuple[int, dict]], stack: contextlib.ExitStack) -> None:
        self.console, self.start = console, time.perf_counter()
        self.total = sum(estimate(cfg) for _, cfg in todo) or 1.0
        self.count, self.done, self.cost = len(todo), 0, 0.0
        self.bar = None
        if console.is_terminal and todo:
            self.bar = stack.enter_context(Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"), console=console, transient=True))
            self.task = self.bar.add_task("lab", total=self.count, eta="?")

    def starting(self, claim: int, cfg: dict) -> None:
        """A run that runs alone begins: the bar names it (pooled runs are named as they finish)."""
        if self.bar is not None:
            self.bar.update(self.task, description=f"running claim {claim}: {cfg['key']}")

    def finished(self, claim: int, cfg: dict, seconds: float) -> None:
        self.done += 1
        self.cost += estimate(cfg)
        elapsed = time.perf_counter() - self.start
        eta = f"{elapsed / self.cost * (self.total - self.cost):.0f} s"
        what = f"claim {claim}: {cfg['key']} done"
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=what, eta=eta)
        else:
            self.console.print(f"[{self.done}/{self.count}] {what} ({seconds:.1f} s), ETA {eta}", highlight=False)


def run(out: str | os.PathLike = "lab-out", mode: str = "full", claims: list[int] | None = None,
        seeds: int | None = None, workers: int = 1, console: Console | None = None) -> list[dict]:
    """Run the chosen claims' missing runs at ``mode``'s settings ("quick": minutes on
    2 cores; "full": DeepNet's depths; "tiny": a smoke test in seconds that decides
    nothing), then write the verdicts and the report; returns the verdicts (as
    ``claims.json`` holds them)."""
    console = console or Console()
    seeds = seeds or by_mode(mode, 1, 2, 3)
    runs = plan(claims, mode, seeds)
    store = RunStore(out)
    done = store.done()
    todo: dict[str, tuple[int, dict]] = {}
    for claim, configs in runs.items():
        for cfg in configs:
            if cfg["key"] not in done:
                todo.setdefault(cfg["key"], (claim, cfg))  # a run two claims share runs once
    pooled = [t for t in todo.values() if not t[1].get("exclusive")]
    alone = [t for t in todo.values() if t[1].get("exclusive")]
    console.print(f"addnorm lab ({mode}): claims {list(runs)}, {len(todo)} runs to do "
                  f"({len(pooled)} on {workers} worker(s), then {len(alone)} timed alone), "
                  f"{len(done)} already recorded in {store.path}", highlight=False)

    with contextlib.ExitStack() as stack:
        progress = _Progress(console, pooled + alone, stack)

        def finished(claim: int, cfg: dict, result: dict, seconds: float) -> None:
            store.append({"key": cfg["key"], "claim": claim, "config": cfg, "result": result,
                          "versions": _versions(), "seconds": round(seconds, 2), "finished": time.time()})
            progress.finished(claim, cfg, seconds)

        if workers > 1 and len(pooled) > 1:
            with futures.ProcessPoolExecutor(workers, initializer=_one_thread) as pool:
                jobs = {pool.submit(_timed, cfg): (claim, cfg) for claim, cfg in pooled}
                for job in futures.as_completed(jobs):
                    finished(*jobs[job], *job.result())
        else:
            alone = pooled + alone
        for claim, cfg in alone:
            progress.starting(claim, cfg)
            finished(claim, cfg, *_timed(cfg))

    header = (f"{mode} lab, {seeds} seeds; " + ", ".join(f"{k} {v}" for k, v in _versions().items())
              + f"; {_cpu()}, {os.cpu_count()} cores")
    by_key = {r["key"]: r for r in store.records()}
    records = {i: [by_key[c["key"]] for c in configs if c["key"] in by_key] for i, configs in runs.items()}
    results = write(Path(out), records, header, time.perf_counter() - progress.start)
    for r in results:
        console.print(f"claim {r['id']}: {r['verdict']} ({r['runs']} runs) - {r['claim']}", highlight=False)
    console.print(f"report: {Path(out) / 'report.html'}")
    return results


def _timed(cfg: dict) -> tuple[dict, float]:
    start = time.perf_counter()
    result = execute(cfg)
    return result, time.perf_counter() - start


def _cpu() -> str:
    from ..bench import cpu_model

    return cpu_model()


__all__ = ["run", "plan", "CLAIMS"]
