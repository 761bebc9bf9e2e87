"""nn.Module classes: drop-ins for torch.nn, running on addnorm's kernels.

Each class that has a torch.nn twin subclasses it, so the constructor signature,
defaults, parameters, buffers, ``state_dict`` keys, ``repr`` and ``isinstance`` checks
are torch's own, and only ``forward`` changes: it calls ``addnorm.functional``.
A model's norms can be swapped both ways with ``load_state_dict(strict=True)``.

``torch.jit.script`` cannot compile addnorm's forward (Python around numba kernels), so
under TorchScript each module runs torch.nn's own forward instead: the same function on
torch's kernels, and a scripted model saves and loads without addnorm.  The modules torch
lacks run the reference's torch ops there (``ScaleNorm``, ``DyT``; the fused adds add,
then normalize).
"""

from __future__ import annotations

import math
import types

import torch
from torch import Tensor, nn
from torch.nn import init

from . import functional as AF
from . import reference
from .distributed import check_ranks_agree, sync_batch_norm, sync_group

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "AddLayerNorm",
    "AddRMSNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "GroupNorm",
    "ScaleNorm",
    "DyT",
    "weight_norm",
]


_ABSENT = object()


def _state(module: nn.Module, name: str, *default):
    """``module.<name>`` for a parameter or buffer, read where nn.Module keeps it.

    nn.Module finds parameters and buffers in its Python ``__getattr__``, after the
    ordinary lookup has failed: ~0.55 µs a read, a quarter of torch's whole LayerNorm
    kernel at a decoding shape, and a forward reads two to five.  The dicts cost ~0.05 µs.
    A name in neither (moved by a parametrization, by FSDP, or by the old
    ``torch.nn.utils.weight_norm``, which make it a property or a plain attribute) is
    read as an attribute, as nn.Module would (``default``, as getattr's)."""
    t = module._parameters.get(name, _ABSENT)
    if t is _ABSENT:
        t = module._buffers.get(name, _ABSENT)
        if t is _ABSENT:
            return getattr(module, name, *default)
    return t


_Proxy = torch.fx.Proxy


def _fx_call_module(module: nn.Module, *args):
    """Under torch.fx's symbolic tracing: the call of ``module`` as one ``call_module``
    node, as fx keeps torch.nn's modules whole.  Its default tracer traces into a module
    from any other package, where addnorm's checks and kernels cannot run on its proxies;
    with the node, fx-based tools (feature extractors, fusers, ``fold_batch_norm``) see
    the norm as torch.nn's.  A subclass that overrides forward and calls the module's
    through super() is traced into, as fx traces any module it does not keep whole."""
    tracer = args[0].tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


# TorchScript reads a call of ``torch.jit.is_scripting`` as a constant: it compiles only the
# scripted branch of a forward; in eager code the call costs ~20 ns
_scripting = torch.jit.is_scripting


def _scripted(method):
    """torch.nn's ``method`` (a function of a torch.nn class) as ``_torch_<name>``, for the
    scripted branch of the method that overrides it.  TorchScript compiles a called method
    from its source under the function's ``__name__``: torch's own would be a second
    ``forward``."""
    name = "_torch_" + method.__name__.lstrip("_")
    f = types.FunctionType(method.__code__, method.__globals__, name, method.__defaults__, method.__closure__)
    f.__qualname__ = name
    f.__annotations__ = method.__annotations__
    return f


class LayerNorm(nn.LayerNorm):
    r"""LayerNorm over the trailing ``normalized_shape`` dims (Ba et al., 2016).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    with the biased variance.  Arguments as :class:`torch.nn.LayerNorm`.
    Shape: input ``(*, *normalized_shape)``, output the same.
    """

    _torch_forward = _scripted(nn.LayerNorm.forward)

    def forward(self, input: Tensor) -> Tensor:
        if _scripting():
            return self._torch_forward(input)
        if isinstance(input, _Proxy) and type(self).forward is __class__.forward:
            return _fx_call_module(self, input)
        return AF.layer_norm(input, self.normalized_shape, _state(self, "weight"), _state(self, "bias"), self.eps)


