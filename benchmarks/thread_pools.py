"""Our kernels beside torch's thread pool: one threading layer for numba per process.

Torch on Linux runs its CPU ops on a GNU OpenMP pool whose idle threads spin for
milliseconds after each op.  numba's own threads (TBB, or numba's OpenMP layer with its
own libgomp) then share the cores with them; addnorm's default runs numba's loops on
torch's threads themselves (``addnorm/kernels/_torch_threads.py``).  Here each
configuration runs in a process of its own, the two sides in blocks of 20 calls,
alternating: a block of ours starts right after a block of torch's, as in a model.  Per
block, the median call in µs.

    .venv/bin/python benchmarks/thread_pools.py          # every configuration
    .venv/bin/python benchmarks/thread_pools.py tbb      # one, in this process

Configurations: ``torch`` (addnorm's default: torch's OpenMP threads), ``tbb`` (numba's
TBB layer, addnorm's fallback), ``separate`` (numba's OpenMP layer, its own libgomp;
it cannot run in a forked child).
"""

from __future__ import annotations

import subprocess
import sys
import time

CONFIGS = ("torch", "tbb", "separate")
SHAPES = ((512, 1024), (4096, 256), (1024, 4096))


def _setup(config: str) -> None:
    import numba

    if config != "torch":
        numba.config.THREADING_LAYER = {"tbb": "tbb", "separate": "omp"}[config]


def _measure(config: str) -> str:
    _setup(config)
    import torch

    from addnorm.bench import _row_cases, _threading_layer

    out = []
    for rows, d in SHAPES:
        case = next(c for c in _row_cases((rows, d)) if c.op == "rms_norm")  # the sweep's own
        inputs = case.make(torch.float32)
        sides = {"addnorm": lambda: case.ours(*inputs), "torch": lambda: case.torch(*inputs)}
        medians = {side: [] for side in sides}
        with torch.no_grad():
            for call in sides.values():
                for _ in range(5):
                    call()
            for _ in range(4):
                for side, call in sides.items():
                    times = []
                    for _ in range(20):
                        t = time.perf_counter()
                        call()
                        times.append(time.perf_counter() - t)
                    medians[side].append(1e6 * sorted(times)[10])
        out.append(f"{rows}x{d} float32 RMSNorm: " + ", ".join(
            f"{side} " + "/".join(f"{v:.0f}" for v in vs) for side, vs in medians.items()))
    return f"{config} ({_threading_layer()}): " + " | ".join(out)


def main() -> None:
    if len(sys.argv) > 1:
        print(_measure(sys.argv[1]), flush=True)
        return
    for config in CONFIGS:
        subprocess.run([sys.executable, __file__, config], check=True)


if __name__ == "__main__":
    main()
