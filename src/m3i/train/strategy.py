"""How the objective is laid onto devices: ``train.strategy`` (DDP, FSDP2 over every rank, or
HSDP: FSDP2 within a node and replicas across nodes, on a 2-D device mesh; with batch norm over
the global batch), ``train.compile``, and the units a backbone is compiled and sharded by.

A backbone's *units* are its transformer blocks (ViT) or the blocks of its stages (ConvNeXt): the pieces that
``torch.compile`` compiles one by one (identical blocks share one compiled graph, so compiling
a deep model costs about as much as one block) and that FSDP shards one by one.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import debug
from ..estimators.base import Estimator
from .. import distributed as dist


def backbone_units(backbone: nn.Module) -> list[nn.Module]:
    """The repeated pieces of ``backbone``: the blocks of a ViT, or of each ConvNeXt / ResNet stage."""
    if hasattr(backbone, "blocks") and isinstance(backbone.blocks, (nn.ModuleList, nn.Sequential)):
        return list(backbone.blocks)
    if hasattr(backbone, "stages"):  # the forward pass calls each block of a stage (and its downsampling)
        return [blk for stage in backbone.stages for blk in stage.blocks]
    raise ValueError(f"{type(backbone).__name__}: no blocks or stages to compile or shard by")


def compile_blocks(objective: nn.Module, **options) -> int:
    """``torch.compile`` the objective's pieces in place (parameter names, state dicts and the
    optimiser's view of the parameters do not change): every unit of every backbone, every
    transformer block of its terms (dense decoders, text towers), every other module of a term
    that holds no block (projectors, predictors, class tables, pixel heads) and the loss methods of
    every term's estimator. Returns the number of pieces compiled. Call it after the objective is
    built and moved to its device, before any DDP or FSDP wrapping."""
    from ..layers import Block

    units = [unit for net in objective.encoders() for unit in backbone_units(net)]
    units += [m for m in objective.terms.modules() if isinstance(m, Block)]
    for term in objective.terms:  # the heads: a term's modules without a block inside
        units += [m for m in term.children() if not any(isinstance(x, Block) for x in m.modules())]
    for unit in units:
        unit.compile(**options)
    losses = 0
    for term in objective.terms:  # the estimators' losses, each method of each term's estimator
        est = term.estimator
        for name in ("classes", "paired", "dense"):
            if getattr(type(est), name) is not getattr(Estimator, name) and name not in vars(est):
                setattr(est, name, torch.compile(getattr(est, name), **options))
                losses += 1
    return len(units) + losses


# -- data parallel (DDP), fully sharded (FSDP2) or hybrid sharded (HSDP) -----------------------------
def wrap(objective: nn.Module, device: torch.device, train) -> nn.Module:
    """The module the loop calls: DDP around ``objective`` (``train.strategy=ddp``) or
    ``objective`` itself with its parameters sharded in place (``fsdp``: over every rank;
    ``hsdp``: over the ranks of a node, replicated across nodes, :func:`device_mesh`). Without a
    process group, ``objective`` itself."""
    if train.strategy in ("fsdp", "hsdp") and dist.is_dist():
        mesh = device_mesh(train, device) if train.strategy == "hsdp" else None
        return shard(objective, bf16=train.precision == "bf16", mesh=mesh)
    return replicate(objective, device)


def mesh_shape(train, world: int, local: int | None = None) -> tuple[int, int]:
    """HSDP's mesh (replicas, shards) for ``world`` ranks: ``train.mesh``, else the launch's, the
    ``local`` ranks of a node (torchrun's ``LOCAL_WORLD_SIZE``) sharding and the nodes replicating
    (one node: every rank shards, as ``fsdp``)."""
    if train.mesh is not None:
        replicas, shards = train.mesh
        if replicas * shards != world:
            raise ValueError(f"train.mesh: {list(train.mesh)} is {replicas} × {shards} = {replicas * shards} ranks; "
                             f"the launch has {world}")
        return replicas, shards
    shards = local or world
    if world % shards:
        raise ValueError(f"train.strategy=hsdp: {world} ranks are no whole number of nodes of {shards} "
                         f"(LOCAL_WORLD_SIZE); give the mesh: train.mesh=[replicas, shards]")
    return world // shards, shards


def device_mesh(train, device: torch.device):
    """HSDP's 2-D device mesh over every rank, dimensions ``("replicate", "shard")``: rank r is
    shard ``r % shards`` of replica ``r // shards``, so with torchrun's rank order a replica is a
    node and the all-gathers and reduce-scatters stay within it; only the gradients' all-reduce
    across replicas crosses nodes. Every rank must call it."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = mesh_shape(train, dist.world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or None)
    return init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))


