"""Tensor subclasses that dispatch in Python (DTensor, nested jagged tensors, fake tensors
outside their mode, any ``__torch_dispatch__`` wrapper): addnorm's kernels cannot read
their data, so the call runs the reference's torch ops on them (``functional._foreign``),
and the result is torch.nn's, values and gradients.  Before, such a tensor reached a
kernel by its data pointer and the process crashed (a DTensor's, a fake tensor's) or the
op was refused (a nested tensor's)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.logging_tensor import LoggingTensor, capture_logs

import addnorm
import addnorm.functional as AF
from test_autograd_modes import CASES, R, X, _outputs

D = torch.float64
ROW_CASES = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "dyt")
OFFSETS = torch.tensor([0, 2, 6, 9])  # three sequences of 2, 4 and 3 rows
# (not "batch_norm_eval": its running statistics are plain tensors made inside the case,
# which a DTensor or fake input refuses beside it, in torch's norm too)
WHOLE_CASES = [name for name in CASES if name != "batch_norm_eval"]


def _packed(t: torch.Tensor) -> torch.Tensor:
    """The rows of sequences of 2, 4 and 3 tokens cut from t (3, 4, 6): (9, 6)."""
    return torch.cat([t[0, :2], t[1, :4], t[2, :3]])


@pytest.mark.parametrize("name", ROW_CASES)
def test_nested_jagged_rows_equal_the_packed_rows_and_torch(name):
    """A nested jagged (B, j, D) input: each row normalized as the same rows packed in a
    plain (N, D) tensor, as torch's own spelling on the nested tensor, with the
    gradients of the packed values and the parameters."""
    ours, theirs, inputs = CASES[name]
    packed = [_packed(X)] + ([_packed(R)] if name.startswith("add_") else [])
    params = inputs[len(packed):]

    def run(fn, nested):
        leaves = [p.clone().requires_grad_() for p in packed]
        ps = [p.clone().requires_grad_() for p in params]
        xs = [torch.nested.nested_tensor_from_jagged(v, OFFSETS) if nested else v for v in leaves]
        outs = _outputs(fn(*xs, *ps))
        assert all(o.is_nested is nested for o in outs)
        outs = [o.values() if nested else o for o in outs]
        loss = sum((o * torch.linspace(-1, 2, o.numel(), dtype=D).reshape(o.shape)).sum() for o in outs)
        loss.backward()
        return outs, [t.grad for t in leaves + ps]

    got, got_grads = run(ours, True)
    for expected, expected_grads in (run(ours, False), run(theirs, True)):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for a, b in zip(got_grads, expected_grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_nested_jagged_through_the_modules():
    nested = torch.nested.nested_tensor_from_jagged(_packed(X).float(), OFFSETS)
    for ours, theirs in ((addnorm.LayerNorm(6), nn.LayerNorm(6)), (addnorm.RMSNorm(6), nn.RMSNorm(6))):
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            theirs.weight.copy_(ours.weight)
        torch.testing.assert_close(ours(nested).values(), theirs(nested).values())


@pytest.fixture(scope="module")
def mesh():
    """A one-process gloo group (no port: a HashStore) and its device mesh."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", WHOLE_CASES)
