"""``addnorm bench``: addnorm against torch eager and torch.compile, in one process.

For each op, shape, dtype and pass (forward, forward+backward) it times addnorm (the
default backend for the device), torch eager and ``torch.compile`` of the same torch
code (its compile time reported apart), interleaving the contenders round by round so
a noisy machine slows all of them alike, and keeps the best round of each.  Ratios are
torch's time over addnorm's (above 1: addnorm is faster).  GB/s counts the bytes an op
must move at the least (read inputs, write outputs), set against the bandwidth of a
plain copy measured here, the ceiling for these memory-bound ops.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import addnorm
import addnorm.functional as AF

ROW_SHAPES = [(4096, 4096), (16384, 1024), (2048, 8192)]
CHANNEL_SHAPE = (32, 64, 56, 56)


@dataclass
class Case:
    """One benchmark: ``make(dtype)`` returns the inputs; each contender maps them to
    the output tensor(s); ``grads`` names the inputs that get gradients."""

    op: str
    shape: tuple[int, ...]
    layout: str
    ours: Callable
    torch: Callable
    make: Callable
    traffic: tuple[int, int]  # tensors of x's size the forward, the backward must move
    grads: tuple[int, ...] = (0,)


@dataclass
class Result:
    op: str
    shape: list[int]
    layout: str
    dtype: str
    pass_: str
    ms: dict[str, float] = field(default_factory=dict)
    compile_s: float | None = None
    gbps: float | None = None
    copy_gbps: float | None = None

    def ratio(self, other: str) -> float | None:
        if other in self.ms and "addnorm" in self.ms:
            return self.ms[other] / self.ms["addnorm"]
        return None


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _row_inputs(shape, dtype, residual=False, bias=True):
    g = torch.Generator().manual_seed(0)
    d = shape[-1]
    x = torch.randn(shape, generator=g).to(dtype)
    w = torch.randn(d, generator=g).to(dtype)
    b = torch.randn(d, generator=g).to(dtype) if bias else None
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    return [x, r, w, b] if residual else [x, w, b]


def _channel_inputs(shape, dtype, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w, b = torch.randn(c, generator=g).to(dtype), torch.randn(c, generator=g).to(dtype)
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    return [x, w, b, rm, rv]


def _backend_name() -> str:
    return addnorm._backend.select(torch.device("cpu"))


def _row_cases(shape) -> list[Case]:
    d = shape[-1]
    return [
        Case("rms_norm", shape, "rows",
             lambda x, w, b: AF.rms_norm(x, (d,), w, 1e-6),
             lambda x, w, b: F.rms_norm(x, (d,), w, 1e-6),
             lambda dt: _row_inputs(shape, dt, bias=False), (2, 3), grads=(0, 1)),
        Case("layer_norm", shape, "rows",
             lambda x, w, b: AF.layer_norm(x, (d,), w, b),
             lambda x, w, b: F.layer_norm(x, (d,), w, b),
             lambda dt: _row_inputs(shape, dt), (2, 3), grads=(0, 1, 2)),
        Case("add_rms_norm", shape, "rows",
             lambda x, r, w, b: AF.add_rms_norm(x, r, (d,), w, 1e-6),
             lambda x, r, w, b: (F.rms_norm(x + r, (d,), w, 1e-6), x + r),
             lambda dt: _row_inputs(shape, dt, residual=True, bias=False), (4, 4), grads=(0, 1, 2)),
        Case("add_layer_norm", shape, "rows",
             lambda x, r, w, b: AF.add_layer_norm(x, r, (d,), w, b),
             lambda x, r, w, b: (F.layer_norm(x + r, (d,), w, b), x + r),
             lambda dt: _row_inputs(shape, dt, residual=True), (4, 4), grads=(0, 1, 2, 3)),
    ]


def _channel_cases(shape, layout) -> list[Case]:
    return [
        Case("batch_norm_train", shape, layout,
             lambda x, w, b, rm, rv: AF.batch_norm(x, rm, rv, w, b, True),
             lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, True),
             lambda dt: _channel_inputs(shape, dt, layout), (2, 3), grads=(0, 1, 2)),
        Case("batch_norm_eval", shape, layout,
             lambda x, w, b, rm, rv: AF.batch_norm(x, rm, rv, w, b, False),
             lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, False),
             lambda dt: _channel_inputs(shape, dt, layout), (2, 3), grads=(0, 1, 2)),
        Case("group_norm", shape, layout,
             lambda x, w, b, rm, rv: AF.group_norm(x, 32, w, b),
             lambda x, w, b, rm, rv: F.group_norm(x, 32, w, b),
             lambda dt: _channel_inputs(shape, dt, layout), (2, 3), grads=(0, 1, 2)),
    ]


def _dyt_case(shape) -> Case:
    def make(dt):
        g = torch.Generator().manual_seed(0)
        return [torch.randn(shape, generator=g).to(dt), torch.full((1,), 0.5, dtype=dt),
                torch.randn(shape[-1], generator=g).to(dt), torch.randn(shape[-1], generator=g).to(dt)]

    return Case("dyt", shape, "rows", lambda x, a, w, b: AF.dyt(x, a, w, b),
                lambda x, a, w, b: w * torch.tanh(a * x) + b, make, (2, 3), grads=(0, 1, 2, 3))


def cases(quick: bool) -> list[Case]:
    """Rows at (4096, 4096), (16384, 1024), (2048, 8192); BatchNorm and GroupNorm at
    (32, 64, 56, 56), contiguous and channels-last; DyT.  Quick: the first of each."""
    out = [c for shape in ROW_SHAPES[: 1 if quick else None] for c in _row_cases(shape)]
    for layout in ["contiguous"] if quick else ["contiguous", "channels_last"]:
        out += _channel_cases(CHANNEL_SHAPE, layout)
    if not quick:
        out.append(_dyt_case(ROW_SHAPES[0]))
    return out


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _runner(fn: Callable, inputs: list, backward: bool, grads: tuple[int, ...]):
    """A no-argument call of ``fn`` on fresh leaves of ``inputs``: forward, or forward
    and a backward from fixed cotangents."""
    if not backward:
        def forward():
            with torch.no_grad():
                return fn(*inputs)
        return forward
    leaves = [t.detach().clone().requires_grad_(i in grads) if t is not None else None
              for i, t in enumerate(inputs)]
    with torch.no_grad():
        cots = [torch.randn_like(o) for o in _outputs(fn(*inputs))]

    def forward_backward():
        for t in leaves:
            if t is not None:
                t.grad = None
        outs = _outputs(fn(*leaves))
        torch.autograd.backward(outs, cots)
    return forward_backward


def _time_rounds(runners: dict[str, Callable], rounds: int) -> dict[str, float]:
    """Best time of each runner, in ms, over ``rounds`` interleaved rounds."""
    best = {name: float("inf") for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            t = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: 1e3 * t for name, t in best.items()}


def copy_bandwidth(nbytes: int, rounds: int = 10) -> float:
    """GB/s of a plain copy of ``nbytes`` into a preallocated tensor (read + write)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = _time_rounds({"copy": lambda: dst.copy_(src)}, rounds)["copy"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def run(quick: bool = False, compile: bool = True, rounds: int | None = None,
        dtypes=(torch.float32, torch.bfloat16), console: Console | None = None,
        ops: set[str] | None = None) -> list[Result]:
    """Every case (``ops``: only those ops) in each dtype, forward and forward+backward."""
    console = console or Console()
    rounds = rounds or (3 if quick else 7)
    todo = [(c, dt, bw) for c in cases(quick) if not ops or c.op in ops
            for dt in dtypes for bw in (False, True)]
    results: list[Result] = []
    copy_cache: dict[int, float] = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(todo))
        for case, dtype, backward in todo:
            name = f"{case.op} {case.shape} {str(dtype)[6:]} {'fwd+bwd' if backward else 'fwd'}"
            progress.update(task, description=name)
            inputs = case.make(dtype)
            runners = {
                "addnorm": _runner(case.ours, inputs, backward, case.grads),
                "torch": _runner(case.torch, inputs, backward, case.grads),
            }
            result = Result(case.op, list(case.shape), case.layout, str(dtype)[6:],
                            "fwd+bwd" if backward else "fwd")
            if compile and (not quick or case.op == "rms_norm"):
                torch._dynamo.reset()  # the lambdas share code objects: no recompile limit
                compiled = torch.compile(case.torch, dynamic=False)
                runners["compile"] = _runner(compiled, inputs, backward, case.grads)
                t = time.perf_counter()
                runners["compile"]()  # compiles
                result.compile_s = time.perf_counter() - t
            for run_ in runners.values():
                run_()  # warm: kernels compiled, caches and page tables filled
            result.ms = _time_rounds(runners, rounds)
            moved = _nbytes(inputs[0]) * (sum(case.traffic) if backward else case.traffic[0])
            result.gbps = moved / (result.ms["addnorm"] * 1e-3) / 1e9
            size = _nbytes(inputs[0])
            if size not in copy_cache:
                copy_cache[size] = copy_bandwidth(size)
            result.copy_gbps = copy_cache[size]
            results.append(result)
            progress.advance(task)
    return results


