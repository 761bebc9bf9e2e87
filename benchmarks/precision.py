"""Error against float64 over long reductions: addnorm and torch, side by side.

    python benchmarks/precision.py

Each case reduces over many values (a long LayerNorm row, a large GroupNorm group, a
BatchNorm channel's gradient sums), where a single float32 accumulator loses digits as the
count grows.  Prints the largest absolute error of each output against the float64
result, for addnorm's default CPU backend and for torch.

Then the outputs near 0 (values near their row's mean), where the mean's last bits
decide the output's: the share of float32 LayerNorm outputs more than 2 ulps of their
own size off the float64 result, for numba's kernel (``addnorm.backend("numba")``: by
default inputs this small run torch's kernel) and for torch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import addnorm
import addnorm.functional as AF


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max())


def _grads(fn, x, params, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256 * 256 * 144, generator=g)
    yield "LayerNorm (2, 256*256*144) y", x, (), lambda ours: (
        (AF if ours else F).layer_norm(x, x.shape[-1:]),
        F.layer_norm(x.double(), x.shape[-1:]),
    )
    x = torch.randn(1, 8, 256, 256, 72, generator=g)
    yield "GroupNorm (1, 8, 256, 256, 72), 2 groups: y", x, (), lambda ours: (
        (AF if ours else F).group_norm(x, 2),
        F.group_norm(x.double(), 2),
    )
    x = torch.randn(8, 16, 4, 5, 5, generator=g).contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    dy = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last_3d)

    def bn(ours):
        fn = lambda x, w, b: (AF if ours else F).batch_norm(x, None, None, w, b, True)  # noqa: E731
        ref = _grads(lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
                     x.double(), (w.double(), b.double()), dy.double())
        return _grads(fn, x, (w, b), dy)[3], ref[3]

    yield "BatchNorm3d channels-last (8, 16, 4, 5, 5): dbias (800 terms)", x, (), bn


def _off_by_more_than_2_ulps(y: torch.Tensor, ref: torch.Tensor) -> float:
    ulp = (ref.abs() * 2.0**-23).clamp_min(2.0**-126)
    return float(((y.double() - ref).abs() > 2 * ulp).double().mean())


def near_mean() -> None:
    print(f"\n{'float32 LayerNorm, 20000 rows of N(mean, 2): outputs > 2 ulps off':66} {'numba':>10} {'torch':>10}")
    g = torch.Generator().manual_seed(0)
    for d in (64, 256, 1024):
        for mean in (0.0, 0.5, 3.0):
            x = torch.randn(20000, d, generator=g) * 2 + mean
            ref = F.layer_norm(x.double(), (d,))
            with addnorm.backend("numba"):
                ours = AF.layer_norm(x, (d,))
            theirs = F.layer_norm(x, (d,))
            name = f"rows of {d}, mean {mean}"
            print(f"{name:66} {_off_by_more_than_2_ulps(ours, ref):10.2%} "
                  f"{_off_by_more_than_2_ulps(theirs, ref):10.2%}", flush=True)


def main() -> None:
    print(f"{'case':66} {'addnorm':>10} {'torch':>10}")
    for name, _x, _p, run in cases():
        ours, ref = run(True)
        theirs, _ = run(False)
        print(f"{name:66} {_err(ours, ref):10.2e} {_err(theirs, ref):10.2e}", flush=True)
    near_mean()


if __name__ == "__main__":
    main()
