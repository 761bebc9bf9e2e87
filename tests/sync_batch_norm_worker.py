"""One rank of test_distributed.py's process group (gloo, CPU): runs every case on its
part of each case's global batch and saves what it got for the test to compare.

    python sync_batch_norm_worker.py RANK WORLD INIT_FILE OUT_DIR
"""

import sys

import torch
import torch.distributed as dist
from torch import nn

import addnorm

# (name, batch sizes by rank, shape after the batch dim, dtype, layout)
CASES = [
    ("2d", (3, 5), (4, 3, 5), torch.float32, torch.contiguous_format),
    ("1d empty rank", (0, 6), (4,), torch.float32, torch.contiguous_format),
    ("1d one value a channel on a rank", (1, 3), (4,), torch.float64, torch.contiguous_format),
    ("1d (N, C, L)", (2, 3), (4, 7), torch.float64, torch.contiguous_format),
    ("channels-last", (2, 2), (4, 3, 3), torch.float32, torch.channels_last),
    ("3d", (2, 1), (4, 2, 2, 3), torch.float32, torch.contiguous_format),
    ("bfloat16", (2, 3), (4, 5), torch.bfloat16, torch.contiguous_format),
]


def global_batch(name, sizes, shape, dtype, layout):
    """The case's whole batch, its output gradient and its parameters (the same on
    every rank and in the test: a seed per case)."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    x = (torch.randn(sum(sizes), *shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(shape[0], generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(shape[0], generator=g, dtype=torch.float64).to(dtype)
    if layout is not torch.contiguous_format:
        x, dy = x.contiguous(memory_format=layout), dy.contiguous(memory_format=layout)
    return x, dy, w, b


def norm_for(x, w, b, cls=addnorm.SyncBatchNorm, momentum=0.1):
    m = cls(x.shape[1], momentum=momentum).to(x.dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    return m


def run(rank, world):
    got = {}
    for name, sizes, shape, dtype, layout in CASES:
        x, dy, w, b = global_batch(name, sizes, shape, dtype, layout)
        lo = sum(sizes[:rank])
        mine = x[lo : lo + sizes[rank]].clone(memory_format=torch.preserve_format).requires_grad_()
        norm = norm_for(x, w, b)
        y = norm(mine)
        y.backward(dy[lo : lo + sizes[rank]])
        y2 = norm(mine.detach())  # a second step: the running statistics twice
        got[name] = dict(
            y=y.detach(), dx=mine.grad, dw=norm.weight.grad, db=norm.bias.grad, y2=y2,
            running_mean=norm.running_mean, running_var=norm.running_var,
            batches=norm.num_batches_tracked, channels_last=y.is_contiguous(memory_format=torch.channels_last),
        )
        norm.eval()  # eval: the rank's own input with the running statistics, no collective
        got[name]["eval"] = norm(mine.detach())

    # momentum=None: the cumulative average over the steps
    x, dy, w, b = global_batch(*CASES[0])
    norm = norm_for(x, w, b, momentum=None)
    for step in range(3):
        norm(x[rank * 4 : rank * 4 + 4] * (step + 1))
    got["cumulative"] = dict(running_mean=norm.running_mean, running_var=norm.running_var)

    # DDP over a converted model: one SGD step of a conv + BatchNorm on each rank's half
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), addnorm.BatchNorm2d(2))
    model = addnorm.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(1)
    images, target = torch.randn(8, 3, 6, 6, generator=g), torch.randn(8, 2, 4, 4, generator=g)
    loss = (ddp(images[rank * 4 : rank * 4 + 4]) * target[rank * 4 : rank * 4 + 4]).sum()
    loss.backward()
    got["ddp"] = dict(
        kinds=[type(m).__name__ for m in model], grads={k: p.grad for k, p in model.named_parameters()},
        buffers={k: v for k, v in model.named_buffers()},
    )

    # ranks whose norms differ: an error on every rank, not a hang
    bad = addnorm.SyncBatchNorm(4 if rank == 0 else 3)
    try:
        bad(torch.randn(2, bad.num_features, 3))
        got["mismatch"] = None
    except Exception as e:  # noqa: BLE001 - the test checks its class and text
        got["mismatch"] = (type(e).__name__, isinstance(e, ValueError), str(e))
    return got


if __name__ == "__main__":
    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(run(rank, world), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