class RMSNorm(nn.RMSNorm):
    r"""RMSNorm over the trailing ``normalized_shape`` dims (Zhang & Sennrich, 2019).

    .. math:: y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} \cdot (\gamma + \mathrm{offset})

    Arguments as :class:`torch.nn.RMSNorm` (``eps=None`` is ``finfo(float32).eps``, or
    float64's for float64 input, as torch), plus

    * ``offset``: ``offset=1.0`` stores the scale as ``1 + weight``, Gemma's convention,
      and so initializes ``weight`` to zeros; the effective scale starts at 1 either way.
    * ``casting_mode``: where a float16 / bfloat16 result is rounded, as a model family
      rounds it: "torch" (torch.nn's, the default) and "gemma" round ``xhat * (w +
      offset)`` once; "llama" rounds xhat, then multiplies by the weight (Llama, Mistral,
      Qwen, Phi-3, T5); "none" rounds every step (see :func:`addnorm.functional.rms_norm`).

    Shape: input ``(*, *normalized_shape)``, output the same.
    """

    def __init__(
        self,
        normalized_shape,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        offset: float = 0.0,
        casting_mode: str = "torch",
    ) -> None:
        AF._casting(casting_mode)  # a bad name fails here, not at the first forward
        self.offset = float(offset)  # read by reset_parameters, which __init__ calls
        self.casting_mode = casting_mode
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            init.constant_(self.weight, 1.0 - self.offset)

    _torch_forward = _scripted(nn.RMSNorm.forward)

    def forward(self, input: Tensor) -> Tensor:
        if _scripting():
            return self._torch_forward(input)
        if isinstance(input, _Proxy) and type(self).forward is __class__.forward:
            return _fx_call_module(self, input)
        return AF.rms_norm(
            input, self.normalized_shape, _state(self, "weight"), self.eps, offset=self.offset,
            casting_mode=self.casting_mode,
        )

    def __prepare_scriptable__(self) -> RMSNorm:
        """torch.jit.script asks this first: torch.nn's RMSNorm, which the scripted module
        runs, has neither an offset nor a casting mode ("gemma" without an offset rounds as
        torch: ``addnorm.patch`` gives it to a patched torch.nn.RMSNorm)."""
        if self.offset or self.casting_mode not in ("torch", "gemma"):
            raise RuntimeError(
                f"torch.jit.script runs torch.nn.RMSNorm's forward, which has no offset or casting "
                f"mode: got offset={self.offset}, casting_mode={self.casting_mode!r}; torch.jit.trace, "
                f"torch.compile and torch.export keep them"
            )
        return self

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if self.offset:
            extra += f", offset={self.offset}"
        if self.casting_mode != "torch":
            extra += f", casting_mode={self.casting_mode!r}"
        return extra


class AddLayerNorm(LayerNorm):
    """Residual add fused with LayerNorm: ``forward(x, residual) -> (norm(x + residual),
    x + residual)``, one pass over memory instead of three.  Arguments, parameters and
    state_dict as :class:`LayerNorm`."""

    def forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if _scripting():
            r = x + residual
            return self._torch_forward(r), r
        if isinstance(x, _Proxy) and type(self).forward is __class__.forward:
            return _fx_call_module(self, x, residual)
        return AF.add_layer_norm(
            x, residual, self.normalized_shape, _state(self, "weight"), _state(self, "bias"), self.eps
        )


class AddRMSNorm(RMSNorm):
    """Residual add fused with RMSNorm: ``forward(x, residual) -> (norm(x + residual),
    x + residual)``.  Arguments, parameters and state_dict as :class:`RMSNorm`."""

    def forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if _scripting():
            r = x + residual
            return self._torch_forward(r), r
        if isinstance(x, _Proxy) and type(self).forward is __class__.forward:
            return _fx_call_module(self, x, residual)
        return AF.add_rms_norm(
            x, residual, self.normalized_shape, _state(self, "weight"), self.eps, offset=self.offset,
            casting_mode=self.casting_mode,
        )


