"""BatchNorm across processes: the statistics of a batch split over a torch.distributed
process group, on CPU (gloo) as on GPU (nccl).  ``addnorm.SyncBatchNorm`` calls it.

torch.nn.SyncBatchNorm runs only on GPUs: the ops it is built of (``batch_norm_stats``,
``batch_norm_gather_stats_with_counts``, ...) have no CPU kernels, and it refuses a CPU
tensor.  Here the math is torch ops and addnorm's BatchNorm:

forward   each rank's per-channel count, mean and sum of squared deviations (M2, in the
          accumulation dtype), gathered in float64 and merged in rank order (Chan et al.):
          every rank holds the same statistics, bit for bit, whatever its batch size (an
          empty batch included), and so the same running statistics; the output is
          BatchNorm with those statistics (``functional.batch_norm`` in eval mode).
backward  each rank's per-channel sums of dy and dy * (x - mean), all-reduced in
          float64, give dx; the weight's and bias's gradients are the rank's own, as
          torch's are (DDP averages them across ranks).

One collective each way, as torch's.  A module's first call on a group also gathers
each rank's channel count and dtype, so that ranks built differently get an error that
says so rather than a hang in a collective of mismatched sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import functional as AF
from .reference import acc_dtype, channel_dims, channel_view, update_running_stats

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def sync_group(process_group):
    """The group a SyncBatchNorm in training synchronises over (``process_group``, or the
    default one), or None where there is nothing to synchronise: torch.distributed not
    initialised, or a group of one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def check_ranks_agree(input: Tensor, group) -> None:
    """Raise on every rank (no rank left waiting in a collective) where the ranks of
    ``group`` normalise different channel counts or dtypes."""
    dtype = _DTYPES.index(input.dtype) if input.dtype in _DTYPES else -1
    mine = torch.tensor([input.shape[1], dtype], dtype=torch.int64, device=input.device)
    ranks = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(ranks, mine, group)
    seen = [tuple(r.tolist()) for r in ranks]
    if len(set(seen)) > 1:
        described = ", ".join(
            f"rank {i}: {c} channels, {_DTYPES[d] if d >= 0 else 'another dtype'}" for i, (c, d) in enumerate(seen)
        )
        raise AF.ArgumentError(
            f"SyncBatchNorm: every rank of the process group must pass input of the same channel "
            f"count and dtype, got {described}"
        )


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    group,
) -> Tensor:
    """BatchNorm in training over the batch that ``group``'s ranks hold between them,
    updating the running statistics (where given) with ``momentum``; each rank passes
    its own part, (N_rank, C, *spatial), N_rank >= 0."""
    AF._check_input(input)  # a bad input raises here, before any collective
    AF._check_per_channel(input, input.shape[1], running_mean, running_var, weight, bias)
    return _SyncBatchNorm.apply(input, weight, bias, running_mean, running_var, eps, momentum, group)


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, group):
        c, acc = input.shape[1], acc_dtype(input.dtype)
        count = input.numel() // c if c else 0
        mine = torch.zeros(1 + 2 * c, dtype=torch.float64, device=input.device)
        mine[0] = count
        if count:
            var, mean = torch.var_mean(input.to(acc), channel_dims(input), correction=0)
            mine[1 : 1 + c] = mean
            mine[1 + c :] = var.double() * count
        ranks = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(ranks, mine, group)
        every = torch.stack(ranks)  # (world, 1 + 2C), in rank order on every rank
        counts, means, m2s = every[:, :1], every[:, 1 : 1 + c], every[:, 1 + c :]
        n = int(counts.sum().item())
        if n <= 1:
            raise AF.ArgumentError(
                f"Expected more than 1 value per channel when training, got {n} across the process group "
                f"(input size {tuple(input.shape)} here)"
            )
        mean = (counts * means).sum(0) / n  # a rank of no values adds zeros
        var = (m2s + counts * (means - mean) ** 2).sum(0) / n
        mean, var = mean.to(acc), var.to(acc)
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, n, momentum)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.group, ctx.n = group, n
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # the output: BatchNorm with these statistics (addnorm's, or torch's kernel)
        return AF.batch_norm(input, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        input, weight, mean, invstd = ctx.saved_tensors
        acc, dims = mean.dtype, channel_dims(input)
        dy = grad.to(acc)
        xmu = input.to(acc) - channel_view(mean, input.ndim)
        sum_dy, sum_dy_xmu = dy.sum(dims), (dy * xmu).sum(dims)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_dy, sum_dy_xmu]).double()
            dist.all_reduce(both, dist.ReduceOp.SUM, ctx.group)
            mean_dy, mean_dy_xmu = (both / ctx.n).to(acc).chunk(2)
            scale = invstd if weight is None else invstd * weight.to(acc)
            # dx = (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))) * invstd * w,
            # the means over every rank's values
            per_channel = (channel_view(v, input.ndim) for v in (mean_dy, invstd * invstd * mean_dy_xmu, scale))
            centre, slope, scale = per_channel
            grad_input = ((dy - centre - xmu * slope) * scale).to(input.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None
