"""Each norm as a model runs it: right after a torch matmul, not back to back.

`addnorm bench --sweep` times each contender in rounds of ~2 ms, alternating. At mid
sizes (256K-4M elements, where both sides run two threads) its ratios swing between runs
(0.7x-1.5x for the same cell on the 2-core VM): torch's OpenMP threads keep spinning for
milliseconds after its round, our TBB threads after ours, and each round starts beside
the other pool's spinning threads.  In a model every norm follows a torch op (a
projection), so here each timed call of either side follows the same matmul, both
sides alternate call by call in one process, and the median of many calls counts.

    .venv/bin/python benchmarks/after_matmul.py [--calls N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from addnorm import bench as B

SHAPES = ((64, 4096), (256, 4096), (4096, 256), (1024, 4096), (4096, 4096))
OPS = ("rms_norm", "add_rms_norm", "layer_norm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30, help="timed calls per side and cell")
    args = parser.parse_args()
    print(B.header(), flush=True)
    a, m = torch.randn(256, 1024), torch.randn(1024, 1024)
    print("\n| op | shape | dtype | addnorm µs | torch µs | ratio |\n|---|---|---|---:|---:|---:|")
    # the sweep's own row cases: the same contenders on the same inputs
    cells = [(case, dtype) for dtype in (torch.float32, torch.bfloat16) for shape in SHAPES
             for case in B._row_cases(shape) if case.op in OPS]
    with torch.no_grad():
        for case, dtype in cells:
            inputs = case.make(dtype)
            sides = {"addnorm": lambda: case.ours(*inputs), "torch": lambda: case.torch(*inputs)}
            times = {side: [] for side in sides}
            rows, d = case.shape
            calls = args.calls if rows * d < 1 << 22 else max(10, args.calls // 2)
            for i in range(calls + 3):  # the first 3 rounds warm up
                for side, call in sides.items():
                    a @ m  # the projection before the norm
                    t = time.perf_counter()
                    call()
                    if i >= 3:
                        times[side].append(time.perf_counter() - t)
            ours, theirs = (1e6 * statistics.median(times[s]) for s in ("addnorm", "torch"))
            print(f"| {case.op} | {rows}x{d} | {str(dtype)[6:]} | {ours:.0f} | {theirs:.0f} "
                  f"| {theirs / ours:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
