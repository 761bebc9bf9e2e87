"""Residual placements against their formulas written out by hand, DeepNorm's
coefficients against the paper's, and the Transformer builder."""

import math

import pytest
import torch
from torch import nn

import addnorm
from addnorm.residual import scale_init_
from addnorm.transformer import BUILDER_PLACEMENTS, KINDS, NORMS, MLP, Attention

D = 16


def _parts(norm_kind="layernorm"):
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D)).double()
    make = {"layernorm": lambda: addnorm.LayerNorm(D), "rmsnorm": lambda: addnorm.RMSNorm(D),
            "torch": lambda: nn.LayerNorm(D), "scalenorm": lambda: addnorm.ScaleNorm(D)}[norm_kind]
    n1, n2 = make().double(), make().double()
    with torch.no_grad():
        for p in list(n1.parameters()) + list(n2.parameters()):
            p.copy_(torch.randn_like(p))
    x = torch.randn(3, 5, D, dtype=torch.float64)
    return f, n1, n2, x


@pytest.mark.parametrize("norm_kind", ["layernorm", "rmsnorm", "torch", "scalenorm"])
def test_each_placement_is_its_formula(norm_kind):
    f, n1, n2, x = _parts(norm_kind)
    cases = {
        "post": (dict(), lambda: n1(x + f(x))),
        "pre": (dict(), lambda: x + f(n1(x))),
        "sandwich": (dict(norm2=n2), lambda: x + n2(f(n1(x)))),
        "peri": (dict(norm2=n2), lambda: x + n2(f(n1(x)))),
        "deepnorm": (dict(alpha=2.5), lambda: n1(2.5 * x + f(x))),
        "lns": (dict(layer=4), lambda: x + f(n1(x) / 2.0)),
    }
    for placement, (kw, formula) in cases.items():
        r = addnorm.Residual(f, n1, placement, **kw)
        torch.testing.assert_close(r(x), formula(), rtol=1e-12, atol=1e-12, msg=placement)
    r = addnorm.Residual(f, n1, "layerscale", init_scale=0.3, dim=D).double()
    with torch.no_grad():
        r.gamma.copy_(torch.randn(D))
    torch.testing.assert_close(r(x), x + r.gamma * f(n1(x)), rtol=1e-12, atol=1e-12)
    r = addnorm.Residual(f, None, "rezero").double()
    with torch.no_grad():
        r.gate.fill_(0.7)
    torch.testing.assert_close(r(x), x + 0.7 * f(x), rtol=1e-12, atol=1e-12)


def test_subln_and_deepnorm_scale_the_init_and_subln_is_pre_ln_with_an_inner_norm():
    torch.manual_seed(0)
    mlp = MLP(D, inner_norm=addnorm.LayerNorm(4 * D))
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    norm = addnorm.LayerNorm(D)
    r = addnorm.Residual(mlp, norm, "subln", init_scale=1.7)
    torch.testing.assert_close(mlp.c_fc.weight, 1.7 * before["c_fc.weight"])
    torch.testing.assert_close(mlp.c_proj.weight, 1.7 * before["c_proj.weight"])
    torch.testing.assert_close(mlp.c_fc.bias, before["c_fc.bias"])
    x = torch.randn(2, 3, D)
    torch.testing.assert_close(r(x), x + mlp.c_proj(mlp.inner_norm(torch.nn.functional.gelu(mlp.c_fc(norm(x))))))
    attn = Attention(D, 4, causal=True)
    w = attn.c_attn.weight.clone()
    addnorm.Residual(attn, addnorm.LayerNorm(D), "deepnorm", alpha=2.0, init_scale=0.5)
    torch.testing.assert_close(attn.c_attn.weight[: 2 * D], w[: 2 * D])  # q, k keep theirs
    torch.testing.assert_close(attn.c_attn.weight[2 * D:], 0.5 * w[2 * D:])  # v scaled
    # a sublayer without scale_init_: every Linear but query/key projections
    seq = nn.ModuleDict({"q_proj": nn.Linear(4, 4), "v_proj": nn.Linear(4, 4)})
    q, v = seq.q_proj.weight.clone(), seq.v_proj.weight.clone()
    scale_init_(seq, 0.25)
    torch.testing.assert_close(seq.q_proj.weight, q)
    torch.testing.assert_close(seq.v_proj.weight, 0.25 * v)


