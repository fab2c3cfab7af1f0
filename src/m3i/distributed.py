"""The little of torch.distributed m3i needs: rank facts, collectives with gradient, global
batch norm and the DDP wrap of the training loop.

Scale-out contract: with ``W`` ranks of ``B`` samples each, every estimator sees the global
batch of ``W·B`` samples, rank ``r``'s rows at offset ``r·B``, and the gradients that DDP
averages over ranks equal the gradient of the loss one process would compute on that global
batch (provided each rank holds the same number of anchors of a term). Everything here is a
no-op with one process, and works with the gloo (CPU) and nccl (GPU) backends.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist() and world_size() > 1:
        dist.barrier()


_OBJECTIVE_GROUP: tuple[object, object] | None = None


def objective_group():
    """Every rank, as a process group of its own for the collectives that run inside backward
    (the all-gather's and global batch norm's). DDP launches its gradient all-reduces on the
    default group as its buckets fill, so their order relative to ours can differ between ranks
    whose graphs differ (a term with no sample on one rank); separate groups never mismatch.
    Created on first use: callers are collectives, so every rank gets here at the same point."""
    global _OBJECTIVE_GROUP
    world = dist.group.WORLD
    if _OBJECTIVE_GROUP is None or _OBJECTIVE_GROUP[0] is not world:
        _OBJECTIVE_GROUP = (world, dist.new_group(list(range(world_size()))))
    return _OBJECTIVE_GROUP[1]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x, group=group)
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # every rank's loss may depend on our rows: their gradients add up
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        r, b = ctx.rank, ctx.rows
        return grad[r * b:(r + 1) * b], None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        y = x.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B, ...) from every rank along dim 0 (rank r's rows at r·B; every
    rank passes the same B), gradient flowing back to each rank's own rows, so contrastive
    candidates span the global batch."""
    if not is_dist() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x.contiguous(), objective_group())


def all_reduce_with_grad(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks; the gradient of every rank's use of the sum flows back to each ``x``."""
    if not is_dist() or world_size() == 1:
        return x
    return _AllReduceSum.apply(x, objective_group())


def gather(x: Tensor) -> Tensor:
    """All-gather without gradient (masks, labels)."""
    if not is_dist() or world_size() == 1:
        return x
    if x.dtype == torch.bool:  # as bytes, compared back: a gathered bool is no bool mask to compiled CPU code
        return gather(x.to(torch.uint8)) != 0
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def sum_over_ranks(values: list[int], device: torch.device | str = "cpu") -> list[int]:
    """Integers (counts) summed over every rank: one all-reduce on ``device`` (the backend's)."""
    if not is_dist() or world_size() == 1:
        return [int(v) for v in values]
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_ranks(flag: Tensor) -> Tensor:
    """Whether the 0-d bool ``flag`` holds on every rank, as a device tensor: no wait for the
    device (an all-reduce queued on its stream)."""
    if not is_dist() or world_size() == 1:
        return flag
    x = flag.to(torch.float32).reshape(1)  # gloo reduces no bools
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x[0] > 0


@contextmanager
def gathered(objective: nn.Module):
    """Work with ``objective`` outside its forward pass (the monitors' embeddings): the parameters
    its root holds (stems, norms, heads) gathered whole meanwhile, as its forward pass gathers them;
    each sharded block gathers its own when called. Not sharded: nothing to do. Every rank must
    enter it."""
    if not hasattr(objective, "unshard"):  # FSDP2 makes the sharded module an FSDPModule
        yield objective
        return
    objective.unshard()
    try:
        yield objective
    finally:
        objective.reshard()
