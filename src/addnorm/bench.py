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

import contextlib
import importlib
import json
import os
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
    remeasured: bool = False
    untrusted: str | None = None  # why these timings cannot be right, after a re-measure

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


def _unfused(norm, x, residual, *args):
    """torch's add+norm as a model writes it: r = x + residual (once), then norm(r)."""
    r = x + residual
    return norm(r, *args), r


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
             lambda x, r, w, b: _unfused(F.rms_norm, x, r, (d,), w, 1e-6),
             lambda dt: _row_inputs(shape, dt, residual=True, bias=False), (4, 4), grads=(0, 1, 2)),
        Case("add_layer_norm", shape, "rows",
             lambda x, r, w, b: AF.add_layer_norm(x, r, (d,), w, b),
             lambda x, r, w, b: _unfused(F.layer_norm, x, r, (d,), w, b),
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
        Case("instance_norm", shape, layout,
             lambda x, w, b, rm, rv: AF.instance_norm(x, None, None, w, b),
             lambda x, w, b, rm, rv: F.instance_norm(x, None, None, w, b),
             lambda dt: _channel_inputs(shape, dt, layout), (2, 3), grads=(0, 1, 2)),
    ]


def _dyt_case(shape) -> Case:
    def make(dt):
        g = torch.Generator().manual_seed(0)
        return [torch.randn(shape, generator=g).to(dt), torch.full((1,), 0.5, dtype=dt),
                torch.randn(shape[-1], generator=g).to(dt), torch.randn(shape[-1], generator=g).to(dt)]

    return Case("dyt", shape, "rows", lambda x, a, w, b: AF.dyt(x, a, w, b),
                lambda x, a, w, b: w * torch.tanh(a * x) + b, make, (2, 3), grads=(0, 1, 2, 3))


def _scale_norm_case(shape) -> Case:
    """ScaleNorm against its authors' torch code (``x * g / ||x||.clamp(eps)``)."""
    def make(dt):
        g = torch.Generator().manual_seed(0)
        return [torch.randn(shape, generator=g).to(dt), torch.full((1,), shape[-1] ** 0.5, dtype=dt)]

    return Case("scale_norm", shape, "rows", lambda x, g: AF.scale_norm(x, g),
                lambda x, g: x * (g / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-5)),
                make, (2, 3), grads=(0, 1))


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


PASSES = ("fwd", "fwd grad", "fwd+bwd")  # no_grad forward; forward recording a graph; both


def _runner(fn: Callable, inputs: list, pass_: str | bool, grads: tuple[int, ...]):
    """A no-argument call of ``fn`` on ``inputs`` for one of ``PASSES`` (a bool:
    forward+backward or not): the forward under no_grad, the forward on leaves that
    require grad (what a training step's forward pays), or that and a backward from
    fixed cotangents."""
    pass_ = {True: "fwd+bwd", False: "fwd"}.get(pass_, pass_)
    if pass_ == "fwd":
        def forward():
            with torch.no_grad():
                return fn(*inputs)
        return forward
    leaves = [t.detach().clone().requires_grad_(i in grads) if t is not None else None
              for i, t in enumerate(inputs)]
    if pass_ == "fwd grad":
        return lambda: fn(*leaves)
    with torch.no_grad():
        cots = [torch.randn_like(o) for o in _outputs(fn(*inputs))]

    def forward_backward():
        for t in leaves:
            if t is not None:
                t.grad = None
        outs = _outputs(fn(*leaves))
        torch.autograd.backward(outs, cots)
    return forward_backward


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header() -> str:
    """What a number depends on, printed before any number."""
    import numba

    from .kernels import cpp

    return (f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
            f" | torch {torch.__version__}, numba {numba.__version__}, addnorm {addnorm.__version__}"
            f" | backend {_backend_name()}, numba threading layer {_threading_layer()}"
            f" | C++ eager path {cpp.state()}")


