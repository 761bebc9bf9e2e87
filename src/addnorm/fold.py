"""Folding BatchNorm into the layer that feeds it, for inference.

In eval mode a BatchNorm is an affine map per channel with stored statistics,
``y = (z - running_mean) / sqrt(running_var + eps) * w + b``; when ``z`` is the output of
a convolution or a linear layer, that map folds into the layer's own weight and bias
(torch's ``torch.nn.utils.fusion`` computes the folded parameters), and the BatchNorm
costs nothing.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .functional import ArgumentError

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fold_batch_norm(model: nn.Module, example_inputs: tuple | None = None, verbose: bool = False) -> int:
    """Fold, in place, each eval-mode BatchNorm into the Conv1d/2d/3d or Linear feeding it
    (its weight and bias absorb the BatchNorm's affine map; the BatchNorm becomes
    ``nn.Identity``); returns how many were folded.  Outputs equal the unfolded model's
    within float32 rounding.

    The pairs are found by tracing the model with ``torch.fx``; a model that does not
    trace is searched for consecutive children of its ``nn.Sequential`` containers.  A
    pair folds only where it is safe: the layer's output goes to the BatchNorm alone,
    each module is called once, the BatchNorm uses stored statistics, and, for a Linear,
    ``example_inputs`` (a tuple of the model's inputs) show by shape propagation that the
    BatchNorm sees 2-D ``(batch, features)`` input (a Linear acts on the last dim, a
    BatchNorm on dim 1: they agree only there).  Every BatchNorm left unfolded is listed,
    with the reason, under ``verbose=True``.

    Raises ``ArgumentError`` if the model is in training mode, where a BatchNorm
    normalizes with each batch's own statistics and nothing can be folded.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if model.training:
        raise ArgumentError("fold_batch_norm needs model.eval(): in training mode a BatchNorm uses "
                            "each batch's statistics, which no weight can hold")
    modules = dict(model.named_modules())
    norms = [name for name, m in modules.items() if isinstance(m, _BatchNorm)]
    pairs, why = _traced_pairs(model, modules, example_inputs)
    if pairs is None:
        pairs, why = _sequential_pairs(model, modules, example_inputs is not None)
    folded: list[str] = []
    for layer_name, norm_name in pairs:
        layer, norm = modules[layer_name], modules[norm_name]
        reason = _unfoldable(norm)
        if reason:
            why[norm_name] = reason
            continue
        fused = fuse_conv_bn_eval(layer, norm) if isinstance(layer, _CONVS) else fuse_linear_bn_eval(layer, norm)
        model.set_submodule(layer_name, fused)
        model.set_submodule(norm_name, nn.Identity())
        folded.append(norm_name)
    if verbose:
        print(f"fold_batch_norm: folded {len(folded)} of {len(norms)} BatchNorm layers")
        for name in norms:
            if name not in folded:
                print(f"  left {name}: {why.get(name, 'not fed by a Conv1d/2d/3d or Linear')}")
    return len(folded)


def _unfoldable(norm: _BatchNorm) -> str | None:
    if not norm.track_running_stats or norm.running_mean is None:
        return "no stored statistics (track_running_stats=False): it normalizes each batch"
    return None


def _traced_pairs(model, modules, example_inputs):
    """(layer, norm) name pairs from the fx graph, and reasons for the norms left out;
    (None, {}) where the model does not trace."""
    try:
        graph_module = torch.fx.symbolic_trace(model)  # addnorm's norms stay whole, as torch.nn's
    except Exception:  # control flow on values, unsupported ops: the Sequential fallback
        return None, {}
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        ShapeProp(graph_module).propagate(*example_inputs)
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs, why = [], {}
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        source = node.args[0] if node.args else None
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and isinstance(modules[source.target], (*_CONVS, nn.Linear))):
            why[node.target] = "not fed by a Conv1d/2d/3d or Linear"
            continue
        if len(source.users) != 1:
            why[node.target] = f"{source.target}'s output goes elsewhere too"
        elif calls[source.target] > 1 or calls[node.target] > 1:
            why[node.target] = f"{source.target} or the BatchNorm is called more than once"
        elif isinstance(modules[source.target], nn.Linear) and not _two_dimensional(node):
            why[node.target] = ("fed by a Linear: pass example_inputs to show it sees (batch, features)"
                                if example_inputs is None else "fed by a Linear, but its input is not 2-D")
        else:
            pairs.append((source.target, node.target))
    return pairs, why


def _two_dimensional(node) -> bool:
    meta = node.args[0].meta.get("tensor_meta")
    return meta is not None and len(meta.shape) == 2


def _sequential_pairs(model, modules, have_inputs):
    """Consecutive (layer, BatchNorm) children of each nn.Sequential: there the layer's
    output goes to the next child alone.  A Linear's input rank is unknown here."""
    pairs, why = [], {}
    for name, container in modules.items():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.named_children())
        for (first_name, first), (second_name, second) in zip(children, children[1:]):
            if not isinstance(second, _BatchNorm):
                continue
            full = lambda child: f"{name}.{child}" if name else child  # noqa: E731
            if isinstance(first, _CONVS):
                pairs.append((full(first_name), full(second_name)))
            elif isinstance(first, nn.Linear):
                why[full(second_name)] = ("fed by a Linear in a model that does not trace with torch.fx: "
                                          "its input rank cannot be checked" + (" (example_inputs unused)"
                                                                                if have_inputs else ""))
    return pairs, why


__all__ = ["fold_batch_norm"]
