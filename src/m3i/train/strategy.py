"""How the objective is laid onto devices: the units a backbone is compiled and sharded by.

A backbone's *units* are its transformer blocks (ViT) or its stages (ConvNeXt): the pieces that
``torch.compile`` compiles one by one (identical blocks share one compiled graph, so compiling
a deep model costs about as much as one block) and that FSDP shards one by one.
"""
from __future__ import annotations

from torch import nn


def backbone_units(backbone: nn.Module) -> list[nn.Module]:
    """The repeated pieces of ``backbone``: ViT blocks or ConvNeXt stages."""
    if hasattr(backbone, "blocks") and isinstance(backbone.blocks, (nn.ModuleList, nn.Sequential)):
        return list(backbone.blocks)
    if hasattr(backbone, "stages"):
        return list(backbone.stages)
    raise ValueError(f"{type(backbone).__name__}: no blocks or stages to compile or shard by")


def encoder_backbones(objective: nn.Module) -> list[nn.Module]:
    """The online backbone and the backbone of every copied target encoder (EMA teacher, frozen)."""
    nets = [objective.backbone]
    for name, child in objective.named_children():
        if name == "teacher" or name.startswith("frozen_"):
            if child is not None and child.backbone not in nets:
                nets.append(child.backbone)
    return nets


def compile_backbones(objective: nn.Module, **options) -> int:
    """``torch.compile`` every unit of every backbone of ``objective`` in place (parameter names,
    state dicts and the optimiser's view of the parameters do not change); returns the number
    of units compiled. Call it after the objective is built and moved to its device, before any
    DDP or FSDP wrapping."""
    n = 0
    for net in encoder_backbones(objective):
        for unit in backbone_units(net):
            unit.compile(**options)
            n += 1
    return n
