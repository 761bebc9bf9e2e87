"""A two-minute tour: addnorm modules are torch.nn modules with other kernels.

Builds a small pre-LN Transformer block with the fused add+RMSNorm, trains it a few
steps, swaps a torch.nn.LayerNorm's weights in and out, and shows the backends.
"""

import torch
from torch import nn

import addnorm
import addnorm.functional as AF

torch.manual_seed(0)

# 1. A drop-in: same constructor, state_dict and repr as torch.nn, same outputs.
ours, theirs = addnorm.LayerNorm(64), nn.LayerNorm(64)
theirs.load_state_dict(ours.state_dict(), strict=True)
x = torch.randn(8, 16, 64)
print(ours)
print("max |addnorm - torch.nn| LayerNorm:", (ours(x) - theirs(x)).abs().max().item())


# 2. The fused residual add: one pass returns the normalized sum and the sum itself.
class Block(nn.Module):
    """Pre-LN: h = x + attn(norm(x)); out = h + mlp(norm(h)), adds fused into norms."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1 = addnorm.RMSNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = addnorm.AddRMSNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        h, residual = self.norm2(a, x)  # h = norm(a + x), residual = a + x
        return residual + self.mlp(h)


block = Block(64, 4)
opt = torch.optim.AdamW(block.parameters(), lr=1e-3)
target = torch.randn(8, 16, 64)
for step in range(20):
    loss = (block(x) - target).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {loss.item():.4f}")

# 3. Functional API with torch.nn.functional's argument order, and the backends.
y, r = AF.add_layer_norm(x, torch.ones_like(x), (64,))
print("add_layer_norm ->", tuple(y.shape), "and the residual sum", tuple(r.shape))
print("backends:", addnorm.backends())
with addnorm.backend("torch"):
    print("forced torch backend, RMSNorm mean square:", AF.rms_norm(x, (64,)).pow(2).mean().item())