class _BatchNorm:
    """forward for BatchNorm1d/2d/3d, torch's semantics: running statistics tracked in
    training with ``momentum`` (``None``: the cumulative average); eval uses them."""

    _torch_forward = _scripted(nn.modules.batchnorm._BatchNorm.forward)

    def forward(self, input: Tensor) -> Tensor:
        if _scripting():
            return self._torch_forward(input)
        if isinstance(input, _Proxy) and type(self).forward is __class__.forward:
            return _fx_call_module(self, input)
        self._check_input_dim(input)
        running_mean, running_var = _state(self, "running_mean"), _state(self, "running_var")
        batches = _state(self, "num_batches_tracked")
        tracking = self.training and self.track_running_stats and batches is not None
        if self.momentum is None:  # cumulative moving average over the batches seen
            factor = 1.0 / float(batches + 1) if tracking else 0.0
        else:
            factor = self.momentum
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        keep = not self.training or self.track_running_stats
        y = self._batch_norm(
            input,
            running_mean if keep else None,
            running_var if keep else None,
            _state(self, "weight"),
            _state(self, "bias"),
            use_batch_stats,
            factor,
        )
        if tracking:  # only once the batch went through, so a bad input changes nothing
            batches.add_(1)
        return y

    def _batch_norm(self, input, running_mean, running_var, weight, bias, use_batch_stats, factor):
        return AF.batch_norm(input, running_mean, running_var, weight, bias, use_batch_stats, factor, self.eps)


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    r"""BatchNorm over a (N, C) or (N, C, L) input (Ioffe & Szegedy, 2015).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    per channel, statistics over (N, L).  Arguments as :class:`torch.nn.BatchNorm1d`.
    """


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """BatchNorm over a (N, C, H, W) input, contiguous or channels-last; as
    :class:`BatchNorm1d` with statistics over (N, H, W)."""


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """BatchNorm over a (N, C, D, H, W) input; as :class:`BatchNorm1d` with statistics
    over (N, D, H, W)."""


class SyncBatchNorm(_BatchNorm, nn.modules.batchnorm._BatchNorm):
    r"""BatchNorm whose training statistics cover the batch split over a torch.distributed
    process group: on CPU (gloo) as on GPU (nccl), where torch.nn.SyncBatchNorm runs on
    GPUs only.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    per channel, statistics over (N, *spatial) of every rank's input together: each rank
    passes its own (N_rank, C, *spatial), N_rank >= 0 and different from rank to rank if
    need be, and every rank gets the same statistics and running statistics.  In eval
    mode, outside a process group (torch.distributed not initialised, or one process)
    it is BatchNorm.  Arguments as :class:`torch.nn.SyncBatchNorm`; ``process_group``
    None is the default group.  The backward all-reduces two per-channel sums; the
    weight's and bias's gradients are the rank's own, for DDP to average.

    It is a ``torch.nn.modules.batchnorm._BatchNorm``, as torch's is, but no subclass of
    ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses a CPU model that holds
    one ("SyncBatchNorm layers only work with GPU modules").
    """

    _checked = None  # (id of the group, channels, dtype) the ranks were found to agree on

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
        )
        self.process_group = process_group

    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def _check_input_dim(self, input: Tensor) -> None:
        nn.SyncBatchNorm._check_input_dim(self, input)  # torch.nn.SyncBatchNorm's checks, its errors
        self._check_non_zero_input_channels(input)

    def _batch_norm(self, input, running_mean, running_var, weight, bias, use_batch_stats, factor):
        group = sync_group(self.process_group) if use_batch_stats and self.training else None
        if group is None:
            return super()._batch_norm(input, running_mean, running_var, weight, bias, use_batch_stats, factor)
        seen = (id(group), input.shape[1], input.dtype)
        if self._checked != seen:
            check_ranks_agree(input, group)
            self._checked = seen
        return sync_batch_norm(input, running_mean, running_var, weight, bias, factor, self.eps, group)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """``module`` with each BatchNorm1d/2d/3d (torch.nn's, addnorm's, or a SyncBatchNorm)
        in it replaced by an addnorm.SyncBatchNorm over ``process_group`` that holds the
        same parameters and buffers (the objects themselves) and training mode; a
        BatchNorm given as ``module`` comes back as a new SyncBatchNorm."""
        converted = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            converted = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                bias=module.bias is not None,
            )
            if module.affine:
                with torch.no_grad():
                    converted.weight, converted.bias = module.weight, module.bias
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted


