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
import torch.nn.functional as F

import addnorm.functional as AF
from addnorm.bench import header

SHAPES = ((64, 4096), (256, 4096), (4096, 256), (1024, 4096), (4096, 4096))


def contenders(rows: int, d: int, dtype: torch.dtype) -> dict[str, dict]:
    """op -> {side: call}: RMSNorm, add+RMSNorm, LayerNorm, each side's own."""
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(rows, d, generator=g).to(dtype) for _ in range(2))
    w, b = (torch.randn(d, generator=g).to(dtype) for _ in range(2))
    return {
        "rms_norm": {"addnorm": lambda: AF.rms_norm(x, (d,), w, 1e-6),
                     "torch": lambda: F.rms_norm(x, (d,), w, 1e-6)},
        "add_rms_norm": {"addnorm": lambda: AF.add_rms_norm(x, r, (d,), w, 1e-6),
                         "torch": lambda: (lambda h: (F.rms_norm(h, (d,), w, 1e-6), h))(x + r)},
        "layer_norm": {"addnorm": lambda: AF.layer_norm(x, (d,), w, b),
                       "torch": lambda: F.layer_norm(x, (d,), w, b)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30, help="timed calls per side and cell")
    args = parser.parse_args()
    print(header(), flush=True)
    a, m = torch.randn(256, 1024), torch.randn(1024, 1024)
    print("\n| op | shape | dtype | addnorm µs | torch µs | ratio |\n|---|---|---|---:|---:|---:|")
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            for rows, d in SHAPES:
                for op, sides in contenders(rows, d, dtype).items():
                    times = {side: [] for side in sides}
                    calls = args.calls if rows * d < 1 << 22 else max(10, args.calls // 2)
                    for i in range(calls + 3):  # the first 3 rounds warm up
                        for side, call in sides.items():
                            a @ m  # the projection before the norm
                            t = time.perf_counter()
                            call()
                            if i >= 3:
                                times[side].append(time.perf_counter() - t)
                    ours, theirs = (1e6 * statistics.median(times[s]) for s in ("addnorm", "torch"))
                    print(f"| {op} | {rows}x{d} | {str(dtype)[6:]} | {ours:.0f} | {theirs:.0f} "
                          f"| {theirs / ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
