"""The lab's text: the standard library's ``pydoc_data.topics`` (Python's own help pages,
~465K characters), as a character-level language-modelling task with a held-out split."""

from __future__ import annotations

import torch
from torch import Tensor


def corpus() -> str:
    """Every pydoc topic, in sorted order: the same text on every machine with this Python."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


class CharData:
    """``text`` as character ids (vocabulary: its sorted distinct characters); the last
    ``1 - train_fraction`` of it is the validation split."""

    def __init__(self, text: str | None = None, train_fraction: float = 0.9) -> None:
        text = corpus() if text is None else text
        self.chars = sorted(set(text))
        index = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        cut = int(len(ids) * train_fraction)
        self.splits = {"train": ids[:cut], "val": ids[cut:]}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unigram_loss(self, split: str = "val") -> float:
        """Cross-entropy (nats per character) on ``split`` of predicting each character by
        its training-split frequency alone: the loss of a model that learned nothing about
        context, the line a trained language model must get below."""
        counts = torch.bincount(self.splits["train"], minlength=self.vocab_size).double() + 1.0  # add-one
        logp = (counts / counts.sum()).log()
        return float(-logp[self.splits[split]].mean())

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(inputs, targets) of shape (batch_size, seq_len): random windows of ``split``,
        targets shifted by one character."""
        ids = self.splits[split]
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
        windows = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]