def test_rezero_is_the_identity_at_init_and_layerscale_starts_small():
    f, n1, _, x = _parts()
    assert torch.equal(addnorm.Residual(f, None, "rezero").double()(x), x)
    r = addnorm.Residual(f, n1, "layerscale")
    assert torch.equal(r.gamma, torch.full((D,), 1e-4))


def test_a_stack_of_deferred_adds_equals_the_plain_stack():
    """Pre-LN layers run as step() with the add fused into the next norm: the same numbers."""
    torch.manual_seed(0)
    layers = [addnorm.Residual(MLP(D), addnorm.RMSNorm(D), p) for p in ("pre", "sandwich", "post", "pre")]
    x = torch.randn(2, 3, D, dtype=torch.float64)
    for layer in layers:
        layer.double()
    plain = x
    for layer in layers:
        plain = layer(plain)
    y, pending = x, None
    for layer in layers:
        y, pending = layer.step(y, pending)
    torch.testing.assert_close(y + pending, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,m", [(6, 0), (0, 12), (100, 0), (6, 6), (18, 18), (200, 100)])
def test_deepnorm_coefficients_are_the_papers(n, m):
    c = addnorm.deepnorm_coefficients(n, m)
    if m == 0:
        assert c == (pytest.approx((2 * n) ** 0.25), pytest.approx((8 * n) ** -0.25), None, None)
    elif n == 0:
        assert c == (None, None, pytest.approx((2 * m) ** 0.25), pytest.approx((8 * m) ** -0.25))
    else:
        assert c.encoder_alpha == pytest.approx(0.81 * (n**4 * m) ** (1 / 16))
        assert c.encoder_beta == pytest.approx(0.87 * (n**4 * m) ** (-1 / 16))
        assert c.decoder_alpha == pytest.approx((3 * m) ** 0.25)
        assert c.decoder_beta == pytest.approx((12 * m) ** -0.25)
    assert addnorm.deepnorm_coefficients(6, 0).encoder_alpha == pytest.approx(12**0.25)


def test_bad_input_is_a_clear_error():
    f = MLP(D)
    with pytest.raises(ValueError, match="placement must be one of.*post"):
        addnorm.Residual(f, addnorm.LayerNorm(D), "middle")
    with pytest.raises(addnorm.ArgumentError, match="needs a norm"):
        addnorm.Residual(f, None, "pre")
    with pytest.raises(addnorm.ArgumentError, match="subln"):
        addnorm.Residual(f, addnorm.LayerNorm(D), "subln")
    with pytest.raises(addnorm.ArgumentError, match="alpha applies"):
        addnorm.Residual(f, addnorm.LayerNorm(D), "pre", alpha=2.0)
    with pytest.raises(addnorm.ArgumentError, match="encoder_layers"):
        addnorm.deepnorm_coefficients(-1, 0)
    with pytest.raises(addnorm.ArgumentError, match="at least one layer"):
        addnorm.deepnorm_coefficients(0, 0)
    kw = dict(vocab_size=10, d_model=16, n_heads=4, n_layers=2)
    with pytest.raises(ValueError, match="kind must be one of"):
        addnorm.Transformer("decoder-only", **kw)
    with pytest.raises(ValueError, match="norm must be one of"):
        addnorm.Transformer(norm="groupnorm", **kw)
    with pytest.raises(ValueError, match="placement must be one of.*hyper"):
        addnorm.Transformer(placement="middle", **kw)
    with pytest.raises(addnorm.ArgumentError, match="needs a norm"):
        addnorm.Transformer(norm="none", placement="pre", **kw)
    with pytest.raises(addnorm.ArgumentError, match="divisible"):
        addnorm.Transformer(vocab_size=10, d_model=18, n_heads=4, n_layers=2)


def _model(kind, norm, placement, **kw):
    torch.manual_seed(0)
    return addnorm.Transformer(kind, vocab_size=40, d_model=16, n_heads=2, n_layers=2, norm=norm,
                               placement=placement, max_len=12, streams=2, **kw)


def _combos():
    """Every kind x norm x placement; norm "none" goes with ReZero only."""
    for kind in KINDS:
        for norm in NORMS:
            for placement in BUILDER_PLACEMENTS:
                if norm != "none" or placement == "rezero":
                    yield kind, norm, placement


@pytest.mark.parametrize("kind,norm,placement", list(_combos()))
def test_every_kind_norm_and_placement_trains_a_step(kind, norm, placement):
    model = _model(kind, norm, placement)
    idx, src = torch.randint(0, 40, (2, 7)), torch.randint(0, 40, (2, 5))
    logits, loss = model(idx, idx, src=src if kind == "encoder-decoder" else None)
    assert logits.shape == (2, 7, 40) and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_hyper_connections_with_one_stream_are_pre_ln_at_init():
    torch.manual_seed(0)
    pre = addnorm.Transformer("decoder", vocab_size=40, d_model=16, n_heads=2, n_layers=3, placement="pre")
    torch.manual_seed(0)
    hyper = addnorm.Transformer("decoder", vocab_size=40, d_model=16, n_heads=2, n_layers=3, placement="hyper",
                                streams=1)
    hyper.load_state_dict(pre.state_dict(), strict=False)
    idx = torch.randint(0, 40, (2, 9))
    torch.testing.assert_close(hyper(idx)[0], pre(idx)[0], rtol=0, atol=0)


def test_deepnorm_and_subln_models_take_their_papers_init():
    """DeepNet's pseudo-code: xavier_normal_(w, gain=β) for the value, output and FFN
    weights, gain 1 for query and key; Magneto's the same with γ."""
    def std_ok(w, expected):
        assert w.std().item() == pytest.approx(expected, rel=0.1)

    torch.manual_seed(0)
    deep = addnorm.Transformer("decoder", vocab_size=50, d_model=64, n_heads=4, n_layers=2, placement="deepnorm")
    beta = addnorm.deepnorm_coefficients(0, 2).decoder_beta
    blk, d = deep.decoder[0], 64
    xavier = lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out))  # noqa: E731
    std_ok(blk.attn.sublayer.c_attn.weight[:d], xavier(d, d))  # q: gain 1
    std_ok(blk.attn.sublayer.c_attn.weight[d:2 * d], xavier(d, d))  # k: gain 1
    std_ok(blk.attn.sublayer.c_attn.weight[2 * d:], beta * xavier(d, d))  # v: gain β
    std_ok(blk.attn.sublayer.c_proj.weight, beta * xavier(d, d))
    std_ok(blk.mlp.sublayer.c_fc.weight, beta * xavier(d, 4 * d))
    std_ok(blk.mlp.sublayer.c_proj.weight, beta * xavier(4 * d, d))
    std_ok(deep.wte.weight, 0.02)  # outside the sublayers: nanoGPT's init
    assert blk.attn.alpha == pytest.approx(4**0.25)
    torch.manual_seed(0)
    sub = addnorm.Transformer("decoder", vocab_size=50, d_model=64, n_heads=4, n_layers=2, placement="subln")
    assert isinstance(sub.decoder[0].mlp.sublayer.inner_norm, addnorm.LayerNorm)
    std_ok(sub.decoder[0].mlp.sublayer.c_proj.weight, math.sqrt(math.log(4)) * xavier(4 * d, d))
    std_ok(sub.decoder[0].attn.sublayer.c_attn.weight[:d], xavier(d, d))