def _threading_layer() -> str:
    import numba

    if addnorm.backends()["numba"]:
        importlib.import_module("addnorm.kernels.cpu")  # where the layer is chosen
        layer = importlib.import_module("addnorm.kernels._torch_threads")
        if layer.installed():
            return layer.NAME
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: the one that will start
        return str(numba.config.THREADING_LAYER)


@contextlib.contextmanager
def _progress(console: Console, total: int):
    """``step(description)`` before each of ``total`` cases: a live bar in a terminal,
    a plain line per case otherwise (CI logs, pipes), so long runs show progress."""
    if console.is_terminal:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("benchmarking", total=total)
            done = [0]

            def step(description):
                progress.update(task, description=description, completed=done[0])
                done[0] += 1
            yield step
    else:
        done = [0]

        def step(description):
            done[0] += 1
            print(f"[{done[0]}/{total}] {description}", flush=True)
        yield step


def _time_rounds(runners: dict[str, Callable], rounds: int,
                 number: dict[str, int] | None = None) -> dict[str, float]:
    """Best time of each runner, in ms per call, over ``rounds`` interleaved rounds; a
    round calls runner ``name`` ``number[name]`` times (once by default)."""
    best = {name: float("inf") for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            n = number[name] if number else 1
            t = time.perf_counter()
            for _ in range(n):
                run()
            best[name] = min(best[name], (time.perf_counter() - t) / n)
    return {name: 1e3 * t for name, t in best.items()}


def _time_calls(runners: dict[str, Callable], rounds: int, round_s: float = 2e-3,
                warm_s: float = 20e-3) -> dict[str, float]:
    """``_time_rounds`` for calls far shorter than the timer's resolution and Python's
    loop: each round repeats a contender's call enough times to last about ``round_s``.
    Each contender first runs untimed for ``warm_s`` (at least once): a process's first
    ~1,000 calls of a path run slower than its steady state (RMSNorm 1x64 recording
    autograd, per 100 calls: 18.3, 15.2, 15.9 ... settling at 13.6-14.3 µs), which a
    single warm-up call left in the first cells of a sweep (0.80x for one that runs
    0.97x-1.01x in steady state).  A model calls its norms far more often than that."""
    number = {}
    for name, run in runners.items():
        calls, t0 = 0, time.perf_counter()
        while True:
            run()
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= warm_s or calls >= 10_000:
                break
        number[name] = max(1, min(10_000, int(round_s * calls / max(elapsed, 1e-7))))
    return _time_rounds(runners, rounds, number)


def copy_bandwidth(nbytes: int, rounds: int = 10) -> float:
    """GB/s of a plain copy of ``nbytes`` into a preallocated tensor (read + write)."""
    src = torch.ones(max(1, nbytes // 4))
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = _time_calls({"copy": lambda: dst.copy_(src)}, rounds)["copy"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _set_bandwidth(result: Result, case: Case, x: torch.Tensor, copies: dict[int, float]) -> None:
    """addnorm's GB/s for the bytes ``case.traffic`` says its pass must move, and that of a
    plain copy of x's size (measured once per size, in ``copies``)."""
    size = _nbytes(x)
    tensors = sum(case.traffic) if result.pass_ == "fwd+bwd" else case.traffic[0]
    result.gbps = size * tensors / (result.ms["addnorm"] * 1e-3) / 1e9
    if size not in copies:
        copies[size] = copy_bandwidth(size)
    result.copy_gbps = copies[size]


def untrusted(passes: list[Result]) -> str | None:
    """Why the timings of one case's passes cannot all be right, or None: a contender
    whose forward (with or without grad) took longer than its forward+backward, or
    addnorm moving its bytes faster than a plain copy of the same size moves them."""
    by_pass = {r.pass_: r for r in passes}
    full = by_pass.get("fwd+bwd")
    for r in passes:
        if full is not None and r is not full:
            for name, ms in r.ms.items():
                if name in full.ms and ms > full.ms[name]:
                    return f"{name} {r.pass_} slower than its fwd+bwd"
        if r.gbps and r.copy_gbps and r.gbps > r.copy_gbps:
            return f"{r.pass_} above copy bandwidth ({r.gbps:.0f} > {r.copy_gbps:.0f} GB/s)"
    return None


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
    with _progress(console, len(todo)) as step:
        for case, dtype, backward in todo:
            step(f"{case.op} {case.shape} {str(dtype)[6:]} {'fwd+bwd' if backward else 'fwd'}")
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
            _set_bandwidth(result, case, inputs[0], copy_cache)
            results.append(result)
            if backward:  # both passes of this case are in: can they all be right?
                why = untrusted(results[-2:])
                for r in results[-2:] if why else ():
                    r.untrusted = why
    return results


# ---------------------------------------------------------------------------
# The sweep: every shape a model meets, per-call latency included.
# ---------------------------------------------------------------------------

SWEEP_ROWS = (1, 8, 64, 512, 4096, 65536)
SWEEP_HIDDEN = (64, 256, 1024, 4096, 16384)
SWEEP_MAX_ELEMENTS = 1 << 24  # 64 MB of float32 per tensor
SWEEP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# CNN (ResNet stages; a CIFAR ResNet's last, 128K elements, where a call's fixed cost
# counts) and diffusion-UNet (SD 1.x at 512 px, batch 2) activations
SWEEP_CHANNEL_SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14), (2, 320, 64, 64),
                        (2, 640, 32, 32), (2, 1280, 16, 16), (32, 64, 8, 8)]


def sweep_cases(quick: bool = False, ops: set[str] | None = None) -> list[Case]:
    """Rows 1 … 65,536 × hidden 64 … 16,384 (at most ``SWEEP_MAX_ELEMENTS``) for the row
    norms, DyT and ScaleNorm; the CNN and UNet shapes, contiguous and channels-last, for
    the channel norms.
    Quick: rows 1, 64, 4096 × hidden 256, 4096, and one UNet shape."""
    rows = (1, 64, 4096) if quick else SWEEP_ROWS
    hidden = (256, 4096) if quick else SWEEP_HIDDEN
    out = [c for n in rows for d in hidden if n * d <= SWEEP_MAX_ELEMENTS
           for c in [*_row_cases((n, d)), _dyt_case((n, d)), _scale_norm_case((n, d))]]
    for shape in SWEEP_CHANNEL_SHAPES[2:3] if quick else SWEEP_CHANNEL_SHAPES:
        for layout in ("contiguous", "channels_last"):
            out += _channel_cases(shape, layout)
    return [c for c in out if not ops or c.op in ops]


def sweep(quick: bool = False, ops: set[str] | None = None, dtypes=SWEEP_DTYPES,
          rounds: int | None = None, console: Console | None = None) -> list[Result]:
    """Each sweep case in each dtype and pass, addnorm (the default choice, as a user
    meets it) against torch eager, per call.  A case with a cell below 1.0x, or with
    timings that cannot all be right (``untrusted``), is measured again (the machine may
    have been busy; ``Result.remeasured``); one still untrustworthy says why
    (``Result.untrusted``)."""
    console = console or Console()
    rounds = rounds or (3 if quick else 5)
    todo = [(c, dt) for c in sweep_cases(quick, ops) for dt in dtypes]
    results, copies = [], {}
    with _progress(console, len(todo) * len(PASSES)) as step:
        for case, dtype in todo:
            inputs = case.make(dtype)
            runners, passes = {}, []
            for pass_ in PASSES:
                step(f"{case.op} {'x'.join(map(str, case.shape))} {case.layout} {str(dtype)[6:]} {pass_}")
                runners[pass_] = {"addnorm": _runner(case.ours, inputs, pass_, case.grads),
                                  "torch": _runner(case.torch, inputs, pass_, case.grads)}
                result = Result(case.op, list(case.shape), case.layout, str(dtype)[6:], pass_)
                result.ms = _time_calls(runners[pass_], rounds)
                _set_bandwidth(result, case, inputs[0], copies)
                passes.append(result)
            # measured again where addnorm lost, or the numbers cannot all be right
            # (the machine may have been busy): the best of both measurements counts
            if untrusted(passes) or any(r.ratio("torch") < 1.0 for r in passes):
                for result in passes:
                    again = _time_calls(runners[result.pass_], 2 * rounds)
                    result.ms = {k: min(result.ms[k], again[k]) for k in again}
                    result.remeasured = True
                    _set_bandwidth(result, case, inputs[0], copies)
                why = untrusted(passes)
                for result in passes if why else ():
                    result.untrusted = why
            results += passes
    return results


def sweep_summary(results: list[Result]) -> list[dict]:
    """Minimum, median and maximum ratio per op and dtype, and the cells below 1.0x."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.op, r.dtype), []).append(r)
    out = []
    for (op, dtype), rs in groups.items():
        ratios = sorted(r.ratio("torch") for r in rs)
        worst = min(rs, key=lambda r: r.ratio("torch"))
        out.append({"op": op, "dtype": dtype, "cells": len(rs), "min": ratios[0],
                    "median": ratios[len(ratios) // 2], "max": ratios[-1],
                    "below_1": sum(x < 1.0 for x in ratios),
                    "untrusted": sum(r.untrusted is not None for r in rs),
                    "worst": f"{'x'.join(map(str, worst.shape))} {worst.layout} {worst.pass_}"})
    return out


def sweep_markdown(results: list[Result]) -> str:
    lines = ["| op | dtype | cells | min | median | max | below 1.0x | untrusted | worst cell |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {s['op']} | {s['dtype']} | {s['cells']} | {s['min']:.2f}x | {s['median']:.2f}x "
              f"| {s['max']:.2f}x | {s['below_1']} | {s['untrusted']} | {s['worst']} |"
              for s in sweep_summary(results)]
    lines += ["", "| op | shape | layout | dtype | pass | addnorm µs | torch µs | vs torch |",
              "|---|---|---|---|---|---:|---:|---:|"]
    lines += [f"| {r.op} | {'x'.join(map(str, r.shape))} | {r.layout} | {r.dtype} | {r.pass_} "
              f"| {1e3 * r.ms['addnorm']:.1f} | {1e3 * r.ms['torch']:.1f} "
              f"| {r.ratio('torch'):.2f}x{' (re-measured)' if r.remeasured else ''}"
              f"{f' (untrusted: {r.untrusted})' if r.untrusted else ''} |"
              for r in results]
    return "\n".join(lines) + "\n"


def sweep_table(results: list[Result]) -> Table:
    t = Table(title="addnorm bench --sweep: torch eager time / addnorm time, per op and dtype")
    for col in ("op", "dtype", "cells", "min", "median", "max", "below 1.0x", "untrusted",
                "worst cell"):
        t.add_column(col, justify="left" if col in ("op", "dtype", "worst cell") else "right")
    for s in sweep_summary(results):
        colour = "green" if s["min"] >= 1 else "red"
        t.add_row(s["op"], s["dtype"], str(s["cells"]), f"[{colour}]{s['min']:.2f}x[/]",
                  f"{s['median']:.2f}x", f"{s['max']:.2f}x", str(s["below_1"]),
                  str(s["untrusted"]), s["worst"])
    return t


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
        cpu._threads(x.numel())
        runners = {
            "copy": lambda: dst.copy_(x),
            # (eps, offset, cast, lanes): the default casting mode, the kernel's own sum order
            "rms_norm": lambda: cpu._row_norm_fwd(a[0], None, a[1], None, a[3], None, None, a[5], 1e-6, 0.0, 0, None),
            "layer_norm": lambda: cpu._row_norm_fwd(a[0], None, a[1], a[2], a[3], None, a[4], a[5], 1e-5, 0.0, 0, None),
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
        f"{r.gbps:.1f}", f"{100 * r.gbps / r.copy_gbps:.0f}%"
        + (f" (untrusted: {r.untrusted})" if r.untrusted else ""),
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
