"""Evaluation of a checkpoint's backbone: frozen features (k-NN, linear probe, zero-shot,
retrieval), fine-tuning and dense probes."""
from ..data.spec import EVAL_DATASETS

# what ``m3i eval --dataset`` takes: what each data source kind offers (emoji:none has no labels:
# retrieval only)
DATASETS = EVAL_DATASETS

__all__ = ["DATASETS"]
