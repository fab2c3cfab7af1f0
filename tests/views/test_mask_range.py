"""DINOv2's masks (``views.mask.ratio: [lo, hi]``, ``views.mask.probability``): a fixed number of a
batch's masked-view images hide patches, at shares spread over the range, assigned over every
masked view together; refused outside the ``fill`` input, which keeps every token and reads nothing
back to the host."""
from __future__ import annotations

import math

import pytest
import torch

from host_sync import HostSyncs
from m3i.backbones import build_backbone
from m3i.config import ConfigError, MaskCfg, ViewsCfg, load_recipe
from m3i.objective import Objective
from m3i.views import draw_masks, draw_visible, mask_counts, num_masked

pytestmark = pytest.mark.usefixtures("one_thread")


def stratum(lo: float, hi: float, m: int, i: int, n: int) -> tuple[int, int]:
    """The fewest and most patches of a grid of ``n`` the i-th of ``m`` masked images may hide: its
    share lies in the i-th of m equal parts of [lo, hi], rounded half up."""
    step = (hi - lo) / m
    return (math.floor((lo + i * step) * n + 0.5 + 1e-9), math.floor((lo + (i + 1) * step) * n + 0.5 + 1e-9))


@pytest.mark.parametrize("rows,probability", [(8, 0.5), (15, 0.5), (64, 0.3), (10, 1.0), (7, 0.0)])
@pytest.mark.parametrize("lo,hi", [(0.1, 0.5), (0.3, 0.3)])
def test_a_fixed_number_of_images_is_masked_at_shares_spread_over_the_range(rows, probability, lo, hi):
    cfg, n = MaskCfg(ratio=(lo, hi), probability=probability), 64
    g = torch.Generator().manual_seed(0)
    firsts = set()
    for _ in range(20):
        counts = mask_counts(rows, n, cfg, g)
        m = math.floor(rows * probability + 1e-9)
        assert counts.shape == (rows,) and int((counts > 0).sum()) == m  # lo > 0: every masked image hides some
        for i, c in enumerate(counts[counts > 0].sort().values.tolist()):
            low, high = stratum(lo, hi, m, i, n)
            assert low <= c <= high, (i, c, low, high)
        firsts.add(tuple((counts > 0).nonzero().flatten().tolist()))
    if 0 < m < rows:
        assert len(firsts) > 1  # the masked images are shuffled among the rows


@pytest.mark.parametrize("kind", ["block", "random"])
def test_masks_are_assigned_over_every_masked_view_together(kind):
    """2 views of 10 images at probability 0.3: 6 of the 20 images masked, not 3 per view."""
    cfg = ViewsCfg(input_mode="fill", mask=MaskCfg(kind=kind, ratio=(0.2, 0.6), probability=0.3))
    g = torch.Generator().manual_seed(1)
    splits = set()
    for _ in range(30):
        masks = draw_masks(cfg, 10, (8, 8), [0, 1], g)
        assert set(masks) == {0, 1} and all(m.shape == (10, 64) and m.dtype == torch.bool for m in masks.values())
        hidden = torch.stack([(~masks[v]).sum(1) for v in (0, 1)])
        assert int((hidden > 0).sum()) == 6
        on = hidden[hidden > 0]
        assert torch.all((on >= num_masked(64, 0.2)) & (on <= num_masked(64, 0.6)))
        splits.add(int((hidden[0] > 0).sum()))
    assert len(splits) > 1


