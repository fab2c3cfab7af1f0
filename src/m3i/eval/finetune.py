"""The scoring of ``m3i finetune``: top-1 / top-5 of a fine-tuned classifier on held-out images.
The fine-tuning itself is training (:mod:`m3i.train.finetune`, through the pre-training loop)."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import metrics


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor, batch_size: int,
             autocast: Callable[[], AbstractContextManager], progress: bool = False) -> dict[str, float]:
    """Top-1 / top-5 of ``model`` (images -> class logits) on uint8 images (B, 3, S, S), normalised
    by ``mean`` and ``std`` (on the model's device), in eval mode; the mode is put back after."""
    was = model.training
    model.eval()
    dev = mean.device
    scores = []
    for i in tqdm(range(0, len(images), batch_size), desc="score", disable=not progress, leave=False):
        x = (images[i:i + batch_size].to(dev).float() / 255 - mean) / std
        with autocast():
            scores.append(model(x).float().cpu())
    model.train(was)
    return metrics.topk_accuracy(torch.cat(scores), labels)
