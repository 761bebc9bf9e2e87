"""``addnorm bench --device cuda``: the row norms on a GPU, addnorm's Triton kernels against
torch eager, ``torch.compile``, Liger-Kernel and quack (each where installed).

Per case: the GPU's time per call (``graph_ms``: replayed from a CUDA graph, the kernels
alone), achieved bandwidth (the bytes the pass must move at the least, over that time)
and its fraction of the GPU's peak; and the time as eager code meets it, the host's
launch cost included (``time_ms``, and ``latency_ms`` for one decoding row, (1, 4096),
calls back to back).  Rows 16,384 × hidden 1,024 … 8,192, bfloat16 and float32, forward
and forward+backward: the shapes issue 17 sets targets for (forward ≥ 85% of peak,
backward ≥ 75%, ≥ 1.0x Liger and quack, ≥ 1.5x torch eager).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

import addnorm

from .bench import _time_calls

ROWS = 16384
HIDDEN = (1024, 2048, 4096, 8192)
DTYPES = (torch.bfloat16, torch.float32)
PASSES = ("fwd", "fwd+bwd")
OPS = ("rms_norm", "layer_norm")
DECODE_SHAPE = (1, 4096)
# peak memory bandwidth in TB/s by (a part of) the device's name; others: measured copy
PEAK_TBPS = {"H200": 4.8, "H100 SXM": 3.35, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35,
             "A100-SXM4-80GB": 2.04, "A100": 1.56, "L40S": 0.864, "A10G": 0.6}


@dataclasses.dataclass
class Result:
    op: str
    shape: list[int]
    dtype: str
    pass_: str
    ms: dict[str, float]  # contender -> the GPU's time per call (CUDA-graph replay)
    gbps: dict[str, float] = dataclasses.field(default_factory=dict)
    eager_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # contender -> time as eager code meets it
    peak_gbps: float = 0.0

    def fraction(self, name: str = "addnorm") -> float:
        return self.gbps.get(name, 0.0) / self.peak_gbps if self.peak_gbps else 0.0

    def ratio(self, name: str) -> float | None:
        """name's time over addnorm's (above 1: addnorm is faster)."""
        return self.ms[name] / self.ms["addnorm"] if name in self.ms and "addnorm" in self.ms else None


def cases() -> list[tuple[str, tuple[int, int], torch.dtype, str]]:
    """(op, shape, dtype, pass) for every timed cell, the decoding shape last."""
    out = [(op, (ROWS, d), dt, p) for op in OPS for dt in DTYPES for d in HIDDEN for p in PASSES]
    return out + [(op, DECODE_SHAPE, dt, p) for op in OPS for dt in DTYPES for p in PASSES]


def traffic(shape: tuple[int, int], dtype: torch.dtype, pass_: str) -> int:
    """Bytes a pass must move at the least: x in and y out forward; and dy in, x again,
    dx out backward (the parameters and per-row statistics are small beside them)."""
    tensors = 2 if pass_ == "fwd" else 5
    return tensors * shape[0] * shape[1] * dtype.itemsize


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} (no GPU)"


def peak_gbps(device: torch.device) -> float:
    """The GPU's peak memory bandwidth in GB/s from its name, else a measured copy's."""
    name = device_name(device)
    for key, tbps in PEAK_TBPS.items():
        if key in name:
            return tbps * 1e3
    src = torch.empty(1 << 26, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, rounds=10)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def graph_ms(fn: Callable[[], object], device: torch.device, rounds: int = 20) -> float:
    """The GPU's time per call: the call captured in a CUDA graph and replayed (median;
    ``triton.testing.do_bench_cudagraph``), so the kernels alone, none of the host's
    launch cost (as in a model whose GPU is busy, or one run from CUDA graphs);
    elsewhere ``bench``'s own CPU timing."""
    if device.type != "cuda":
        return _time_calls({"call": fn}, rounds)["call"]
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=max(20, 5 * rounds), return_mode="median")


def time_ms(fn: Callable[[], object], device: torch.device, rounds: int = 20) -> float:
    """Time per eager call: median, CUDA events around each call with the L2 cache
    flushed before it (``triton.testing.do_bench``), so the host's launch cost counts
    where it exceeds the flush's; elsewhere ``bench``'s own CPU timing."""
    if device.type != "cuda":
        return _time_calls({"call": fn}, rounds)["call"]
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=max(20, 5 * rounds), return_mode="median")


def latency_ms(fn: Callable[[], object], device: torch.device, rounds: int = 20) -> float:
    """Per-call latency as a decoding loop meets it: calls back to back, each round
    repeating the call to last ~2 ms, best of ``rounds`` (a small call is launch-bound:
    this is the host's time per call where it exceeds the GPU's)."""
    if device.type != "cuda":
        return _time_calls({"call": fn}, rounds)["call"]
    fn()
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    number = max(1, min(1000, int(2e-3 / max(time.perf_counter() - t, 1e-6))))
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        best = min(best, start.elapsed_time(end) / number)
    return best


