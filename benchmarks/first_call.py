"""What a user waits for on first use: compile (a fresh numba cache) and load (a warm one).

    .venv/bin/python benchmarks/first_call.py

Runs the same calls in two fresh processes sharing one new, empty numba cache folder:
the first compiles every kernel it calls, the second loads them from the cache.  Per
process: the import of addnorm, the first RMSNorm(4096) forward under no_grad, the first
forward recording autograd, the first backward, and a first LayerNorm forward of 8M
elements (the size from which LayerNorm runs addnorm's kernel rather than torch's).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

_CALLS = r"""
import time
t0 = time.perf_counter()
import torch, addnorm
marks = [("import addnorm", time.perf_counter() - t0)]

def timed(what, fn):
    t = time.perf_counter()
    out = fn()
    marks.append((what, time.perf_counter() - t))
    return out

rms, x = addnorm.RMSNorm(4096), torch.randn(8, 4096)
with torch.no_grad():
    timed("RMSNorm(4096) forward, no_grad", lambda: rms(x))
y = timed("RMSNorm(4096) forward, autograd", lambda: rms(x.clone().requires_grad_()))
timed("RMSNorm(4096) backward", lambda: y.sum().backward())
ln, big = addnorm.LayerNorm(4096), torch.randn(2048, 4096)
with torch.no_grad():
    timed("LayerNorm(4096) forward, 2048 rows", lambda: ln(big))
print("\n".join(f"  {what:<40} {s:6.2f} s" for what, s in marks))
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("fresh cache (compiles)", "warm cache (loads)"):
            print(label, flush=True)
            subprocess.run([sys.executable, "-c", _CALLS], env=env, check=True)


if __name__ == "__main__":
    main()