def preallocated(shape=(4096, 4096), dtypes=(torch.float32, torch.bfloat16), rounds=10):
    """The numba row kernel writing into preallocated outputs, against a copy of the
    same tensor: how close the forward comes to the memory bandwidth, allocation aside."""
    from .kernels import cpu

    rows = []
    for dtype in dtypes:
        x = torch.randn(shape).to(dtype)
        w, b = torch.randn(shape[-1]).to(dtype), torch.randn(shape[-1]).to(dtype)
        y, dst = torch.empty_like(x), torch.empty_like(x)
        acc = cpu.acc_dtype(dtype)
        mean, rstd = torch.empty(shape[0], dtype=acc), torch.empty(shape[0], dtype=acc)
        a = [cpu._np(t) for t in (x, w, b, y, mean, rstd)]
        cpu._threads()
        runners = {
            "copy": lambda: dst.copy_(x),
            "rms_norm": lambda: cpu._row_norm_fwd(a[0], None, a[1], None, a[3], None, None, a[5], 1e-6, 0.0),
            "layer_norm": lambda: cpu._row_norm_fwd(a[0], None, a[1], a[2], a[3], None, a[4], a[5], 1e-5, 0.0),
        }
        for run_ in runners.values():
            run_()
        ms = _time_rounds(runners, rounds)
        gbps = {k: 2 * _nbytes(x) / (v * 1e-3) / 1e9 for k, v in ms.items()}
        for op in ("rms_norm", "layer_norm"):
            rows.append({"op": op, "dtype": str(dtype)[6:], "shape": list(shape), "ms": ms[op],
                         "gbps": gbps[op], "copy_gbps": gbps["copy"],
                         "fraction_of_copy": gbps[op] / gbps["copy"]})
    return rows