def shard(objective: nn.Module, bf16: bool = True, mesh=None) -> nn.Module:
    """FSDP2 in place: ``fully_shard`` every block (ViT) or stage (ConvNeXt) of the online backbone
    and of every copied target encoder (EMA teacher, frozen), then the objective itself, which
    holds the rest (embeddings, decoders, heads, class tables, trained text towers). With ``bf16``
    the blocks gather and compute in bfloat16 and their gradients are reduced in float32; the
    sharded parameters, and AdamW's state, stay float32; the rest runs under the loop's autocast.

    Every rank must have built the same initial weights (same seed): each keeps its shard of them.
    The EMA teacher is sharded like the online network, so its update is local to each rank
    (:meth:`Teacher.update` works on the local shards); frozen target models and class tables are
    ordinary (sharded) parameters of the objective. What runs outside the forward pass, where FSDP
    gathers no shard, stays whole on every rank: a frozen text tower with its caption cache (filled
    on the host while a batch is staged, :func:`host_parameters`).

    ``mesh``: HSDP's 2-D device mesh (:func:`device_mesh`): each parameter is sharded over the
    ranks of its replica and whole in every replica; the gradients are reduce-scattered within a
    replica and all-reduced across replicas. None: sharded over every rank (FSDP)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    global_batch_norm(objective)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for net in objective.encoders():
        for unit in backbone_units(net):
            fully_shard(unit, mesh=mesh, mp_policy=mp)
    # FSDP shards no 0-d tensor (learned temperatures): they stay whole on every rank and
    # :func:`sync_replicated_grads` averages their gradients as DDP would
    scalars = {p for p in objective.parameters() if p.ndim == 0}
    # the rest keeps float32 parameters (batch norm's statistics stay float32) under the loop's autocast
    fully_shard(objective, mesh=mesh, ignored_params=scalars | host_parameters(objective))
    objective._replicated_params = [p for p in scalars if p.requires_grad]
    return objective


def host_parameters(objective: nn.Module) -> set[nn.Parameter]:
    """The parameters that modules of ``objective`` compute with on the host, outside its forward
    pass (each module that has any lists them in ``host_parameters()``)."""
    return {p for m in objective.modules() if hasattr(m, "host_parameters") for p in m.host_parameters()}


@contextmanager
def gradient_sync(model: nn.Module, sync: bool):
    """Around the forward and backward of one micro-batch (``train.accum_steps``): DDP or FSDP
    reduce the gradients across ranks only when ``sync`` (the step's last micro-batch); before
    it, each rank adds up its own."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    yield


def sync_replicated_grads(objective: nn.Module) -> None:
    """After backward on sharded ranks: the mean over ranks of the gradients of the parameters
    FSDP leaves whole (queued on the device, no wait)."""
    grads = [p.grad for p in getattr(objective, "_replicated_params", ()) if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= dist.world_size()
    for g, v in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(v.view_as(g))


def clip_grad_norm_(params: list[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a mix of sharded (DTensor) and whole parameters:
    the norm of the whole gradient over every rank, as a plain 0-d tensor, and the clip, both on
    the device."""
    grads = [p.grad for p in params if p.grad is not None]
    dtensors = [g for g in grads if hasattr(g, "to_local")]
    sharded = [g.to_local() for g in dtensors]
    whole = [g for g in grads if not hasattr(g, "to_local")]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    local = torch.stack([n.float() for n in torch._foreach_norm(sharded)]).square().sum()
    # the shards of one replica are disjoint: their squares add up over its ranks (HSDP's other
    # replicas hold the same gradient, so the sum stays within the mesh's last, sharding dimension)
    mesh = dtensors[0].device_mesh
    torch.distributed.all_reduce(local, group=mesh.get_group(mesh.ndim - 1))
    if whole:
        local = local + torch.stack([n.float() for n in torch._foreach_norm(whole)]).square().sum()
    total = local.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(sharded + whole, coef)
    return total


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(objective: nn.Module) -> dict[str, Tensor]:
    """The objective's whole state dict; sharded: gathered onto rank 0's CPU (every rank must
    call it; the others get ``{}``)."""
    if not is_sharded(objective):
        return objective.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded_optimizer(objective: nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
    """AdamW's state with ``torch.distributed.checkpoint``: each rank writes its shards; the folder
    loads on any number of ranks (:func:`load_sharded_optimizer`). Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(objective, opt)}, checkpoint_id=str(folder))


def load_sharded_optimizer(objective: nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
    """Load a :func:`save_sharded_optimizer` folder written on N ranks into ``opt`` on M ranks
    (sharded or not; without a process group, in this one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"{folder}: no sharded optimizer state (.metadata missing)")
    state = {"optimizer": get_optimizer_state_dict(objective, opt)}  # the layout to fill, state initialised
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(objective, opt, state["optimizer"])


# -- batch norm over the global batch ----------------------------------------------------------------
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
        if not (self.training and dist.is_dist() and dist.world_size() > 1):
            if self.affine and self.track_running_stats and self.weight.dtype != self.running_mean.dtype:
                return self._float32(x)
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        local = xf.new_full((1,), xf.numel() // xf.shape[1])  # made on the device: no copy from the host
        # two passes (mean, then centred squares): the numbers one process gets on the whole batch
        s = dist.all_reduce_with_grad(torch.cat([xf.sum(dims), local]))
        n, mean = s[-1], s[:-1] / s[-1]
        if debug.enabled() and float(n.detach()) < 2:  # reads the count back: debug mode only
            raise ValueError(f"batch norm needs more than 1 value per channel over the global batch, got {int(n)}")
        centred = xf - mean.view(shape)
        var = dist.all_reduce_with_grad(centred.pow(2).sum(dims)) / n
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

    def _float32(self, x: Tensor) -> Tensor:
        """Plain batch norm in float32: FSDP's bf16 blocks gather the parameters in bfloat16 beside
        float32 running statistics, which batch norm cannot mix (in eval, or on one rank)."""
        momentum = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x.float(), self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
                            self.training, momentum, self.eps).to(x.dtype)


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


def replicate(objective: nn.Module, device: torch.device) -> nn.Module:
    """The module the training loop calls: ``objective`` itself without a process group; under
    ``torchrun`` (even with one process) its batch norms made global and DDP around it. Parameters with ``requires_grad=False`` (EMA
    teacher, frozen towers) take no part in DDP's gradient sync, but DDP's initial broadcast
    copies every parameter and buffer of rank 0 (teacher included) so all ranks start equal;
    buffers are re-broadcast from rank 0 every step. Every trainable parameter must get a
    gradient on every rank each step (every target keeps its fixed shapes, so a batch without
    its target still reaches every parameter, with weight 0), hence no
    ``find_unused_parameters`` and its per-step graph walk."""
    if not dist.is_dist():
        return objective
    global_batch_norm(objective)
    return nn.parallel.DistributedDataParallel(
        objective, device_ids=[device.index] if device.type == "cuda" else None)
