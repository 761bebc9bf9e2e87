"""SyncBatchNorm: BatchNorm over a batch split across processes, on CPU with gloo
(torch.nn.SyncBatchNorm refuses CPU tensors).  Two ranks run sync_batch_norm_worker.py;
what they got is compared with one torch.nn BatchNorm over the whole batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import addnorm
import sync_batch_norm_worker as worker

WORLD = 2
# one test worker runs them all: the module's fixture starts the two ranks (~10 s) once
pytestmark = pytest.mark.xdist_group("sync_batch_norm")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks got (one run of the worker for every test here)."""
    out = tmp_path_factory.mktemp("sync_bn")
    script = Path(worker.__file__)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(WORLD), str(out / "rendezvous"), str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        )
        for rank in range(WORLD)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0].decode())
        except subprocess.TimeoutExpired:  # a hang in a collective fails the test, not the suite
            for q in procs:
                q.kill()
            pytest.fail("a rank of the SyncBatchNorm worker hung")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _close(dtype):
    return {torch.bfloat16: {"rtol": 1.6e-2, "atol": 2e-2}, torch.float64: {"rtol": 1e-10, "atol": 1e-12}}.get(
        dtype, {"rtol": 1e-5, "atol": 1e-6}
    )


@pytest.mark.parametrize("case", worker.CASES, ids=[c[0] for c in worker.CASES])
def test_ranks_together_are_one_batch_norm_over_the_whole_batch(ranks, case):
    """Each rank's output and input gradient are its slice of one torch.nn BatchNorm's over
    the concatenated batch; the weight's and bias's gradients sum to that BatchNorm's over
    the ranks; the running statistics (two steps) are that BatchNorm's, the same bits on
    every rank; eval mode normalises with them."""
    name, sizes, shape, dtype, layout = case
    x, dy, w, b = worker.global_batch(*case)
    torch_norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}[len(shape)]
    ref = worker.norm_for(x.double(), w.double(), b.double(), cls=torch_norm)
    whole = x.double().requires_grad_()
    y = ref(whole)
    y.backward(dy.double())
    y2 = ref(x.double())
    tol = _close(dtype)
    for rank, got in enumerate(ranks):
        got = got[name]
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        assert got["y"].dtype == dtype and got["y"].shape == (hi - lo, *shape)
        torch.testing.assert_close(got["y"].double(), y[lo:hi].detach(), **tol)
        torch.testing.assert_close(got["dx"].double(), whole.grad[lo:hi], **tol)
        torch.testing.assert_close(got["y2"].double(), y2[lo:hi].detach(), **tol)
        torch.testing.assert_close(got["running_mean"].double(), ref.running_mean, **tol)
        torch.testing.assert_close(got["running_var"].double(), ref.running_var, **tol)
        assert got["batches"].item() == 2
        assert got["channels_last"] == (layout is torch.channels_last) or hi == lo
        ref.eval()
        torch.testing.assert_close(got["eval"].double(), ref(x[lo:hi].double()).detach(), **tol)
        ref.train()
    torch.testing.assert_close(sum(r[name]["dw"].double() for r in ranks), ref.weight.grad, **tol)
    torch.testing.assert_close(sum(r[name]["db"].double() for r in ranks), ref.bias.grad, **tol)
    for key in ("running_mean", "running_var"):
        assert torch.equal(ranks[0][name][key], ranks[1][name][key])


def test_a_momentum_of_none_is_the_cumulative_average_over_the_ranks(ranks):
    x, _, w, b = worker.global_batch(*worker.CASES[0])
    ref = nn.BatchNorm2d(x.shape[1], momentum=None).double()
    for step in range(3):
        ref(x[:8].double() * (step + 1))
    for got in ranks:
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(got["cumulative"][key].double(), getattr(ref, key), **_close(torch.float32))


def test_a_converted_model_under_ddp_gets_one_process_gradients(ranks):
    """convert_sync_batchnorm turns torch.nn's and addnorm's BatchNorms of a model into
    SyncBatchNorms; under DDP (which averages the ranks' gradients) every parameter's
    gradient is, times the world size, one process's over the whole batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    g = torch.Generator().manual_seed(1)
    images, target = torch.randn(8, 3, 6, 6, generator=g), torch.randn(8, 2, 4, 4, generator=g)
    (model(images) * target).sum().backward()
    for got in ranks:
        assert got["ddp"]["kinds"] == ["Conv2d", "SyncBatchNorm", "ReLU", "Conv2d", "SyncBatchNorm"]
        for k, p in model.named_parameters():
            torch.testing.assert_close(got["ddp"]["grads"][k] * WORLD, p.grad, rtol=1e-4, atol=1e-5)
        for k, v in model.named_buffers():
            torch.testing.assert_close(got["ddp"]["buffers"][k], v, rtol=1e-5, atol=1e-6)


def test_ranks_of_different_channel_counts_get_an_error_not_a_hang(ranks):
    for got in ranks:
        kind, is_value_error, text = got["mismatch"]
        assert kind == "ArgumentError" and is_value_error
        assert "rank 0: 4 channels" in text and "rank 1: 3 channels" in text


@pytest.mark.parametrize("training", [True, False])
def test_outside_a_process_group_it_is_batch_norm(training):
    """torch.distributed not initialised: a SyncBatchNorm is BatchNorm in one process (and
    takes a CPU tensor, which torch.nn.SyncBatchNorm takes there too)."""
    x = torch.randn(6, 4, 5, 5)
    ours, theirs = addnorm.SyncBatchNorm(4), nn.BatchNorm2d(4)
    ours.train(training), theirs.train(training)
    torch.testing.assert_close(ours(x), theirs(x))
    assert torch.equal(ours.running_mean, theirs.running_mean) and torch.equal(ours.running_var, theirs.running_var)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()


def test_it_is_torchs_module_to_code_that_reads_one():
    ours, theirs = addnorm.SyncBatchNorm(8, eps=1e-3, momentum=None), nn.SyncBatchNorm(8, eps=1e-3, momentum=None)
    # a _BatchNorm, as torch's, but no nn.SyncBatchNorm: DDP refuses those on the CPU
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm) and not isinstance(ours, nn.SyncBatchNorm)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        ours(torch.randn(4))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        ours(torch.randn(4, 0, 2))


def test_convert_sync_batchnorm_keeps_the_tensors_and_the_mode():
    model = nn.Sequential(
        nn.BatchNorm1d(3), nn.Sequential(addnorm.BatchNorm2d(4, affine=False), nn.SyncBatchNorm(2, bias=False))
    )
    model[1].eval()
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    group = object()
    out = addnorm.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert out is model
    norms = [model[0], model[1][0], model[1][1]]
    assert all(type(m) is addnorm.SyncBatchNorm and m.process_group is group for m in norms)
    assert [m.training for m in norms] == [True, False, False]
    assert norms[1].weight is None and norms[2].bias is None and norms[2].weight is not None
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    single = addnorm.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm3d(5))
    assert type(single) is addnorm.SyncBatchNorm and single.num_features == 5