def test_a_fixed_ratio_keeps_each_views_own_draws():
    """Without a range or a probability the masks are drawn as before: view by view, every row
    hiding the same number."""
    cfg = ViewsCfg(mask=MaskCfg(ratio=0.5))
    masks = draw_masks(cfg, 6, (4, 4), [0, 1], torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    ref = {v: draw_visible(cfg, 6, (4, 4), g) for v in (0, 1)}
    assert all(torch.equal(masks[v], ref[v]) for v in (0, 1))
    assert all(bool(((~m).sum(1) == 8).all()) for m in masks.values())
    assert not cfg.mask.varies and ViewsCfg(mask=MaskCfg(ratio=(0.5, 0.5))).mask.varies is False


def test_a_range_or_a_probability_is_refused_outside_the_fill_input():
    fill = ["views.input_mode=fill"]
    with pytest.raises(ConfigError, match=r"views.mask.ratio: a range \[0.1, 0.5\] makes images hide different "
                                          r"numbers of patches, which only input_mode fill takes .*not 'drop'"):
        load_recipe("mae", overrides=["views.mask.ratio=[0.1, 0.5]"])
    with pytest.raises(ConfigError, match=r"views.mask.probability: 0.5 leaves some images unmasked .*not 'mix'"):
        load_recipe("m3i", overrides=["views.mask.probability=0.5"])
    with pytest.raises(ConfigError, match=r"views.mask.ratio: a share of the patches in \[0, 1\), or \[lo, hi\] with "
                                          r"0 <= lo <= hi < 1, got \[0.6, 0.2\]"):
        load_recipe("mae", overrides=fill + ["views.mask.ratio=[0.6, 0.2]"])
    with pytest.raises(ConfigError, match="views.mask.probability: Input should be less than or equal to 1"):
        load_recipe("mae", overrides=fill + ["views.mask.probability=1.5"])
    # a decoder whose queries are the hidden patches needs as many in every image: MAE's is refused
    with pytest.raises(ConfigError, match=r"terms.0.target.kind: a 'pixels' target predicts the same number of hidden "
                                          r"patches in every image"):
        load_recipe("mae", overrides=fill + ["views.mask.ratio=[0.1, 0.5]", "views.mask.probability=0.5"])
    r = load_recipe("dinov2", overrides=["views.mask.ratio=[0.2, 0.4]", "views.mask.probability=0.25"])
    assert r.views.mask.ratio_range == (0.2, 0.4) and r.views.mask.varies


@pytest.mark.parametrize("name,kw", [("vit_nano", {"patch_size": 4}), ("convnext_atto", {"stem_stride": 1})])
def test_the_fill_input_keeps_every_token_of_rows_that_differ(name, kw):
    """Every token in patch order, read with nothing back to the host; at the visible patches each
    row's tokens are those of the row run alone with its own count."""
    net = build_backbone(name, img_size=32, fill=True, **kw).eval()
    n = net.num_patches
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 32, 32, generator=g)
    counts = torch.tensor([0, 1, n // 3, n // 2, n - 2])  # patches hidden per row: one row unmasked
    visible = torch.rand(5, n, generator=g).argsort(1).argsort(1) >= counts.view(-1, 1)
    with torch.no_grad(), HostSyncs() as syncs:
        f = net.forward_features(x, visible, mode="fill", count=n)
    assert syncs.total == 0, dict(syncs.counts)
    assert f.tokens.shape == (5, n, net.embed_dim)
    with torch.no_grad():
        for i in range(5):
            k = n - int(counts[i])
            alone = net.forward_features(x[i:i + 1], visible[i:i + 1], mode="fill", count=k)
            torch.testing.assert_close(f.tokens[i][visible[i]], alone.tokens[0], rtol=1e-5, atol=1e-5)
            if name == "vit_nano":  # the class token of the same input
                torch.testing.assert_close(f.pooled[i], alone.pooled[0], rtol=1e-5, atol=1e-5)


def test_the_step_reads_every_token_of_masks_that_differ():
    """The view stage and the context count a varying mask as the whole grid; the masks are drawn
    only for the masked (global) view, at its grid."""
    r = load_recipe("simclr", overrides=["backbone.name=vit_nano", "backbone.depth=1", "data.batch_size=8",
                                         "terms.0.source.masked=true", "views.input_mode=fill",
                                         "views.mask.ratio=[0.2, 0.6]", "views.mask.probability=0.5",
                                         "views.local={count: 2, size: 16}", "terms.0.target.view=2"])
    torch.manual_seed(0)
    obj = Objective(r)
    batch = obj.stage({"image": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)}, torch.device("cpu"))
    assert set(batch.drawn.visible) == {0} and batch.drawn.visible[0].shape == (8, 64)
    assert int(((~batch.drawn.visible[0]).sum(1) > 0).sum()) == 4
    views = obj.views_of(batch)
    ctx = obj.context(batch, views)
    assert obj.visible_count() == 64 and views.count == 64 and ctx.visible_count(0) == 64
    assert ctx.online(0, True).tokens.shape == (8, 64, obj.backbone.embed_dim)
    assert torch.isfinite(obj(batch, views).loss)
