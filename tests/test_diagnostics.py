"""addnorm.diagnostics: each recorded value against the same quantity computed by hand."""

import math

import pytest
import torch
from torch import nn

import addnorm
from addnorm.diagnostics import Diagnostics, default_layers


def _model():
    torch.manual_seed(0)
    return addnorm.Transformer("decoder", vocab_size=30, d_model=16, n_heads=2, n_layers=2, max_len=8)


def test_layers_are_the_residuals_or_the_modules_holding_parameters():
    names = [n for n, _ in default_layers(_model())]
    assert names == ["decoder.0.attn", "decoder.0.mlp", "decoder.1.attn", "decoder.1.mlp"]
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert [n for n, _ in default_layers(mlp)] == ["0", "2"]


def test_recorded_values_equal_hand_computed_ones():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = Diagnostics(model)
    seen = {}
    layer = model.decoder[1].mlp
    # inside the stack a Residual returns (x, pending): the stream after it is their sum
    handle = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("out", (o[0] + o[1]).detach()))
    idx = torch.randint(0, 30, (2, 8))
    for _ in range(2):
        loss = model(idx, idx)[1]
        loss.backward()
        diag.record_gradients()
        grad = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in layer.parameters()))
        before = [p.detach().clone() for p in layer.parameters()]
        with diag.update():
            opt.step()
        change = math.sqrt(sum(float((p.detach() - b).double().pow(2).sum()) for p, b in zip(layer.parameters(), before)))
        base = math.sqrt(sum(float(b.double().pow(2).sum()) for b in before))
        opt.zero_grad()
        diag.end_step()
    handle.remove()
    last = [r for r in diag.records if r["step"] == 1 and r["layer"] == "decoder.1.mlp"][0]
    assert last["index"] == 3
    assert last["act_rms"] == pytest.approx(float(seen["out"].pow(2).mean().sqrt()), rel=1e-6)
    assert last["grad_norm"] == pytest.approx(grad, rel=1e-9)
    assert last["update_ratio"] == pytest.approx(change / base, rel=1e-9)
    assert len(diag.records) == 8 and diag.by_layer("grad_norm", 0)[0] > 0


def test_remove_takes_the_hooks_off_and_plot_writes_a_picture(tmp_path):
    model = _model()
    diag = Diagnostics(model)
    model(torch.randint(0, 30, (1, 8)))
    diag.end_step()
    diag.enabled = False  # a step not worth keeping: the hooks record nothing
    model(torch.randint(0, 30, (1, 8)))
    diag.end_step()
    diag.enabled = True
    diag.remove()
    model(torch.randint(0, 30, (1, 8)))
    diag.end_step()
    assert {r["step"] for r in diag.records} == {0}
    diag.plot("act_rms", str(tmp_path / "act.png"))
    assert (tmp_path / "act.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="metric must be one of"):
        diag.by_layer("loss", 0)
