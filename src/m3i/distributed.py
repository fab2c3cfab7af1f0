"""The little of torch.distributed m3i needs: rank facts, collectives with gradient, global
batch norm and the DDP wrap of the training loop.

Scale-out contract: with ``W`` ranks of ``B`` samples each, every estimator sees the global
batch of ``W·B`` samples, rank ``r``'s rows at offset ``r·B``, and the gradients that DDP
averages over ranks equal the gradient of the loss one process would compute on that global
batch (provided each rank holds the same number of anchors of a term). Everything here is a
no-op with one process, and works with the gloo (CPU) and nccl (GPU) backends.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


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
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` is finite on every rank: ranks must take, or skip, a step together (a rank
    that skipped backward would leave the others waiting in their gradient all-reduce)."""
    ok = torch.isfinite(x.detach()).all().float().reshape(1)
    if is_dist() and world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def all_ranks(flag: Tensor) -> Tensor:
    """Whether the 0-d bool ``flag`` holds on every rank, as a device tensor: no wait for the
    device (an all-reduce queued on its stream), unlike :func:`all_finite`."""
    if not is_dist() or world_size() == 1:
        return flag
    x = flag.to(torch.float32).reshape(1)  # gloo reduces no bools
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x[0] > 0


class GlobalBatchNorm(_BatchNorm):
    """Batch norm over the global batch: in training, the mean and variance span every rank's
    rows (two all-reduces, with gradient), so W ranks of B samples normalise exactly as one
    process on W·B; with one process, or in eval, it is plain batch norm. Same parameters and
    buffers as ``nn.BatchNorm1d/2d/3d`` (checkpoints do not change); any device the backend
    serves, unlike ``nn.SyncBatchNorm`` (GPU only)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of shape (B, C, ...), got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_dist() and world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        local = xf.new_tensor([xf.numel() // xf.shape[1]])
        # two passes (mean, then centred squares): the numbers one process gets on the whole batch
        s = all_reduce_with_grad(torch.cat([xf.sum(dims), local]))
        n, mean = s[-1], s[:-1] / s[-1]
        if float(n.detach()) < 2:
            raise ValueError(f"batch norm needs more than 1 value per channel over the global batch, got {int(n)}")
        centred = xf - mean.view(shape)
        var = all_reduce_with_grad(centred.pow(2).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / (n - 1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y.to(x.dtype)


def global_batch_norm(module: nn.Module) -> nn.Module:
    """Replace, in place, every batch norm under ``module`` by a :class:`GlobalBatchNorm` that
    holds the very same parameter and buffer tensors (an optimiser built before keeps working)."""
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            for key in ("weight", "bias"):
                setattr(new, key, getattr(child, key))
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(new, key, getattr(child, key))
            new.train(child.training)
            setattr(module, name, new)
        else:
            global_batch_norm(child)
    return module


def wrap(objective: nn.Module, device: torch.device) -> nn.Module:
    """The module the training loop calls: ``objective`` itself without a process group; under
    ``torchrun`` (even with one process) its batch norms made global and DDP around it. Parameters with ``requires_grad=False`` (EMA
    teacher, frozen towers) take no part in DDP's gradient sync, but DDP's initial broadcast
    copies every parameter and buffer of rank 0 (teacher included) so all ranks start equal;
    buffers are re-broadcast from rank 0 every step. Every trainable parameter must get a
    gradient on every rank each step (``Term.zero`` ensures it), hence no
    ``find_unused_parameters`` and its per-step graph walk."""
    if not is_dist():
        return objective
    global_batch_norm(objective)
    return nn.parallel.DistributedDataParallel(
        objective, device_ids=[device.index] if device.type == "cuda" else None)
