"""The typed batch and outputs: a mixture's batch goes through DataLoader workers and the view
stage as one object, the former dict keys read the same fields, and a batch pins itself."""
from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from m3i.batch import Batch, Drawn, Losses
from m3i.config import load_recipe
from m3i.data import ImageFolder, Mixture
from m3i.objective import Objective

SMALL = ["data.batch_size=4", "backbone.name=vit_nano", "backbone.depth=1"]
M3I = SMALL + ["terms.2.target_encoder.tower=scratch"]  # its caption term's tower, small and at hand


@pytest.fixture
def folder(tmp_path) -> ImageFolder:
    for k, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
        (tmp_path / f"c{k}").mkdir()
        for m in range(4):
            Image.new("RGB", (20 + 4 * m, 24), colour).save(tmp_path / f"c{k}" / f"{m}.png")
    return ImageFolder(tmp_path)


@pytest.mark.parametrize("loader_views", [False, True])
def test_a_mixture_batch_crosses_workers_and_stages_whole(folder, loader_views):
    obj = Objective(load_recipe("m3i", overrides=M3I), num_classes=2)
    mix = Mixture([folder], None, batch_size=4, image_size=32, seed=0, num_steps=2)
    if loader_views:
        mix.views = obj.loader_views(0)
    direct = mix.batch(1)
    loaded = list(DataLoader(mix, batch_size=None, num_workers=2))[1]  # pickled by a worker
    assert isinstance(loaded, Batch) and loaded.step == 1 and torch.equal(loaded.labels, direct.labels)
    assert (loaded.images is None, loaded.crops is None) == (loader_views, not loader_views)
    assert isinstance(pickle.loads(pickle.dumps(direct)).drawn, Drawn if loader_views else type(None))
    staged = obj.stage(loaded, torch.device("cpu"))
    assert staged.staged and not loaded.staged  # the stage makes a new batch; the loader's is left as it was
    assert set(staged.drawn.targets) == {t.name for t in obj.terms} and staged.drawn.views is not None
    assert set(staged.drawn.visible) == set(obj.masked_views())
    out = obj(staged)
    assert isinstance(out, Losses) and torch.isfinite(out.loss) and set(out.terms) == {t.name for t in obj.terms}
    # the former dict keys, read by callers not yet on the fields
    assert staged["label"] is staged.labels and staged["n_skipped"] == staged.n_skipped == 0
    assert staged.get("image") is staged.images and staged.get("crops") is staged.crops
    assert Batch(staged.labels, staged.captions).get("drawn", "none") == "none"
    assert [k for k, _ in out.items()] == [k for t in obj.terms for k in (t.name, f"n_{t.name}")] + ["loss"]
    out["loss"] = out["loss"] * 2
    assert out.loss is out["loss"]


def test_a_dict_batch_is_the_same_batch():
    obj = Objective(load_recipe("supervised", overrides=SMALL), num_classes=3)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, -1, 2, 1])
    torch.manual_seed(0)
    a = obj({"image": images, "label": labels})
    torch.manual_seed(0)
    b = obj(Batch(labels, [None] * 4, images))
    assert torch.equal(a.loss, b.loss) and int(a.samples["category"]) == int(b.samples["category"]) == 3
    with pytest.raises(KeyError, match="a batch has no 'imgae'"):
        Batch.of({"imgae": images})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (page-locked memory)")
def test_a_batch_pins_itself_in_the_loader(folder):
    obj = Objective(load_recipe("m3i", overrides=M3I), num_classes=2)
    mix = Mixture([folder], None, batch_size=4, image_size=32, seed=0, num_steps=1)
    mix.views = obj.loader_views(0)
    batch = next(iter(DataLoader(mix, batch_size=None, num_workers=1, pin_memory=True)))
    assert batch.labels.is_pinned() and all(c.is_pinned() for c in batch.crops)
    assert all(p["box"].is_pinned() for p in batch.drawn.views)
    staged = obj.to("cuda").stage(batch, torch.device("cuda"))
    assert staged.labels.is_cuda and all(c.is_cuda for c in staged.crops) and staged.source.device.type == "cpu"
    assert torch.isfinite(obj(staged).loss)
