"""What only a GPU can check: the triton backend as the default for CUDA tensors, against
torch.nn's own CUDA modules; torch.compile and CUDA graphs around it; rows too long for
one block at full size; deterministic parameter gradients.  Skipped without a GPU (the
kernels' values and gradients are checked on CPU tensors through Triton's interpreter in
``test_triton.py``, which ``ADDNORM_TEST_DEVICE=cuda`` runs on the GPU too)."""

import pytest
import torch
from torch import nn

import addnorm
from addnorm import _backend
from helpers import assert_relative, assert_same_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
CUDA = torch.device("cuda")

# relative to the reference's largest value, per dtype
_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}




def _pairs():
    """(ours, torch.nn's) module pairs with the same parameters, and an input shape."""
    yield addnorm.RMSNorm(4096, eps=1e-6), nn.RMSNorm(4096, eps=1e-6), (8, 33, 4096)
    yield addnorm.LayerNorm(1000), nn.LayerNorm(1000), (300, 1000)
    yield addnorm.RMSNorm(65536), nn.RMSNorm(65536), (3, 65536)  # rows walked in blocks
    yield addnorm.LayerNorm(70000), nn.LayerNorm(70000), (2, 70000)
    yield addnorm.GroupNorm(32, 320), nn.GroupNorm(32, 320), (2, 320, 16, 16)
    yield addnorm.InstanceNorm2d(8, affine=True), nn.InstanceNorm2d(8, affine=True), (3, 8, 9, 7)
    yield addnorm.BatchNorm2d(16), nn.BatchNorm2d(16), (4, 16, 8, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_modules_match_torch_nn_on_the_gpu(dtype, channels_last):
    assert _backend.select(CUDA) == "triton"
    torch.manual_seed(0)
    for ours, theirs, shape in _pairs():
        if channels_last and len(shape) != 4:
            continue
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_()
            theirs.load_state_dict(ours.state_dict())
        ours, theirs = ours.to(CUDA, dtype), theirs.to(CUDA, dtype)
        x = torch.randn(shape, device=CUDA, dtype=dtype) * 2 + 0.5
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn_like(x)
        outs = []
        for m in (ours, theirs):
            xi = x.detach().clone().requires_grad_()
            y = m(xi)
            y.backward(dy)
            outs.append([y, xi.grad] + [p.grad for p in m.parameters()])
        name = type(ours).__name__
        assert outs[0][0].dtype == outs[1][0].dtype, name
        if channels_last:
            assert outs[0][0].is_contiguous(memory_format=torch.channels_last), name
        for what, a, b in zip(["y", "dx", "dw", "db"], outs[0], outs[1]):
            assert_relative(a, b, _TOL[dtype], f"{name} {shape} {what}")


def test_fused_add_matches_the_unfused_torch_ops():
    torch.manual_seed(1)
    x, res = (torch.randn(64, 2048, device=CUDA, dtype=torch.bfloat16) for _ in range(2))
    norm = addnorm.AddRMSNorm(2048).to(CUDA, torch.bfloat16)
    y, r = norm(x, res)
    ref_r = x + res
    assert torch.equal(r, ref_r)
    torch.testing.assert_close(y, nn.functional.rms_norm(ref_r, (2048,), norm.weight, norm.eps))


def test_parameter_gradients_are_deterministic():
    torch.manual_seed(2)
    norm = addnorm.LayerNorm(1024).to(CUDA)
    x, dy = torch.randn(16384, 1024, device=CUDA), torch.randn(16384, 1024, device=CUDA)
    grads = []
    for _ in range(3):
        norm.zero_grad()
        norm(x).backward(dy)
        grads.append((norm.weight.grad.clone(), norm.bias.grad.clone()))
    for g in grads[1:]:
        assert torch.equal(g[0], grads[0][0]) and torch.equal(g[1], grads[0][1])


class _Block(nn.Module):
    def __init__(self, d=256):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.add_rms = addnorm.AddRMSNorm(d)
        self.ln = addnorm.LayerNorm(d)

    def forward(self, x):
        y, r = self.add_rms(self.lin(x), x)
        return self.ln(y) + r


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compile_fullgraph_and_cuda_graphs(mode):
    """torch.compile(fullgraph=True) traces the triton backend's ops, forward and backward,
    and "reduce-overhead" replays them from CUDA graphs: results as eager's."""
    torch.manual_seed(3)
    eager = _Block().to(CUDA)
    model = _Block().to(CUDA)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead records on the first calls, replays after
        # a training step's: CUDA-graph outputs (the gradients too) live until the next
        # replay, so the step's gradients are fresh tensors, read before the next one
        torch.compiler.cudagraph_mark_step_begin()
        eager.zero_grad(set_to_none=True), model.zero_grad(set_to_none=True)
        assert_same_step(eager, model, compiled, torch.randn(8, 256, device=CUDA), rtol=1e-5, grad_rtol=1e-4)


class _ChannelBlock(nn.Module):
    def __init__(self, c=32):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gn = addnorm.GroupNorm(8, c)
        self.dyt = addnorm.DyT(c)

    def forward(self, x):  # (N, C, H, W) -> DyT over the last dim after moving C there
        return self.dyt(self.gn(self.conv(x)).transpose(1, -1)).transpose(1, -1)


@pytest.mark.parametrize("make, shape, kernels", [
    (_Block, (8, 256), ("_row_norm_fwd_kernel", "_row_norm_bwd_kernel")),
    (_ChannelBlock, (2, 32, 8, 8), ("_group_norm_fwd_kernel", "_group_norm_bwd_kernel", "_dyt_fwd_kernel",
                                    "_dyt_bwd_kernel")),
])
def test_inductor_launches_the_triton_kernels_itself(make, shape, kernels):
    """Compiled, the triton backend's ops are traced into their kernels (as
    ``torch.library.triton_op``'s): inductor's code launches them and keeps no opaque
    ``addnorm`` op, forward and backward; values and gradients as eager's."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(5)
    block = make().to(CUDA)
    x = torch.randn(shape, device=CUDA)

    def step(model):
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    eager = step(block)
    block.zero_grad(set_to_none=True)
    compiled, codes = run_and_get_code(step, torch.compile(block, fullgraph=True))
    code = "\n".join(codes)
    for kernel in kernels:
        assert kernel in code, kernel
    assert "torch.ops.addnorm" not in code
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_eager_calls_are_captured_in_a_cuda_graph():
    """Decoding on a GPU is launch-bound: a step captured once and replayed must run the
    same kernels on whatever the static input holds at replay."""
    torch.manual_seed(4)
    norm = addnorm.RMSNorm(4096).to(CUDA, torch.bfloat16)
    static_x = torch.randn(1, 4096, device=CUDA, dtype=torch.bfloat16)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            norm(static_x)  # warm-up (Triton compiles) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = norm(static_x)
        for _ in range(2):
            static_x.copy_(torch.randn(1, 4096, device=CUDA, dtype=torch.bfloat16))
            graph.replay()
            torch.testing.assert_close(static_y, nn.functional.rms_norm(static_x, (4096,), norm.weight))


def test_ops_pass_opcheck_on_the_gpu():
    """Schemas, fake impls and autograd registrations agree with the Triton kernels."""
    from addnorm import ops

    def leaf(*shape, dtype=torch.float32):
        return torch.randn(shape, device=CUDA, dtype=dtype, requires_grad=True)

    x, r, w, b = leaf(5, 8), leaf(5, 8), leaf(8), leaf(8)
    xh, wh = leaf(5, 8, dtype=torch.bfloat16), leaf(8, dtype=torch.bfloat16)
    xc = leaf(2, 6, 3, 3).detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for op, args in [
        (ops.row_norm_fwd, (x, r, w, b, 1e-5, 0.0, False, 0, "triton")),
        (ops.row_norm_fwd, (x, None, w, None, 1e-5, 1.0, True, 0, "triton")),
        (ops.row_norm_fwd, (xh, None, wh, None, 1e-5, 1.0, True, 2, "triton")),
        (ops.group_norm_fwd, (xc, leaf(6), leaf(6), 3, 1e-5, "triton")),
        (ops.dyt_fwd, (x, leaf(1), w, b, "triton")),
    ]:
        torch.library.opcheck(op, args)