class _InstanceNorm:
    """forward for InstanceNorm1d/2d/3d with torch's semantics, unbatched input included:
    torch.nn's forward (its checks), which calls ``_apply_instance_norm``."""

    _torch_forward = _scripted(nn.modules.instancenorm._InstanceNorm.forward)

    def forward(self, input: Tensor) -> Tensor:
        if _scripting():
            return self._torch_forward(input)
        if isinstance(input, _Proxy) and type(self).forward is __class__.forward:
            return _fx_call_module(self, input)
        return self._torch_forward(input)

    _torch_apply_instance_norm = _scripted(nn.modules.instancenorm._InstanceNorm._apply_instance_norm)

    def _apply_instance_norm(self, input: Tensor) -> Tensor:  # torch.nn's forward calls it
        if _scripting():
            return self._torch_apply_instance_norm(input)
        return AF.instance_norm(
            input,
            _state(self, "running_mean"),
            _state(self, "running_var"),
            _state(self, "weight"),
            _state(self, "bias"),
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    r"""InstanceNorm over a (N, C, L) or (C, L) input (Ulyanov et al., 2016).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    statistics per (sample, channel) over L.  Arguments as :class:`torch.nn.InstanceNorm1d`.
    """


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    """InstanceNorm over a (N, C, H, W) or (C, H, W) input; statistics over (H, W)."""


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    """InstanceNorm over a (N, C, D, H, W) or (C, D, H, W) input; statistics over (D, H, W)."""


class GroupNorm(nn.GroupNorm):
    r"""GroupNorm (Wu & He, 2018): channels split into ``num_groups`` groups.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    statistics per (sample, group), affine per channel.  Arguments as
    :class:`torch.nn.GroupNorm`.  Shape: input ``(N, C, *)``, output the same.
    """

    _torch_forward = _scripted(nn.GroupNorm.forward)

    def forward(self, input: Tensor) -> Tensor:
        if _scripting():
            return self._torch_forward(input)
        if isinstance(input, _Proxy) and type(self).forward is __class__.forward:
            return _fx_call_module(self, input)
        return AF.group_norm(input, self.num_groups, _state(self, "weight"), _state(self, "bias"), self.eps)


class ScaleNorm(nn.Module):
    r"""ScaleNorm (Nguyen & Salazar, 2019): one learned scalar instead of a vector.

    .. math:: y = g \cdot \frac{x}{\max(\lVert x \rVert_2, \epsilon)}

    over the last dim.  Args: ``dim`` the size of that dim (``g`` starts at
    :math:`\sqrt{dim}`, so y starts with unit RMS), ``eps``.  Parameter ``weight``
    of shape (1,).  Shape: input ``(*, dim)``, output the same.
    """

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise AF.ArgumentError(f"dim must be a positive int, got {dim!r}")
        if not eps > 0:
            raise AF.ArgumentError(f"eps must be > 0, got {eps}")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.constant_(self.weight, math.sqrt(self.dim))

    def forward(self, input: Tensor) -> Tensor:
        if _scripting():
            return reference.scale_norm_forward(input, self.weight, self.eps)[0]
        if isinstance(input, _Proxy) and type(self).forward is __class__.forward:
            return _fx_call_module(self, input)
        return AF.scale_norm(input, _state(self, "weight"), self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class DyT(nn.Module):
    r"""Dynamic Tanh (Zhu et al., 2025): a norm-free replacement for LayerNorm.

    .. math:: y = \gamma \cdot \tanh(\alpha x) + \beta

    with a learned scalar :math:`\alpha` (starting at ``alpha_init``) and per-element
    :math:`\gamma` (ones), :math:`\beta` (zeros) over the trailing ``normalized_shape``
    dims.  Parameters ``alpha`` (1,), ``weight`` and ``bias`` (normalized_shape).
    """

    def __init__(self, normalized_shape, alpha_init: float = 0.5, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        if not all(isinstance(s, int) and s > 0 for s in normalized_shape):
            raise AF.ArgumentError(
                f"normalized_shape must be positive ints, got {tuple(normalized_shape)!r}"
            )
        self.normalized_shape = tuple(normalized_shape)
        self.alpha_init = alpha_init
        factory = {"device": device, "dtype": dtype}
        self.alpha = nn.Parameter(torch.empty(1, **factory))
        self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
        self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.constant_(self.alpha, self.alpha_init)
        init.ones_(self.weight)
        init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if _scripting():
            return reference.dyt_forward(input, self.alpha, self.weight, self.bias)
        if isinstance(input, _Proxy) and type(self).forward is __class__.forward:
            return _fx_call_module(self, input)
        return AF.dyt(input, _state(self, "alpha"), _state(self, "weight"), _state(self, "bias"))

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, alpha_init={self.alpha_init}"


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    r"""Weight normalization (Salimans & Kingma, 2016): ``w = g * v / ||v||``.

    Reparametrizes ``module.<name>`` into a magnitude ``original0`` (g) and a direction
    ``original1`` (v), norms taken over every dim but ``dim`` (``None``: the whole
    tensor).  This is :func:`torch.nn.utils.parametrizations.weight_norm` itself, so
    state dicts and ``remove_parametrizations`` work as with torch.
    """
    return nn.utils.parametrizations.weight_norm(module, name, dim)
