"""The triton backend's launch settings on a GPU, and where a call's host time goes.

    python benchmarks/gpu_tune.py overhead   # host µs per call: Triton's launch, ours, Liger, torch; a profile
    python benchmarks/gpu_tune.py sweep      # kernel time per launch setting at 16,384 rows

The sweep times the kernels alone (``triton.testing.do_bench``, median, CUDA events) for
each values-per-thread (num_warps) and, for the backward, programs per multiprocessor;
it prints achieved bandwidth as a fraction of the GPU's peak (``bench_gpu.peak_gbps``).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import threading
import time

import torch
import triton
import triton.language as tl

import addnorm
from addnorm import bench_gpu
from addnorm.kernels import gpu
from addnorm.reference import CAST_ONCE

CUDA = torch.device("cuda")


@triton.jit
def _nothing(X, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(X + i, tl.load(X + i, mask=i < n), mask=i < n)


def host_us(fn, calls=2000) -> float:
    """Host time per call, the GPU kept ahead (a sync only at the end)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def overhead():
    x = torch.randn(1, 4096, device=CUDA, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    buf = torch.zeros(16, device=CUDA)
    print(f"Triton launch of an empty kernel: {host_us(lambda: _nothing[(1,)](buf, 16, BLOCK=16)):.1f} µs")
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("t", host_us(lambda: _nothing[(1,)](buf, 16, BLOCK=16))))
    thread.start(), thread.join()
    print(f"  the same from another thread: {out['t']:.1f} µs")
    mods = {"addnorm": addnorm.RMSNorm(4096), "torch": torch.nn.RMSNorm(4096)}
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        mods["liger"] = LigerRMSNorm(4096, casting_mode="gemma")
    except ImportError:
        pass
    for name, m in mods.items():
        m = m.to(CUDA, torch.bfloat16)
        xg = x.clone().requires_grad_()

        def fwd(m=m):
            with torch.no_grad():
                m(x)

        def fwd_bwd(m=m):
            xg.grad = None
            m(xg).backward(dy)

        row = [f"{name:8s} (1, 4096) bf16: fwd {host_us(fwd):6.1f} µs"]
        row.append(f"fwd+bwd {host_us(fwd_bwd, 500):6.1f}")
        torch.autograd.set_multithreading_enabled(False)
        row.append(f"fwd+bwd, backward on this thread {host_us(fwd_bwd, 500):6.1f}")
        torch.autograd.set_multithreading_enabled(True)
        print(", ".join(row))
    # the layers of one forward and one backward, each timed alone
    m = mods["addnorm"]
    w = m.weight
    _, _, _, rstd = gpu.row_norm_forward(x, None, w, None, 1e-6, 0.0, True, CAST_ONCE, True)
    layers = {
        "torch.empty_like": lambda: torch.empty_like(x),
        "kernels.gpu.row_norm_forward": lambda: gpu.row_norm_forward(x, None, w, None, 1e-6, 0.0, True, CAST_ONCE,
                                                                     False),
        "functional.rms_norm": lambda: addnorm.functional.rms_norm(x, 4096, w, 1e-6),
        "module": lambda: m(x),
        "kernels.gpu.row_norm_backward": lambda: gpu.row_norm_backward(dy, None, x, w, None, rstd, 0.0, True,
                                                                       CAST_ONCE, None),
    }
    with torch.no_grad():
        for name, fn in layers.items():
            print(f"  {name}: {host_us(fn):.1f} µs")
        out = {}
        fn = layers["kernels.gpu.row_norm_backward"]
        thread = threading.Thread(target=lambda: out.setdefault("t", host_us(fn)))
        thread.start(), thread.join()
        print(f"  kernels.gpu.row_norm_backward from another thread: {out['t']:.1f} µs")
    for title, fn in [("addnorm fwd no_grad", lambda: torch.no_grad()(m)(x)),
                      ("addnorm fwd+bwd (backward on this thread)", lambda: m(xg).backward(dy))]:
        xg = x.clone().requires_grad_()
        torch.autograd.set_multithreading_enabled(False)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            fn()
        prof.disable()
        torch.autograd.set_multithreading_enabled(True)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        print(f"--- profile: {title}, 500 calls\n" + "\n".join(s.getvalue().splitlines()[6:34]))


def _ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def sweep():
    peak = bench_gpu.peak_gbps(CUDA)
    print(f"{bench_gpu.device_name(CUDA)}; peak {peak:.0f} GB/s")
    rows = 16384
    defaults = gpu._VALUES_PER_THREAD["bwd"], gpu._VALUES_PER_SM
    for rms in (True, False):
        for dtype in (torch.bfloat16, torch.float32):
            for d in (1024, 2048, 4096, 8192):
                x = torch.randn(rows, d, device=CUDA, dtype=dtype)
                w = torch.randn(d, device=CUDA, dtype=dtype)
                b = None if rms else torch.randn(d, device=CUDA, dtype=dtype)
                dy = torch.randn_like(x)
                gb_f = 2 * x.numel() * x.element_size() / 1e9
                gb_b = 3 * x.numel() * x.element_size() / 1e9
                cells = []
                for max_block in (4096, 16384):
                    if d <= 4096 and max_block > 4096:
                        continue
                    gpu._MAX_BLOCK = max_block
                    for vpt in (4, 8, 16, 32):
                        gpu._VALUES_PER_THREAD["fwd"] = vpt
                        t = _ms(lambda: gpu.row_norm_forward(x, None, w, b, 1e-6, 0.0, rms, CAST_ONCE, False))
                        cells.append(f"fwd mb{max_block} v{vpt}: {gb_f / t * 1e3 / peak:.0%}")
                    gpu._VALUES_PER_THREAD["fwd"] = 16
                    _, _, mean, rstd = gpu.row_norm_forward(x, None, w, b, 1e-6, 0.0, rms, CAST_ONCE, True)
                    for vpt in (4, 8, 16):
                        for pps in (1, 4):
                            gpu._VALUES_PER_THREAD["bwd"], gpu._VALUES_PER_SM = vpt, pps * min(d, max_block)
                            t = _ms(lambda: gpu.row_norm_backward(dy, None, x, w, mean, rstd, 0.0, rms, CAST_ONCE, b))
                            cells.append(f"bwd mb{max_block} v{vpt} p{pps}: {gb_b / t * 1e3 / peak:.0%}")
                    gpu._VALUES_PER_THREAD["bwd"], gpu._VALUES_PER_SM = defaults
                gpu._MAX_BLOCK = 16384
                print(f"{'rms' if rms else 'ln'} {str(dtype)[6:]} {rows}x{d}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    {"overhead": overhead, "sweep": sweep}[sys.argv[1]]()
