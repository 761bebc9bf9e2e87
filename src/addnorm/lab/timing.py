"""The lab's timed measurements: RMSNorm against LayerNorm (claim 1), BatchNorm folded
into the convolutions before it (claim 8), BatchNorm against LayerNorm at inference
(claim 10).  Each compares its contenders interleaved in one process (``bench``'s
timers); the lab runs these alone, after the training runs, so that no worker shares
the cores with them."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as AF
from ..bench import _runner, _time_calls, _time_rounds
from ..bench_model import _train_runner

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _norm_functions(backend: str, d: int) -> dict[str, callable]:
    """LayerNorm (weight and bias, as torch.nn.LayerNorm) and RMSNorm (weight) over rows
    of ``d`` values, as one backend runs them: torch eager, torch.compile, addnorm."""
    if backend == "addnorm":
        return {"layernorm": lambda x, w, b: AF.layer_norm(x, (d,), w, b),
                "rmsnorm": lambda x, w, b: AF.rms_norm(x, (d,), w)}
    plain = {"layernorm": lambda x, w, b: F.layer_norm(x, (d,), w, b),
             "rmsnorm": lambda x, w, b: F.rms_norm(x, (d,), w)}
    if backend == "torch":
        return plain
    # a fresh start per cell: dynamo caches by code object, and these lambdas share theirs
    # across cells; past its recompile limit (8) it would run them eagerly
    torch._dynamo.reset()
    return {name: torch.compile(fn, dynamic=False) for name, fn in plain.items()}


def norm_cost(config: dict) -> dict:
    """ms per call of LayerNorm and of RMSNorm on rows x hidden of ``dtype``, one
    ``backend``, forward (no grad) and forward+backward (gradients for x, w, b)."""
    rows, d = config["shape"]
    dtype = DTYPES[config["dtype"]]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g).to(dtype)
    w, b = torch.rand(d, generator=g).to(dtype) + 0.5, torch.randn(d, generator=g).to(dtype)
    out = {}
    for pass_ in ("fwd", "fwd+bwd"):
        runners = {name: _runner(fn, [x, w, b], pass_, (0, 1, 2) if name == "layernorm" else (0, 1))
                   for name, fn in _norm_functions(config["backend"], d).items()}
        ms = _time_calls(runners, config["rounds"])
        out[pass_] = {"layernorm_ms": ms["layernorm"], "rmsnorm_ms": ms["rmsnorm"],
                      "saving": 1 - ms["rmsnorm"] / ms["layernorm"]}
    return out


def train_step_cost(config: dict) -> dict:
    """ms per training step (forward, cross-entropy, backward, AdamW) of the same
    ``addnorm.Transformer`` decoder with LayerNorm and with RMSNorm."""
    from ..transformer import Transformer

    size = config["size"]
    runner = _train_runner(size, logits_of=lambda out: out[0])
    steps = {}
    for norm in ("layernorm", "rmsnorm"):
        torch.manual_seed(0)
        model = Transformer("decoder", 4096, size["d"], size["heads"], size["layers"], norm, "pre",
                            max_len=size["seq"])
        steps[norm] = runner(model)
    for step in steps.values():  # warm-up: first-call allocations, numba's dispatch
        step()
    ms = _time_rounds(steps, config["rounds"])
    return {"layernorm_ms": ms["layernorm"], "rmsnorm_ms": ms["rmsnorm"],
            "saving": 1 - ms["rmsnorm"] / ms["layernorm"]}


def resnet(width: int = 32, blocks: int = 4) -> nn.Sequential:
    """A ResNet-style CNN for 32x32 images: a conv-BN-ReLU stem, residual blocks of
    conv-BN-ReLU-conv-BN with identity shortcuts, global pool, linear."""
    from .. import BatchNorm2d

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), BatchNorm2d(width), nn.ReLU(),
                         *[Block(width) for _ in range(blocks)], nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 10))


def fold_cost(config: dict) -> dict:
    """Inference of ``resnet()`` on a batch of 32x32 images, eval mode, before and after
    ``addnorm.fold_batch_norm``: ms per batch, how many BatchNorms folded, and the largest
    output difference relative to the largest output."""
    from ..fold import fold_batch_norm

    torch.manual_seed(config["seed"])
    model = resnet(config["width"], config["blocks"])
    x = torch.randn(config["batch"], 3, 32, 32)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # running statistics that are not the identity
            model(x * 2 + 1)
    model.eval()
    folded = copy.deepcopy(model)
    count = fold_batch_norm(folded)
    with torch.no_grad():
        y, y_folded = model(x), folded(x)
        runners = {"unfolded": lambda: model(x), "folded": lambda: folded(x)}
        ms = _time_rounds(runners, config["rounds"])
    return {"unfolded_ms": ms["unfolded"], "folded_ms": ms["folded"], "folded": count,
            "batch_norms": sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
            "max_rel_diff": ((y - y_folded).abs().max() / y.abs().max()).item()}


def inference_norm_cost(config: dict) -> dict:
    """ms per call at inference (no grad) of an eval-mode BatchNorm1d (stored statistics)
    and a LayerNorm over the same (tokens, channels) activations, torch.nn's or addnorm's."""
    import addnorm

    tokens, c = config["shape"]
    dtype = DTYPES[config["dtype"]]
    lib = nn if config["backend"] == "torch" else addnorm
    bn, ln = lib.BatchNorm1d(c, dtype=dtype).eval(), lib.LayerNorm(c, dtype=dtype)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(tokens, c).to(dtype)
    with torch.no_grad():
        ms = _time_calls({"batchnorm": lambda: bn(x), "layernorm": lambda: ln(x)}, config["rounds"])
    return {"batchnorm_ms": ms["batchnorm"], "layernorm_ms": ms["layernorm"],
            "speedup": ms["layernorm"] / ms["batchnorm"]}