@pytest.mark.parametrize("kind, branches", [("decoder", 2 * 6), ("encoder-decoder", 2 * 6 + 3 * 6)])
def test_output_projections_start_scaled_by_the_number_of_residual_branches(kind, branches):
    """GPT-2's init: every sublayer's c_proj at 0.02 / sqrt(residual branches), the rest
    at 0.02, so the residual stream's variance at init does not grow with depth."""
    torch.manual_seed(0)
    model = addnorm.Transformer(kind, vocab_size=50, d_model=64, n_heads=4, n_layers=6, placement="pre")
    proj = torch.cat([w.flatten() for n, w in model.named_parameters() if n.endswith("c_proj.weight")])
    fc = torch.cat([w.flatten() for n, w in model.named_parameters() if n.endswith("c_fc.weight")])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(branches), rel=0.05)
    assert fc.std().item() == pytest.approx(0.02, rel=0.05)


def test_generate_is_deterministic_with_a_seed_and_greedy_at_temperature_zero():
    model = _model("decoder", "rmsnorm", "pre").eval()
    start = torch.zeros(2, 1, dtype=torch.long)
    a = model.generate(start, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(start, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 7) and torch.equal(a, b)
    greedy = model.generate(start, 3, temperature=0)
    assert torch.equal(greedy[:, 1], model(start)[0][:, -1].argmax(-1))
    s2s = _model("encoder-decoder", "layernorm", "post").eval()
    out = s2s.generate(start, 4, src=torch.randint(0, 40, (2, 5)), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 5)


def test_batchnorm_over_tokens_ignores_padding():
    """A sequence's output does not depend on what sits in another sequence's padding."""
    model = _model("encoder", "batchnorm", "pre")
    idx = torch.randint(0, 40, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    other = idx.clone()
    other[1, 5:] = (idx[1, 5:] + 7) % 40
    a, b = model(idx, mask=mask)[0], model(other, mask=mask)[0]
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1, :5], b[1, :5])
    assert not torch.allclose(model(idx)[0][0], model(other)[0][0])  # unmasked: it leaks