def _row(r: Result) -> list[str]:
    ratio, cratio = r.ratio("torch"), r.ratio("compile")
    return [
        r.op, "x".join(map(str, r.shape)), r.layout, r.dtype, r.pass_,
        f"{r.ms['addnorm']:.2f}", f"{r.ms['torch']:.2f}", f"{ratio:.2f}x",
        f"{r.ms['compile']:.2f}" if cratio else "-", f"{cratio:.2f}x" if cratio else "-",
        f"{r.compile_s:.1f}" if r.compile_s else "-",
        f"{r.gbps:.1f}", f"{100 * r.gbps / r.copy_gbps:.0f}%",
    ]


COLUMNS = ("op", "shape", "layout", "dtype", "pass", "addnorm ms", "torch ms", "vs torch",
           "compiled ms", "vs compiled", "compile s", "GB/s", "% of copy")


def table(results: list[Result]) -> Table:
    t = Table(title=f"addnorm bench: {_backend_name()} backend, "
                    f"{torch.get_num_threads()} threads; vs = torch time / addnorm time")
    for col in COLUMNS:
        t.add_column(col, justify="left" if col in ("op", "layout", "pass") else "right")
    for r in results:
        cells = _row(r)
        colour = "green" if r.ratio("torch") >= 1 else "red"
        cells[7] = f"[{colour}]{cells[7]}[/]"
        t.add_row(*cells)
    return t


def markdown(results: list[Result]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in results]
    return "\n".join(lines) + "\n"


def preallocated_table(rows) -> Table:
    t = Table(title="forward into a preallocated output (kernel only) vs a plain copy")
    for col in ("op", "dtype", "shape", "ms", "GB/s", "copy GB/s", "% of copy"):
        t.add_column(col, justify="left" if col in ("op", "dtype") else "right")
    for r in rows:
        t.add_row(r["op"], r["dtype"], "x".join(map(str, r["shape"])), f"{r['ms']:.2f}",
                  f"{r['gbps']:.1f}", f"{r['copy_gbps']:.1f}", f"{100 * r['fraction_of_copy']:.0f}%")
    return t


def save(results: list[Result], out: Path, prealloc=None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__, "addnorm": addnorm.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "backend": _backend_name(),
    }
    (out / "bench.json").write_text(json.dumps(
        {"meta": meta, "results": [asdict(r) for r in results], "preallocated": prealloc or []},
        indent=1))
    md = markdown(results)
    if prealloc:
        md += "\n| op | dtype | preallocated ms | GB/s | % of copy |\n|---|---|---:|---:|---:|\n"
        md += "".join(f"| {r['op']} | {r['dtype']} | {r['ms']:.2f} | {r['gbps']:.1f} "
                      f"| {100 * r['fraction_of_copy']:.0f}% |\n" for r in prealloc)
    (out / "bench.md").write_text(md)