def test_dtensor_equals_plain_tensors(mesh, name):
    """Every op on DTensors (the input sharded along its first dim, the rest replicated),
    values and gradients as torch's on plain tensors, the output a DTensor."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    ours, theirs, inputs = CASES[name]
    leaves = [t.clone().requires_grad_() for t in inputs]
    # (from_local, differentiable: a world of one process holds the whole tensor)
    sharded = [DTensor.from_local(t, mesh, [Shard(0) if t.ndim == 3 else Replicate()]) for t in leaves]
    plain = [t.clone().requires_grad_() for t in inputs]
    got, expected = _outputs(ours(*sharded)), _outputs(theirs(*plain))
    assert all(isinstance(o, DTensor) for o in got)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.full_tensor(), b, rtol=1e-12, atol=1e-12)
    sum(o.full_tensor().pow(2).sum() for o in got).backward()
    sum(o.pow(2).sum() for o in expected).backward()
    for a, b in zip(leaves, plain):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", ["batch_norm", "instance_norm"])
def test_dtensor_running_statistics_as_torch(mesh, norm):
    """Running statistics as DTensors: updated in training as torch's, and read in eval."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    ours_fn, theirs_fn = getattr(AF, norm), getattr(F, norm)
    plain = (torch.zeros(4, dtype=D), torch.ones(4, dtype=D))
    rm, rv = (distribute_tensor(t, mesh, [Replicate()]) for t in plain)
    x = distribute_tensor(X, mesh, [Shard(0)])
    flag = {"training": True} if norm == "batch_norm" else {"use_input_stats": True}
    ours_fn(x, rm, rv, momentum=0.3, **flag)
    theirs_fn(X, *plain, momentum=0.3, **flag)
    torch.testing.assert_close(rm.full_tensor(), plain[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv.full_tensor(), plain[1], rtol=1e-12, atol=1e-12)
    flag = {"training": False} if norm == "batch_norm" else {"use_input_stats": False}
    torch.testing.assert_close(ours_fn(x, rm, rv, **flag).full_tensor(), theirs_fn(X, *plain, **flag),
                               rtol=1e-12, atol=1e-12)


def test_tensor_parallel_sequence_parallel_norms(mesh):
    """torch's SequenceParallel style on addnorm's LayerNorm and RMSNorm (the input and
    output sharded along the sequence, the weight a replicated DTensor), against
    torch.nn's under the same plan."""
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    x = torch.randn(2, 5, 8)
    for ours, theirs in ((addnorm.LayerNorm(8), nn.LayerNorm(8)), (addnorm.RMSNorm(8), nn.RMSNorm(8))):
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            theirs.weight.copy_(ours.weight)
        outs = [parallelize_module(m, mesh, SequenceParallel())(x) for m in (ours, theirs)]
        torch.testing.assert_close(outs[0].full_tensor(), outs[1].full_tensor())
        for o in outs:
            o.full_tensor().pow(2).sum().backward()
        torch.testing.assert_close(ours.weight.grad.full_tensor(), theirs.weight.grad.full_tensor())


@pytest.mark.parametrize("name", WHOLE_CASES)
def test_fake_tensors_outside_their_mode(name):
    """Fake tensors used after their mode has exited: shapes and dtypes as torch's
    spelling gives them (and no data pointer read: that crashed)."""
    ours, theirs, inputs = CASES[name]
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(t) for t in inputs]
    for a, b in zip(_outputs(ours(*fakes)), _outputs(theirs(*fakes))):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)


def test_a_python_dispatch_wrapper_sees_torch_ops():
    """Any other ``__torch_dispatch__`` subclass (here torch's logging tensor): the
    reference's torch ops reach it, one by one, and the values are torch.nn's."""
    ours, theirs, inputs = CASES["layer_norm"]
    with capture_logs() as logs:
        out = ours(*(LoggingTensor(t) for t in inputs))
    assert any("aten.mean" in line for line in logs)
    torch.testing.assert_close(out.elem, theirs(*inputs), rtol=1e-12, atol=1e-12)


def test_fsdp2_sharded_parameters(mesh):
    """FSDP2 (``fully_shard``: parameters kept as sharded DTensors, gathered for the
    forward) over a model with addnorm's norms: outputs and gradients as the same model
    with torch.nn's, unsharded."""
    import copy

    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.RMSNorm(8))
    ours = copy.deepcopy(theirs)
    ours[1], ours[3] = addnorm.LayerNorm(8), addnorm.RMSNorm(8)
    ours.load_state_dict(theirs.state_dict())
    fully_shard(ours, mesh=mesh)
    x = torch.randn(4, 8)
    torch.testing.assert_close(ours(x), theirs(x))
    ours(x).pow(2).sum().backward()
    theirs(x).pow(2).sum().backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad.full_tensor(), b.grad, msg=name)
