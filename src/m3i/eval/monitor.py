"""Monitors during pre-training (``train.eval_every=N``): every N steps the trainer scores its own
backbone, in its own process, and logs the scores beside the losses.

- k-NN (cosine, k = 20, temperature-weighted votes) on the ``val`` split of a labelled data set,
  the probe fitted on its ``fit`` split (:mod:`m3i.data.splits`);
- image→text and text→image retrieval on the captioned ``val`` images, through the caption
  term's heads, where the recipe has a caption term and the data set has captions.

Both splits lie inside ``train``: a run whose sources read ``:train`` sees the val images (and,
with labels on, their labels) during pre-training; read ``:fit`` to keep them out (the README's
monitor curve does). The data sets are loaded once; scoring runs in eval mode under
``torch.no_grad`` and leaves every random generator as it found it, so a run with monitors trains
and resumes exactly as one without. The trainer leaves a pass's time out of its img/s and logs it
apart (``monitor_s``).
"""
from __future__ import annotations

import random

import numpy as np
import torch

from ..data.spec import monitored_on
from ..device import resolve_precision
from ..distributed import gathered
from ..targets import TARGETS
from .run import load_evalset, score


def monitor_sets(recipe) -> tuple[str | None, str | None]:
    """(k-NN data set, retrieval data set) of a recipe: ``train.eval_knn`` / ``train.eval_retrieval``,
    or those the first labelled (captioned) source whose kind names one is monitored on
    (``register_source(..., monitored=...)``); retrieval only where a term pairs images with text."""
    tr = recipe.train
    knn, ret = tr.eval_knn, tr.eval_retrieval
    for s in recipe.data.sources:
        k, r = monitored_on(s.spec)
        if knn is None and s.labels:
            knn = k
        if ret is None and s.captions:
            ret = r
    pairs_with_text = any(TARGETS[t.target.kind].pairs_with_text for t in recipe.terms)
    return knn, ret if pairs_with_text else None


class Monitor:
    """Scores of the backbone on held-out data, every ``train.eval_every`` steps."""

    def __init__(self, recipe, size: int):
        self.knn_set, self.retrieval_set = monitor_sets(recipe)
        if self.knn_set is None and self.retrieval_set is None:
            raise ValueError("train.eval_every: no data set to monitor on; set train.eval_knn (a data set as "
                             "`m3i eval --dataset` takes: fashion-mnist, emoji:category, folder:PATH)")
        limit = recipe.train.eval_limit
        # embedded in the training's precision: a model whose weights FSDP gathers in bf16 needs bf16
        # autocast even where evaluation alone would choose fp32 (a CPU without bfloat16 kernels)
        self.precision = recipe.train.precision
        self.knn_data = load_evalset(self.knn_set, size, limit=limit, progress=False, split="val") \
            if self.knn_set else None
        self.retrieval_data = load_evalset(self.retrieval_set, size, with_train=False, limit=limit,
                                           progress=False, split="val") if self.retrieval_set else None

    @torch.no_grad()
    def __call__(self, objective) -> dict[str, float]:
        """{"monitor/knn_top1": ..., "monitor/retrieval_i2t_R@1": ...}, the random state untouched."""
        dev = next(objective.parameters()).device
        states = (random.getstate(), np.random.get_state())
        was_training = objective.training
        out: dict[str, float] = {}
        if self.precision == "auto":
            self.precision = resolve_precision("auto", dev)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), gathered(objective):
            objective.eval()
            try:
                if self.knn_data is not None:
                    res = score(objective, "knn", self.knn_data, progress=False, precision=self.precision)["metrics"]
                    out |= {f"monitor/knn_{k}": v for k, v in res.items()}
                if self.retrieval_data is not None:
                    res = score(objective, "retrieval", self.retrieval_data, progress=False,
                                precision=self.precision)["metrics"]
                    out |= {f"monitor/retrieval_{k}": v for k, v in res.items()}
            finally:
                objective.train(was_training)
        random.setstate(states[0])
        np.random.set_state(states[1])
        return out
