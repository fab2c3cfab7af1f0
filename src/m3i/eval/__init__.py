"""Evaluation of a checkpoint's backbone: frozen features (k-NN, linear probe, zero-shot,
retrieval), fine-tuning and dense probes."""

# what ``m3i eval --dataset`` takes (emoji:none has no labels: retrieval only)
DATASETS = ("fashion-mnist", "emoji:category", "emoji:subcategory", "emoji:none", "digits", "folder:PATH")
