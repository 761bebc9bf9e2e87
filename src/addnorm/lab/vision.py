"""A small CNN trained on scikit-learn's digits (1,797 real 8x8 handwritten digits,
shipped inside the package): how the norm behaves as the batch shrinks."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

NORMS = ("batchnorm", "layernorm", "groupnorm")


@lru_cache(maxsize=1)
def digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train": (images, labels), "test": ...}: a fixed 75/25 split, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(0.75 * len(labels))
    return {"train": (images[order[:cut]], labels[order[:cut]]), "test": (images[order[cut:]], labels[order[cut:]])}


def _norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm; LayerNorm over (C, H, W) as GroupNorm with one group (Wu & He 2018's
    "LN" for CNNs); GroupNorm with 4 channels per group."""
    from .. import BatchNorm2d, GroupNorm

    if kind == "batchnorm":
        return BatchNorm2d(channels)
    return GroupNorm(1 if kind == "layernorm" else channels // 4, channels)


def cnn(norm: str, width: int = 32) -> nn.Sequential:
    """conv-norm-ReLU x3 (the last with stride 2), global average pool, linear."""
    layers, c = [], 1
    for out, stride in ((width, 1), (width, 1), (2 * width, 2)):
        layers += [nn.Conv2d(c, out, 3, stride, 1, bias=False), _norm(norm, out), nn.ReLU()]
        c = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def train_cnn(config: dict) -> dict:
    """Train ``cnn(norm, width)`` for ``epochs`` with SGD (momentum 0.9) at batch size
    ``batch``, learning rate ``lr`` scaled linearly with the batch (``lr * batch / 32``,
    Goyal et al. 2017), so every batch size sees the same data the same number of times.
    Returns the test error in eval mode (BatchNorm with its running statistics) and the
    final training loss."""
    data = digits()
    torch.manual_seed(config["seed"])
    model = cnn(config["norm"], config["width"])
    batch = config["batch"]
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"] * batch / 32, momentum=0.9)
    images, labels = data["train"]
    g = torch.Generator().manual_seed(config["seed"])
    loss = torch.tensor(float("nan"))
    model.train()
    for _ in range(config["epochs"]):
        order = torch.randperm(len(labels), generator=g)
        for i in range(0, len(order) - batch + 1, batch):  # drop the ragged last batch
            idx = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    test_images, test_labels = data["test"]
    with torch.no_grad():
        wrong = (model(test_images).argmax(1) != test_labels).sum().item()
    return {"test_error": wrong / len(test_labels), "final_loss": loss.item()}