def test_the_pre_ln_stack_calls_the_fused_add_norm(monkeypatch):
    calls = []
    real = addnorm.functional.add_rms_norm
    monkeypatch.setattr(addnorm.functional, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _model("decoder", "rmsnorm", "pre")
    model(torch.randint(0, 40, (1, 5)))
    assert len(calls) == 4  # 2 layers x 2 sublayers: 3 between sublayers, 1 into the final norm


_COMPILED = (
    [("decoder", "layernorm", p) for p in BUILDER_PLACEMENTS]
    + [("decoder", n, "rezero" if n == "none" else "pre") for n in NORMS if n != "layernorm"]
    + [("encoder", "batchnorm", "post"), ("encoder-decoder", "rmsnorm", "deepnorm"),
       ("encoder-decoder", "layernorm", "hyper")]
)


@pytest.mark.parametrize("kind,norm,placement", _COMPILED)
def test_compiles_fullgraph_forward_and_backward(kind, norm, placement):
    """Every placement, every norm and every kind under torch.compile(fullgraph=True): the
    same loss and gradients as eager (aot_eager: dynamo and AOTAutograd trace it whole)."""
    torch._dynamo.reset()  # one process compiles many models of the same code: fresh limits
    model = _model(kind, norm, placement)
    idx = torch.randint(0, 40, (2, 6))
    src = torch.randint(0, 40, (2, 5)) if kind == "encoder-decoder" else None
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c = compiled(idx, idx, src=src)[1]
    loss_c.backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_e = model(idx, idx, src=src)[1]
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for gc, p in zip(grads_c, model.parameters()):
        torch.testing.assert_close(gc, p.grad)
