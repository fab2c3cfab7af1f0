"""One seeded split, shared by the data sources and evaluation: no test item is ever a
pre-training sample, labelled or not."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from m3i.config import load_recipe, recipe_names
from m3i.data import Emoji, FashionMNIST, data_root
from m3i.data.spec import parse_spec
from m3i.data.splits import grouped_split, inner_split
from m3i.eval.run import splits
from m3i.train.loop import build_mixture

REAL = (data_root() / "emoji" / "emoji.json").is_file() and any(
    (p / "train-images-idx3-ubyte.gz").is_file()
    for p in (data_root() / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")))


def test_grouped_split_is_a_partition_that_keeps_groups_together():
    keys = [f"k{i % 37}" for i in range(200)]  # 37 groups, uneven sizes
    train, test = grouped_split(keys, "train"), grouped_split(keys, "test")
    fit, val = grouped_split(keys, "fit"), grouped_split(keys, "val")
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(200))
    assert sorted(np.concatenate([fit, val]).tolist()) == sorted(train.tolist())
    side = {}
    for part, idx in (("train", train), ("test", test)):
        for i in idx:
            assert side.setdefault(keys[i], part) == part  # a key never straddles the split
    assert len({keys[i] for i in test}) == round(0.2 * 37)
    assert np.array_equal(test, grouped_split(list(keys), "test"))  # seeded: the same every time
    with pytest.raises(ValueError, match="split must be one of"):
        grouped_split(keys, "holdout")


def test_inner_split():
    fit, val = inner_split(100, "fit", 20), inner_split(100, "val", 20)
    assert len(val) == 20 and len(fit) == 80 and not set(fit) & set(val)
    assert np.array_equal(val, inner_split(100, "val", 20))


def _identities(src):
    """(file-level identity, caption) of every sample a source can yield."""
    ids = {src.locate(i) for i in range(len(src))}
    return ids, set(src.all_captions()) if src.has_captions else set()


def on_builtin_data(name: str) -> bool:
    """Whether a recipe pre-trains on the built-in sets (the paper-scale ones read ImageNet, CC12M...)."""
    return all(parse_spec(s.spec)[0] in ("fashion-mnist", "emoji", "digits") for s in load_recipe(name).data.sources)


@pytest.mark.skipif(not REAL, reason="built-in sets not installed (run `m3i data fetch`)")
@pytest.mark.parametrize("recipe", [n for n in recipe_names() if on_builtin_data(n)])
def test_no_test_item_can_be_drawn_in_pretraining(recipe):
    test_emoji = Emoji(label=None, split="test")
    test_files, test_captions = set(test_emoji.files), set(test_emoji.all_captions())
    fm_test = FashionMNIST(split="test")
    fm_test_ids = {fm_test.locate(i) for i in range(len(fm_test))}
    mixture = build_mixture(load_recipe(recipe))
    for src in mixture.sources:
        files, _ = _identities(src)
        assert not files & test_files, f"{recipe}: {src.name} holds test emoji"
        assert not files & fm_test_ids, f"{recipe}: {src.name} holds Fashion-MNIST test images"
        if isinstance(src, Emoji):  # captions hidden or not, the emoji's name is not a test caption
            assert not set(src._captions) & test_captions, f"{recipe}: {src.name} holds test captions"
    assert not set(mixture.captions()) & test_captions
    # and what the mixture actually draws: a few batches' worth of plans
    for step in range(20):
        ks, idx = mixture.plan(step)
        for k, i in zip(ks, idx):
            src = mixture.sources[int(k)]
            assert src.locate(int(i)) not in test_files | fm_test_ids


@pytest.mark.skipif(not REAL, reason="built-in sets not installed (run `m3i data fetch`)")
@pytest.mark.parametrize("dataset", ["emoji:category", "emoji:subcategory", "fashion-mnist"])
def test_eval_scores_only_held_out_items(dataset):
    tr, tr_idx, te, te_idx, _ = splits(dataset, "test")
    train_ids = {tr.locate(int(i)) for i in tr_idx}
    test_ids = {te.locate(int(i)) for i in te_idx}
    assert not train_ids & test_ids and len(test_ids) == len(te_idx)
    vtr, vtr_idx, vte, vte_idx, _ = splits(dataset, "val")
    fit_ids = {vtr.locate(int(i)) for i in vtr_idx}
    val_ids = {vte.locate(int(i)) for i in vte_idx}
    assert not fit_ids & val_ids and not (fit_ids | val_ids) & test_ids  # choices never touch test
    assert (fit_ids | val_ids) <= train_ids
    if dataset.startswith("emoji"):  # the pre-training source is exactly the eval train part
        pretraining = Emoji(label=None)
        assert {pretraining.locate(i) for i in range(len(pretraining))} == train_ids
