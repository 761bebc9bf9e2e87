"""Our kernels beside torch's thread pool: one threading layer for numba per process.

Torch on Linux runs its CPU ops on a GNU OpenMP pool whose idle threads spin for
milliseconds; numba's threads (TBB by default in addnorm: fork-safe) share the same
cores.  Here each configuration runs in a process of its own, the two sides in blocks of
20 calls, alternating: a block of ours starts right after a block of torch's, as in a
model.  Per block, the median call in µs.

    .venv/bin/python benchmarks/thread_pools.py            # every configuration
    .venv/bin/python benchmarks/thread_pools.py shared     # one, in this process

Configurations: ``tbb`` (addnorm's default), ``separate`` (numba's OpenMP layer, its
own libgomp), ``shared`` (numba's OpenMP layer bound to torch's libgomp, preloaded
globally first, so both run on one pool).  numba's OpenMP layer cannot run in a forked
child, which is why the default is TBB.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time

CONFIGS = ("tbb", "shared", "separate")
SHAPES = ((4096, 256), (1024, 4096))


def _setup(config: str) -> None:
    import numba
    import torch

    if config == "shared":
        ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1"), mode=ctypes.RTLD_GLOBAL)
    if config in ("shared", "separate"):
        numba.config.THREADING_LAYER = "omp"


def _measure(config: str) -> str:
    _setup(config)
    import torch

    from addnorm.bench import _row_cases

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
    return f"{config}: " + " | ".join(out)


def main() -> None:
    if len(sys.argv) > 1:
        print(_measure(sys.argv[1]), flush=True)
        return
    for config in CONFIGS:
        subprocess.run([sys.executable, __file__, config], check=True)


if __name__ == "__main__":
    main()