def contenders(op: str, d: int, dtype: torch.dtype, device: torch.device, compile: bool) -> dict:
    """name -> module computing ``op`` over the last dim of size d (same parameters)."""
    torch_cls = torch.nn.RMSNorm if op == "rms_norm" else torch.nn.LayerNorm
    ours_cls = addnorm.RMSNorm if op == "rms_norm" else addnorm.LayerNorm
    eps = 1e-6
    mods = {"addnorm": ours_cls(d, eps=eps), "torch": torch_cls(d, eps=eps)}
    if compile:
        mods["compile"] = torch.compile(torch_cls(d, eps=eps))
    for name, make in (("liger", _liger), ("quack", _quack)):
        try:
            module = make(op, d, eps)
        except Exception as e:  # not installed, or installed but unable to load here
            UNAVAILABLE.setdefault(name, f"{type(e).__name__}: {e}")
            continue
        if module is not None:
            mods[name] = module
    return {name: m.to(device=device, dtype=dtype) for name, m in mods.items()}


UNAVAILABLE: dict[str, str] = {}  # contender -> why it could not be built, as first met


def _liger(op: str, d: int, eps: float) -> torch.nn.Module:
    """Liger-Kernel's module, in torch's casting mode where it has one."""
    if op == "rms_norm":
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        return LigerRMSNorm(d, eps=eps, casting_mode="gemma")
    from liger_kernel.transformers.layer_norm import LigerLayerNorm

    return LigerLayerNorm(d, eps=eps)


def _quack(op: str, d: int, eps: float) -> torch.nn.Module | None:
    """quack's RMSNorm (it has no LayerNorm)."""
    if op != "rms_norm":
        return None
    from quack.rmsnorm import rmsnorm

    return _Function(lambda x, w: rmsnorm(x, w, eps=eps), torch.nn.Parameter(torch.ones(d)))


class _Function(torch.nn.Module):
    """A plain function with its weight, as a module (so .to() moves the weight)."""

    def __init__(self, fn: Callable, weight: torch.nn.Parameter):
        super().__init__()
        self.fn, self.weight = fn, weight

    def forward(self, x):
        return self.fn(x, self.weight)


def run(device: str = "cuda", compile: bool = True, rounds: int = 20, console=None) -> list[Result]:
    """Every case on ``device`` (a CUDA device; the CPU runs it too, which the tests use to
    check the loop itself, with the CPU's measured copy bandwidth as its "peak")."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"addnorm bench --device {device}: needs a CUDA device, and this "
                           f"machine has {torch.cuda.device_count()}")
    peak = peak_gbps(dev)
    results, todo, built = [], cases(), {}
    for i, (op, shape, dtype, pass_) in enumerate(todo):
        if console is not None:
            console.print(f"[{i + 1}/{len(todo)}] {op} {shape[0]}x{shape[1]} {str(dtype)[6:]} {pass_}",
                          highlight=False)
        torch.manual_seed(0)
        x = torch.randn(shape, device=dev, dtype=dtype, requires_grad=pass_ != "fwd")
        dy = torch.randn_like(x)
        result = Result(op, list(shape), str(dtype)[6:], pass_, {}, peak_gbps=peak)
        key = (op, shape[1], dtype)
        if key not in built:  # the passes of one shape follow each other: built (and compiled) once
            built = {key: contenders(op, shape[1], dtype, dev, compile)}
        for name, module in built[key].items():
            if pass_ == "fwd":
                def call(m=module):
                    with torch.no_grad():
                        return m(x)
            else:
                def call(m=module):
                    x.grad = None
                    m(x).backward(dy)
            timer = latency_ms if shape == DECODE_SHAPE else time_ms
            for field, time_it in (("eager_ms", timer), ("ms", graph_ms)):
                try:
                    getattr(result, field)[name] = time_it(call, dev, rounds)
                except Exception as e:  # a contender that cannot run this case is left out, said why
                    if console is not None:
                        console.print(f"  {name} ({field}): {type(e).__name__}: {e}", highlight=False)
            if name in result.ms:
                result.gbps[name] = traffic(shape, dtype, pass_) / (result.ms[name] * 1e-3) / 1e9
        results.append(result)
    if console is not None:
        for name, why in UNAVAILABLE.items():
            console.print(f"not timed: {name} ({why})", highlight=False)
    return results


def markdown(results: list[Result], device_name: str) -> str:
    names = ["torch", "compile", "liger", "quack"]
    lines = [f"Device: {device_name}; peak {results[0].peak_gbps:.0f} GB/s" if results else "",
             "", "| op | shape | dtype | pass | addnorm µs | % of peak | "
             + " | ".join(f"vs {n}" for n in names) + " | eager µs: addnorm / torch |",
             "|---|---|---|---|---:|---:|" + "---:|" * len(names) + "---:|"]
    for r in results:
        ratios = [f"{r.ratio(n):.2f}x" if r.ratio(n) else "-" for n in names]
        ours = f"{r.ms['addnorm'] * 1e3:.1f}" if "addnorm" in r.ms else "failed"
        eager = " / ".join(f"{r.eager_ms[n] * 1e3:.1f}" if n in r.eager_ms else "-" for n in ("addnorm", "torch"))
        lines.append(f"| {r.op} | {r.shape[0]}x{r.shape[1]} | {r.dtype} | {r.pass_} | {ours} | "
                     f"{r.fraction():.0%} | " + " | ".join(ratios) + f" | {eager} |")
    lines += ["", "addnorm µs and the ratios (their time over addnorm's): the GPU's time per call, the call "
              "replayed from a CUDA graph (the kernels alone). Eager µs: the call as eager code makes it, "
              f"the host's launch cost included: median with the L2 cache flushed at {ROWS:,} rows, calls "
              f"back to back at {DECODE_SHAPE}."]
    return "\n".join(lines) + "\n"
