"""addnorm.patch on models people already have: tiny, randomly initialised Hugging Face
models built from configs (no download), and torch.nn models.  The patched model must
compute what the original computed: forward bit for bit, gradients as close as the
order of a sum over tokens allows, the same generated tokens; and unpatch restores it."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import transformers as T
import torch.nn.functional as F
from torch import nn

import addnorm

T.logging.set_verbosity_error()
warnings.filterwarnings("ignore", module="transformers")

_DECODER = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
MODELS = {  # name -> (builder, norms it has, the class that gets swapped)
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DECODER)), 5, "LlamaRMSNorm"),
    "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(**_DECODER)), 5, "MistralRMSNorm"),
    "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_DECODER)), 5, "Qwen2RMSNorm"),
    "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(**_DECODER, head_dim=16)), 5, "GemmaRMSNorm"),
    "gemma2": (lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**_DECODER, head_dim=16)), 9, "Gemma2RMSNorm"),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                     n_positions=64)), 5, "LayerNorm"),
    "bert": (lambda: T.BertForMaskedLM(T.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=128)), 6, "LayerNorm"),
    "t5": (lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128,
                                                            num_layers=2, num_heads=4)), 12, "T5LayerNorm"),
    # norms without a weight: OLMo's LayerNorm (no parameters, its eps written in its
    # forward), nanochat's RMSNorm (an eps attribute)
    "olmo": (lambda: T.OlmoForCausalLM(T.OlmoConfig(**_DECODER)), 5, "OlmoLayerNorm"),
    "nanochat": (lambda: T.NanoChatForCausalLM(T.NanoChatConfig(**_DECODER)), 9, "NanoChatRMSNorm"),
}
_LAYER_NORMS = ("LayerNorm", "OlmoLayerNorm")  # (the others are RMSNorms, bit for bit)
DTYPES = [torch.float32, torch.bfloat16]


def _model(name: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]().to(dtype)
    with torch.no_grad():  # norm weights away from 1 (and Gemma's from 0): rounding orders then differ
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _step(model: nn.Module, name: str, ids: torch.Tensor):
    """Logits and every parameter's gradient of one training step (dropout seeded)."""
    model.zero_grad()
    torch.manual_seed(1)
    extra = {"decoder_input_ids": ids} if name == "t5" else {}
    out = model(ids, labels=ids, **extra)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_patched_model_computes_what_the_original_computed(name, dtype):
    model = _model(name, dtype).train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    logits, grads = _step(model, name, ids)
    params = {n: p for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    assert addnorm.patch(model) == MODELS[name][1]
    swapped = [m for m in model.modules() if getattr(m, "_addnorm_original", None)]
    assert {m._addnorm_original.__name__ for m in swapped} == {MODELS[name][2]}
    # the same parameter objects, the same state_dict: optimizers and checkpoints keep working
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model.state_dict().keys() == state.keys()

    patched_logits, patched_grads = _step(model, name, ids)
    if MODELS[name][2] in _LAYER_NORMS:
        # a LayerNorm: addnorm runs torch's own kernel below 8M elements (bit for bit); the
        # suite runs ours at every size, whose statistics are summed in another order than
        # torch's Welford cascade: the last bits differ
        torch.testing.assert_close(patched_logits, logits, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(patched_logits, logits)
    # A norm weight's gradient is a sum over tokens, in our order, not autograd's; the
    # rest follow from it (float32) or agree to the last bit (bfloat16, mostly).  A
    # gradient that nearly cancels is judged on the model's gradient scale.
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    scale = max(g.abs().max().item() for g in grads.values())
    for n, g in grads.items():
        atol = tol * max(g.abs().max().item(), 1e-3 * scale)
        torch.testing.assert_close(patched_grads[n], g, rtol=tol, atol=atol, msg=n)

    assert addnorm.unpatch(model) == MODELS[name][1]
    assert not any(hasattr(m, "_addnorm_original") for m in model.modules())
    assert type(swapped[0]).__name__ == MODELS[name][2] and type(swapped[0]).__module__.startswith(("transformers", "torch"))
    assert torch.equal(_step(model, name, ids)[0], logits)


@pytest.mark.parametrize("name", ["llama", "gemma", "gpt2"])
def test_generate_gives_the_same_tokens(name):
    model = _model(name, torch.bfloat16).eval()
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    before = model.generate(prompt, **kw)
    addnorm.patch(model)
    assert torch.equal(model.generate(prompt, **kw), before)


@pytest.mark.parametrize("name, family", [("llama", ("rmsnorm", 0.0, "llama")), ("gemma", ("rmsnorm", 1.0, "gemma")),
                                          ("t5", ("rmsnorm", 0.0, "llama"))])
def test_a_family_is_recognised_by_what_it_computes(name, family):
    """Gemma: (1 + w) in float32, rounded once; Llama and T5 (named LayerNorm, but no
    centering): xhat rounded to the input's dtype, then times the weight."""
    model = _model(name, torch.float32)
    addnorm.patch(model)
    spec = next(m._addnorm_family for m in model.modules() if hasattr(m, "_addnorm_family"))
    assert (spec.kind, spec.offset, spec.casting_mode) == family


def test_torch_compile_runs_the_patched_model():
    model = _model("llama", torch.float32).eval()
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    addnorm.patch(model)
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model)(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_patched_models_pickle_and_deepcopy():
    model = _model("llama", torch.float32).eval()
    ids = torch.randint(0, 128, (1, 8))
    addnorm.patch(model, backend="torch")
    with torch.no_grad():
        expected = model(ids).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        norm = clone.model.norm
        assert type(norm).__bases__[0].__name__ == "LlamaRMSNorm" and norm._addnorm_backend == "torch"
        with torch.no_grad():
            assert torch.equal(clone(ids).logits, expected)
        assert addnorm.unpatch(clone) == 5


def test_torch_nn_norms_become_addnorms_twins_in_place():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.Flatten(1),
                          nn.LayerNorm(8 * 30 * 30), nn.Linear(8 * 30 * 30, 4), nn.RMSNorm(4), nn.InstanceNorm1d(4))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        expected = model[:7](x)
    bn = model[1]
    assert addnorm.patch(model) == 4  # instancenorm is not among the default kinds
    assert model[1] is bn and isinstance(bn, addnorm.BatchNorm2d) and isinstance(bn, nn.BatchNorm2d)
    assert [type(m).__name__ for m in model] == ["Conv2d", "BatchNorm2d", "GroupNorm", "Flatten", "LayerNorm",
                                                 "Linear", "RMSNorm", "InstanceNorm1d"]
    assert type(model[7]) is nn.InstanceNorm1d
    with torch.no_grad():
        torch.testing.assert_close(model[:7](x), expected, rtol=1e-5, atol=1e-5)
    assert addnorm.patch(model, norms="instancenorm") == 1 and addnorm.patch(model) == 0
    assert addnorm.unpatch(model) == 5
    assert [type(m) for m in model][1:3] == [nn.BatchNorm2d, nn.GroupNorm] and not hasattr(model[6], "casting_mode")


def test_a_sync_batch_norm_becomes_addnorms_which_runs_on_the_cpu():
    """torch.nn.SyncBatchNorm refuses CPU tensors in a process group, and DDP refuses a CPU
    model that holds one: patched, it is addnorm's (the same object and tensors)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))
    norm, weight = model[1], model[1].weight
    assert addnorm.patch(model) == 1
    assert model[1] is norm and type(norm) is addnorm.SyncBatchNorm and norm.weight is weight
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(model(x), nn.functional.batch_norm(model[0](x), None, None, weight, norm.bias, True))
    assert addnorm.unpatch(model) == 1 and type(norm) is nn.SyncBatchNorm


def test_only_the_kinds_asked_for_are_swapped():
    model = _model("bert", torch.float32)
    assert addnorm.patch(model, norms=("rmsnorm",)) == 0
    assert addnorm.patch(model, norms="layernorm") == 6


def test_unknown_norm_classes_are_left_alone_and_listed(capsys):
    class OddRMSNorm(nn.Module):  # not an RMSNorm: the mean of |x|, not of x**2
        def __init__(self, d):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-6

        def forward(self, x):
            return x / (x.abs().mean(-1, keepdim=True) + self.eps) * self.weight

    class GatedRMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-6

        def forward(self, x, gate=None):
            return x

    model = nn.Sequential(OddRMSNorm(16), GatedRMSNorm(16), nn.LayerNorm(16))
    assert addnorm.patch(model, verbose=True) == 1
    out = capsys.readouterr().out
    assert "swapped 1 x LayerNorm" in out
    assert "left test_unknown_norm_classes_are_left_alone_and_listed.<locals>.OddRMSNorm alone: computes none of" in out
    assert "GatedRMSNorm alone: its forward takes more than the input (gate)" in out
    assert type(model[0]) is OddRMSNorm


def test_addnorms_own_norms_are_left_as_they_are(capsys):
    model = nn.Sequential(addnorm.RMSNorm(8), addnorm.AddLayerNorm(8), addnorm.LayerNorm(8))
    assert addnorm.patch(model, verbose=True) == 0
    assert "left" not in capsys.readouterr().out
    assert [type(m) for m in model] == [addnorm.RMSNorm, addnorm.AddLayerNorm, addnorm.LayerNorm]


def test_bad_arguments(capsys):
    model = nn.Sequential(nn.Linear(4, 4))
    assert addnorm.patch(model, verbose=True) == 0
    assert "no norm swapped in Sequential" in capsys.readouterr().out
    with pytest.raises(ValueError, match="norms must be among layernorm, rmsnorm, groupnorm, batchnorm, instancenorm; got 'ln'"):
        addnorm.patch(model, norms=("layernorm", "ln"))
    with pytest.raises(ValueError, match="backend must be one of"):
        addnorm.patch(model, backend="cuda")
    assert addnorm.unpatch(model) == 0


def test_a_model_on_the_meta_device_is_patched_too():
    """Big models are often built on the meta device and loaded later: the probe runs on
    the CPU with values of its own, so recognition does not need the weights."""
    with torch.device("meta"):
        model = MODELS["gemma"][0]()
    assert addnorm.patch(model) == 5
    assert model.model.norm._addnorm_family.offset == 1.0 and model.model.norm.weight.is_meta


def test_a_layer_norm_of_the_models_own_is_recognised():
    """Cohere-style: a LayerNorm without bias computed in float32 and cast once."""
    class Fp32LayerNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.ones(d)), 1e-5

        def forward(self, x):
            h = x.float()
            h = (h - h.mean(-1, keepdim=True)) * torch.rsqrt(h.var(-1, keepdim=True, unbiased=False) + self.variance_epsilon)
            return (self.weight.float() * h).to(x.dtype)

    model = nn.Sequential(Fp32LayerNorm(96)).to(torch.bfloat16)
    with torch.no_grad():
        model[0].weight.normal_()
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    expected = model(x)
    assert addnorm.patch(model) == 1 and model[0]._addnorm_family.kind == "layernorm"
    torch.testing.assert_close(model(x), expected, rtol=1e-2, atol=1e-2)


def test_norms_without_a_weight_are_recognised_by_what_they_compute(capsys):
    """Weightless norms: the epsilon read from the class's attribute or, where it keeps
    none, found among the usual ones by the probe; a weight kept as a buffer that the
    forward ignores (Falcon Mamba's) is ignored, one it reads leaves the class alone."""
    class NoEpsLayerNorm(nn.Module):  # OLMo-style: the epsilon lives in the code
        def forward(self, x):
            return F.layer_norm(x.float(), x.shape[-1:], None, None, 1e-6).to(x.dtype)

    class RoundedRstdRMSNorm(nn.Module):  # DeepSeek-V4-style: rstd rounded to x's dtype
        def __init__(self):
            super().__init__()
            self.eps = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps).to(x.dtype)

    class UnusedWeightRMSNorm(nn.Module):  # Falcon-Mamba-style: a buffer of ones it never reads
        def __init__(self, d):
            super().__init__()
            self.eps, self.weight = 1e-6, nn.Buffer(torch.ones(d), persistent=False)

        def forward(self, x):
            h = x.float()
            return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)

    class BufferWeightRMSNorm(UnusedWeightRMSNorm):  # a frozen weight it does read
        def forward(self, x):
            return super().forward(x) * self.weight.to(x.dtype)

    model = nn.Sequential(NoEpsLayerNorm(), RoundedRstdRMSNorm(), UnusedWeightRMSNorm(48), BufferWeightRMSNorm(48))
    x = torch.randn(4, 48) * 3 + 1
    x = torch.cat([x, x * 1e-3])  # rows where the epsilon shows
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        with torch.no_grad():
            model[3].weight.uniform_(0.5, 1.5)
        expected = [m(x.to(dtype)) for m in model]
        assert addnorm.patch(model, verbose=True) == 3
        assert "left test_norms_without_a_weight_are_recognised_by_what_they_compute.<locals>.BufferWeightRMSNorm" \
               " alone: computes none of" in capsys.readouterr().out
        specs = [m._addnorm_family for m in model[:3]]
        assert [(s.kind, s.weighted, s.eps_name, s.eps) for s in specs] == [
            ("layernorm", False, None, 1e-6), ("rmsnorm", False, "eps", 0.0), ("rmsnorm", False, "eps", 0.0)]
        assert specs[1].casting_mode == "none" and specs[2].casting_mode == "gemma"
        for m, e in zip(model, expected):
            got = m(x.to(dtype))
            spec = getattr(m, "_addnorm_family", None)  # (None: left alone)
            if spec is not None and spec.kind == "layernorm":
                torch.testing.assert_close(got, e, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
            else:
                assert torch.equal(got, e)
        addnorm.unpatch(model)


def test_parameter_dtypes_the_probe_did_not_see_run_the_models_own_forward():
    """A norm kept in float32 beside a bfloat16 input runs addnorm where the class's code
    was found to compute what addnorm does there (Llama's promotes to a float32 output),
    and its own forward where not (a class that rounds its weight to the input's dtype
    first); a float32 input beside a bfloat16 weight, never probed, runs its own forward."""
    class RoundedWeightRMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.rand(d) + 0.5), 1e-6

        def forward(self, x):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return self.weight.to(x.dtype) * h.to(x.dtype)

    torch.manual_seed(0)
    llama = T.models.llama.modeling_llama.LlamaRMSNorm(64)
    with torch.no_grad():
        llama.weight.uniform_(0.5, 1.5)
    original = nn.Sequential(llama, RoundedWeightRMSNorm(64))
    x = torch.randn(5, 64) * 2
    for params, dtype in [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]:
        model = copy.deepcopy(original).to(params)
        expected = [m(x.to(dtype)) for m in model]
        assert addnorm.patch(model) == 2
        assert model[0]._addnorm_family.mixed and not model[1]._addnorm_family.mixed
        for m, e in zip(model, expected):
            got = m(x.to(dtype))
            assert got.dtype == e.dtype and torch.equal(got, e), (type(m).__name__, params, dtype)
