"""The benchmarks' logic, without timing anything: which timings it refuses to trust,
and that the whole-model benchmark compares equal models."""

import pytest
import torch

import addnorm
from addnorm import bench as B
from addnorm import bench_model as M


def _result(pass_, addnorm_ms, torch_ms, gbps=None, copy_gbps=None):
    r = B.Result("rms_norm", [8, 64], "rows", "float32", pass_,
                 {"addnorm": addnorm_ms, "torch": torch_ms})
    r.gbps, r.copy_gbps = gbps, copy_gbps
    return r


def test_consistent_timings_are_trusted():
    passes = [_result("fwd", 1.0, 2.0, 10, 20), _result("fwd grad", 1.2, 2.5, 9, 20),
              _result("fwd+bwd", 3.0, 6.0, 8, 20)]
    assert B.untrusted(passes) is None


@pytest.mark.parametrize("slow", ["fwd", "fwd grad"])
def test_a_forward_slower_than_forward_and_backward_is_untrusted(slow):
    passes = [_result("fwd", 1.0, 2.0), _result("fwd grad", 1.2, 2.5), _result("fwd+bwd", 3.0, 6.0)]
    next(r for r in passes if r.pass_ == slow).ms["torch"] = 7.0
    assert B.untrusted(passes) == f"torch {slow} slower than its fwd+bwd"


def test_more_than_copy_bandwidth_is_untrusted():
    passes = [_result("fwd", 1.0, 2.0, gbps=30, copy_gbps=20), _result("fwd+bwd", 3.0, 6.0)]
    assert "above copy bandwidth" in B.untrusted(passes)


@pytest.mark.parametrize("case", B._row_cases((4, 32)), ids=lambda c: c.op)
def test_row_cases_compare_the_same_function_at_the_same_cost(case):
    """Both contenders of a row-norm case give the same outputs, and torch's side does the
    work a model does: an add+norm adds x and the residual once (it once added them twice,
    a handicap that flattered our fused op)."""
    inputs = case.make(torch.float32)
    with _AtenCalls() as calls:
        theirs = case.torch(*inputs)
    ours = case.ours(*inputs)
    ours, theirs = (o if isinstance(o, tuple) else (o,) for o in (ours, theirs))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert calls.count("aten.add.Tensor") == (1 if case.op.startswith("add_") else 0)


class _AtenCalls(list):
    """The aten ops run inside it, by name."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                calls.append(str(func))  # e.g. "aten.add.Tensor"
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


@pytest.mark.parametrize("index", [
    # the UNet's cases compile the GroupNorm kernels: on the worker of the other tests that do
    pytest.param(i, marks=pytest.mark.xdist_group("group_norm_kernels") if case[0] == "unet" else ())
    for i, case in enumerate(M.cases(quick=True))
])
def test_model_benchmark_compares_equal_models(index):
    """Both sides of each whole-model case have the same parameters and compute the same
    function (the norms' rounding aside)."""
    model, norm, dtype, what, build = M.cases(quick=True)[index]
    models, runner = build()
    ours, theirs = models["addnorm"].state_dict(), models["torch"].state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(isinstance(m, addnorm.LayerNorm | addnorm.RMSNorm | addnorm.GroupNorm)
               for m in models["addnorm"].modules())
    outs = {side: runner(m)().float() for side, m in models.items()}
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(outs["addnorm"], outs["torch"], rtol=tol, atol=tol * outs["torch"].abs().max().item())


def test_preallocated_kernel_table_runs():
    """``addnorm bench``'s kernel-only table calls the numba row kernel straight: it must
    keep up with the kernel's signature (it once lagged two arguments behind)."""
    rows = B.preallocated(shape=(8, 64), dtypes=(torch.float32,), rounds=1)
    assert [r["op"] for r in rows] == ["rms_norm", "layer_norm"]
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in rows)


def test_header_names_the_threading_layer_the_kernels_will_use():
    """Printed before anything ran: a fresh process must still name the layer addnorm
    chooses (torch's OpenMP threads where torch has them, else TBB where installed), not
    numba's unset "default"."""
    import os
    import platform
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "from addnorm import bench; print(bench.header())"],
                         capture_output=True, text=True, check=True).stdout
    from addnorm.kernels import _torch_threads

    assert "numba threading layer default" not in out
    if os.environ.get("NUMBA_THREADING_LAYER"):
        return
    if _torch_threads.openmp_runtime() is not None:
        assert f"numba threading layer {_torch_threads.NAME}" in out
    elif platform.machine() in ("x86_64", "AMD64"):
        assert "numba threading layer tbb" in out


def test_gpu_benchmark_runs_its_loop(monkeypatch):
    """``addnorm bench --device cuda`` cannot run here; its loop, contenders, byte counts
    and table run on the CPU at a tiny size, so they are ready when a GPU is lent."""
    from addnorm import bench_gpu as G

    monkeypatch.setattr(G, "ROWS", 4)
    monkeypatch.setattr(G, "HIDDEN", (64,))
    monkeypatch.setattr(G, "DECODE_SHAPE", (1, 32))
    results = G.run("cpu", compile=False, rounds=1)
    assert len(results) == len(G.cases()) == 2 * 2 * 2 * 2
    for r in results:
        assert {"addnorm", "torch"} <= set(r.ms) and all(v > 0 for v in r.ms.values())
        assert r.gbps["addnorm"] == G.traffic(tuple(r.shape), getattr(torch, r.dtype), r.pass_) / (
            r.ms["addnorm"] * 1e-3) / 1e9
    md = G.markdown(results, "cpu")
    assert md.count("\n| rms_norm |") == 8 and "% of peak" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the benchmark would run")
def test_gpu_benchmark_without_a_gpu_says_so():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "addnorm.cli", "bench", "--device", "cuda"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "needs a CUDA device" in out.stderr
