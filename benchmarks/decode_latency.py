"""Per-call latency of the norm modules at the shapes of decoding and small batches:
torch.nn's module against addnorm's, in one process, interleaved, best of rounds.

    python benchmarks/decode_latency.py            # float32 and bfloat16
    python benchmarks/decode_latency.py --grad     # forward+backward as well

Ratio = torch's time / addnorm's (above 1: addnorm is faster).
"""

from __future__ import annotations

import argparse

import torch

import addnorm
from addnorm import bench

SHAPES = [
    ("RMSNorm", (1, 4096)),  # one decoding token
    ("RMSNorm", (1, 1, 4096)),  # the same token as a model passes it: (batch, tokens, d)
    ("RMSNorm", (8, 4096)),
    ("LayerNorm", (1, 4096)),
    ("LayerNorm", (1, 1, 4096)),
    ("LayerNorm", (8, 4096)),
    ("LayerNorm", (64, 1024)),
    ("LayerNorm", (2048, 256)),  # nanoGPT's shape
    ("LayerNorm", (512, 4096)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grad", action="store_true", help="also forward+backward")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    print(bench.header(), flush=True)
    print("| module | shape | dtype | pass | torch µs | addnorm µs | ratio |")
    print("|---|---|---|---|---:|---:|---:|")
    passes = ["fwd", "fwd+bwd"] if args.grad else ["fwd"]
    for dtype in (torch.float32, torch.bfloat16):
        for name, shape in SHAPES:
            torch.manual_seed(0)
            modules = {"torch": getattr(torch.nn, name)(shape[-1], dtype=dtype),
                       "addnorm": getattr(addnorm, name)(shape[-1], dtype=dtype)}
            for pass_ in passes:
                backward = pass_ == "fwd+bwd"
                x = torch.randn(shape, dtype=dtype, requires_grad=backward)
                if backward:
                    calls = {side: (lambda m=m: m(x).float().sum().backward()) for side, m in modules.items()}
                else:
                    calls = {side: (lambda m=m: m(x)) for side, m in modules.items()}
                with torch.set_grad_enabled(backward):  # no_grad around the timing, not in it
                    for call in calls.values():
                        call()  # compiled, caches warm
                    ms = bench._time_calls(calls, args.rounds)
                print(f"| {name} | {'x'.join(map(str, shape))} | {str(dtype)[6:]} | {pass_} | "
                      f"{ms['torch'] * 1e3:.1f} | {ms['addnorm'] * 1e3:.1f} | "
                      f"{ms['torch'] / ms['addnorm']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
