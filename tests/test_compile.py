"""torch.compile(fullgraph=True) traces models built from addnorm modules, fwd and bwd."""

import pytest
import torch
from torch import nn

import addnorm
from helpers import assert_same_step


class Tiny(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.ln = addnorm.LayerNorm(d)
        self.add_rms = addnorm.AddRMSNorm(d, offset=1.0)
        self.add_ln = addnorm.AddLayerNorm(d)
        self.dyt = addnorm.DyT(d)
        self.scale = addnorm.ScaleNorm(d)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.bn = addnorm.BatchNorm1d(4)
        self.gn = addnorm.GroupNorm(2, 4)
        self.inorm = addnorm.InstanceNorm1d(4, affine=True, track_running_stats=True)
        self.rms = addnorm.RMSNorm(d)

    def forward(self, x):  # x: (N, 4, d)
        h = self.ln(self.inp(x))
        y, r = self.add_rms(h, x)
        y, r = self.add_ln(self.dyt(y), r)
        c = self.inorm(self.gn(self.bn(self.conv(y))))
        return self.rms(self.scale(c) + r)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward(compiler):
    torch.manual_seed(0)
    eager = Tiny()
    compiled_model = Tiny()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    for step in range(2):
        assert_same_step(eager, compiled_model, compiled, torch.randn(3, 4, 16))
    for (name, be), (_, bc) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        torch.testing.assert_close(bc, be, msg=name)  # running stats updated in the graph too


def test_ops_pass_torch_library_opcheck():
    """Schemas, fake impls and autograd registrations agree with the real kernels."""
    from addnorm import ops

    x = torch.randn(5, 8, requires_grad=True)
    r = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    xh = torch.randn(5, 8, dtype=torch.bfloat16, requires_grad=True)
    wh = torch.randn(8, dtype=torch.bfloat16, requires_grad=True)
    xc = torch.randn(2, 6, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    wc, bc = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    rm, rv = torch.zeros(6), torch.ones(6)
    cases = [
        (ops.row_norm_fwd, (x, r, w, b, 1e-5, 0.0, False, 0, "torch")),
        (ops.row_norm_fwd, (x, None, w, None, 1e-5, 1.0, True, 0, "torch")),
        (ops.row_norm_fwd, (x, None, None, None, 1e-5, 0.0, False, 0, "torch")),
        (ops.row_norm_fwd, (xh, None, w, None, 1e-5, 0.0, True, 1, "torch")),  # float32 y
        (ops.row_norm_fwd, (xh, None, wh, None, 1e-5, 1.0, True, 2, "torch")),
        (ops.group_norm_fwd, (xc, wc, bc, 3, 1e-5, "torch")),
        (ops.batch_norm_fwd, (xc, wc, bc, rm, rv, True, 1e-5, "torch")),
        (ops.batch_norm_fwd, (xc, None, None, rm, rv, False, 1e-5, "torch")),
        (ops.dyt_fwd, (x, torch.tensor([0.5], requires_grad=True), w, b, "torch")),
        (ops.scale_norm_fwd, (x, torch.tensor([2.0], requires_grad=True), 1e-5, "torch")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compiled_backward_runs_the_backward_op():
    """The differentiable backward (for create_graph) must not leak into compiled graphs:
    aot_autograd's backward graph holds the fast backward op."""
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = {}

    def backend(gm, inputs):
        def keep(kind):
            return lambda g, _inputs: graphs.setdefault(kind, g) or g

        return aot_module_simplified(gm, inputs, fw_compiler=keep("fw"), bw_compiler=keep("bw"))

    compiled = torch.compile(addnorm.LayerNorm(16), backend=backend, fullgraph=True)
    compiled(torch.randn(4, 16, requires_grad=True)).sum().backward()
    targets = {str(n.target) for n in graphs["bw"].graph.nodes if n.op == "call_function"}
    assert "addnorm.row_norm_bwd.default" in targets, targets


def test_export_with_an_unbounded_dynamic_batch():
    """torch.export with a dynamic batch (no maximum): a norm of symbolic size traces as
    the reference's torch ops rather than comparing its size with the inlining bound,
    which guarded the graph (export refused the Dim: 'Not all values of b ... satisfy
    ... <= 65535').  The exported program holds no addnorm op and matches eager at
    other batch sizes."""
    from torch.export import Dim, export

    torch.manual_seed(0)
    model = Tiny().eval()
    program = export(model, (torch.randn(3, 4, 16),), dynamic_shapes=({0: Dim("batch")},))
    assert "addnorm" not in program.graph_module.code
    for batch in (2, 5, 33):
        x = torch.randn(batch, 4, 16)
        torch.testing.assert_close(program.module()(x), model(x))
