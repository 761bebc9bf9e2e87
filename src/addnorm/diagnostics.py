"""Per-layer, per-step statistics of any model: gradient norm, activation RMS and
update-to-weight ratio, the quantities that show why a placement trains or diverges
(the gradient norm by layer at initialisation is Xiong et al. 2020's picture of Post-LN).

    diag = addnorm.diagnostics.Diagnostics(model)
    for step in range(steps):
        loss = model(idx, targets)[1]          # forward: activation RMS per layer
        loss.backward()
        diag.record_gradients()                # gradient norm per layer
        with diag.update():                    # update-to-weight ratio per layer
            optimizer.step()
        optimizer.zero_grad()
        diag.end_step()
    diag.plot("grad_norm", "grad_norm.png")    # a line per step, layers along x

``records`` is a list of dicts ``{"step", "layer", "index", "act_rms", "grad_norm",
"update_ratio"}`` (a value is None where it was not recorded that step), ready for JSON.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .residual import Residual

METRICS = ("act_rms", "grad_norm", "update_ratio")


def default_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers statistics are kept for: each ``Residual`` (one sublayer with its norm)
    where the model has them, else every module that holds parameters of its own.  (In
    a ``resi-dual`` Transformer, whose stack calls the sublayers itself, pass
    ``layers`` of the sublayers.)"""
    residuals = [(n, m) for n, m in model.named_modules() if isinstance(m, Residual)]
    if residuals:
        return residuals
    return [(n or type(m).__name__, m) for n, m in model.named_modules()
            if any(True for _ in m.parameters(recurse=False))]


def _output(module: nn.Module, out: Any) -> Tensor | None:
    """The tensor a layer's output stands for: a ``Residual`` inside a stack returns the
    stream as ``(x, pending)`` with its add deferred (see ``Residual.step``): x + pending."""
    if isinstance(module, Residual) and isinstance(out, tuple):
        x, pending = out
        return x if pending is None else x + pending
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((t for t in out if isinstance(t, Tensor)), None)
    return None


def _norm(tensors: Iterable[Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


class Diagnostics:
    """Hooks on ``layers`` of ``model`` (``default_layers`` where not given, or a list of
    (name, module)) that record, for every step, each layer's output RMS (the last forward
    of the step), its parameters' gradient norm (``record_gradients``) and the norm of an
    optimizer step's change relative to the parameters' norm (``with update():``).
    ``end_step()`` closes a step; ``remove()`` takes the hooks off.  While ``enabled`` is
    False the hooks record nothing and cost nothing (steps not worth keeping)."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Module]] | None = None) -> None:
        self.layers = layers if layers is not None else default_layers(model)
        self.records: list[dict] = []
        self.step = 0
        self._current: dict[str, dict] = {}
        self.enabled = True
        self._hooks = [module.register_forward_hook(self._activation_hook(name)) for name, module in self.layers]

    def _entry(self, name: str) -> dict:
        return self._current.setdefault(name, dict.fromkeys(METRICS))

    def _activation_hook(self, name: str):
        def hook(module, _inputs, output):
            if not self.enabled:
                return
            t = _output(module, output)
            if t is not None and t.numel():
                with torch.no_grad():
                    self._entry(name)["act_rms"] = float(t.detach().float().pow(2).mean().sqrt())
        return hook

    def record_gradients(self) -> None:
        """Each layer's gradient norm, sqrt(sum of its parameters' squared gradients)."""
        for name, module in self.layers:
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            if grads:
                self._entry(name)["grad_norm"] = _norm(grads)

    @contextlib.contextmanager
    def update(self) -> Iterator[None]:
        """Around an optimizer step: each layer's ||W_after - W_before|| / ||W_before||."""
        before = {name: [p.detach().clone() for p in m.parameters()] for name, m in self.layers}
        yield
        for name, module in self.layers:
            old = before[name]
            if not old:
                continue
            base = _norm(old)
            change = _norm(p.detach() - o for p, o in zip(module.parameters(), old))
            self._entry(name)["update_ratio"] = change / base if base else math.inf

    def end_step(self) -> None:
        """File this step's values in ``records`` (a row per layer that recorded any)."""
        for index, (name, _) in enumerate(self.layers):
            values = self._current.get(name)
            if values is not None:
                self.records.append({"step": self.step, "layer": name, "index": index, **values})
        self._current = {}
        self.step += 1

    def discard(self) -> None:
        """Drop what this step recorded, without filing it (a step not worth keeping)."""
        self._current = {}

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def by_layer(self, metric: str, step: int) -> list[float | None]:
        """``metric`` of every layer, in layer order, at ``step``."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
        values: list[float | None] = [None] * len(self.layers)
        for r in self.records:
            if r["step"] == step:
                values[r["index"]] = r[metric]
        return values

    def plot(self, metric: str, path: str | None = None, steps: Iterable[int] | None = None, ax=None):
        """``metric`` against layer depth, a line per step (default: first, middle, last),
        on a log scale; saved to ``path`` (PNG, SVG, ...) where given.  Returns the axes."""
        return plot_by_layer({"": self}, metric, path, steps, ax)


def plot_by_layer(runs: dict[str, Diagnostics], metric: str, path: str | None = None,
                  steps: Iterable[int] | None = None, ax=None):
    """``metric`` against layer depth for several runs (a label each) on one axes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    for label, diag in runs.items():
        recorded = sorted({r["step"] for r in diag.records})
        chosen = list(steps) if steps is not None else sorted({recorded[0], recorded[len(recorded) // 2],
                                                              recorded[-1]}) if recorded else []
        for step in chosen:
            values = diag.by_layer(metric, step)
            xs = [i + 1 for i, v in enumerate(values) if v is not None]
            ys = [v for v in values if v is not None]
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{label} step {step}".strip())
    ax.set_xlabel("layer (sublayer, input to output)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    if path is not None:
        ax.figure.savefig(path, dpi=120)
    return ax


__all__ = ["Diagnostics", "default_layers", "plot_by_layer", "METRICS"]
