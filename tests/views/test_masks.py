"""Masks: exact counts, blockwise clustering, disjoint mixed visible sets, seeded reproducibility."""
import pytest
import torch

from m3i.views import block_mask, mix_visible, num_masked, random_mask

GRIDS = [1, 2, 3, 4, 7, 8, 14, (3, 5), (2, 9)]


def _edges(mask, gh, gw):
    """Mean number of 4-neighbour pairs whose mask values differ (boundary length)."""
    m = mask.view(-1, gh, gw)
    return ((m[:, 1:] != m[:, :-1]).sum((1, 2)) + (m[:, :, 1:] != m[:, :, :-1]).sum((1, 2))).float().mean()


def _hw(grid):
    return (grid, grid) if isinstance(grid, int) else grid


def test_num_masked_rounds_half_up():
    assert num_masked(196, 0.6) == 118
    assert num_masked(49, 0.5) == 25
    assert num_masked(16, 0.75) == 12
    assert num_masked(10, 0.0) == 0 and num_masked(10, 1.0) == 10
    with pytest.raises(ValueError):
        num_masked(10, 1.5)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.6, 0.75, 1.0])
def test_exact_counts(grid, ratio):
    gh, gw = _hw(grid)
    n = gh * gw
    g = torch.Generator().manual_seed(0)
    for fn in (random_mask, block_mask):
        m = fn(33, grid, ratio, generator=g)
        assert m.shape == (33, n) and m.dtype == torch.bool
        assert (m.sum(1) == num_masked(n, ratio)).all(), (fn.__name__, grid, ratio)


def test_masks_vary_across_rows_and_cover_all_positions():
    g = torch.Generator().manual_seed(1)
    for fn in (random_mask, block_mask):
        m = fn(256, 8, 0.5, generator=g)
        assert len({tuple(r.tolist()) for r in m}) > 200
        freq = m.float().mean(0)
        assert freq.min() > 0.1 and freq.max() < 0.9  # no position always or never masked


@pytest.mark.parametrize("grid,ratio", [(14, 0.6), (8, 0.6), (4, 0.5), ((6, 10), 0.4)])
def test_block_masks_are_clustered(grid, ratio):
    gh, gw = _hw(grid)
    g = torch.Generator().manual_seed(2)
    blocks = block_mask(256, grid, ratio, generator=g)
    rand = random_mask(256, grid, ratio, generator=g)
    assert _edges(blocks, gh, gw) < 0.8 * _edges(rand, gh, gw)


def test_block_mask_rectangle_options():
    g = torch.Generator().manual_seed(3)
    m = block_mask(64, 14, 0.4, min_patches=16, max_patches=40, aspect=(0.5, 2.0), generator=g)
    assert (m.sum(1) == num_masked(196, 0.4)).all()
    with pytest.raises(ValueError):
        block_mask(2, 4, 0.5, min_patches=0)


@pytest.mark.parametrize("fn", [random_mask, block_mask])
def test_seeded_reproducibility(fn):
    a = fn(16, 8, 0.6, generator=torch.Generator().manual_seed(7))
    b = fn(16, 8, 0.6, generator=torch.Generator().manual_seed(7))
    c = fn(16, 8, 0.6, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(9)
    d = fn(16, 8, 0.6)
    torch.manual_seed(9)
    assert torch.equal(d, fn(16, 8, 0.6))


def test_device_argument():
    m = random_mask(4, 4, 0.5, device="cpu")
    assert m.device.type == "cpu"
    if torch.cuda.is_available():
        g = torch.Generator().manual_seed(0)
        mc = block_mask(4, 4, 0.5, generator=g, device="cuda")
        assert mc.is_cuda
        assert torch.equal(mc.cpu(), block_mask(4, 4, 0.5, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("kind", ["block", "random"])
@pytest.mark.parametrize("grid", [1, 2, 3, 4, 7, 14, (3, 5)])
def test_mix_visible_disjoint_equal_counts(kind, grid):
    gh, gw = _hw(grid)
    n = gh * gw
    g = torch.Generator().manual_seed(4)
    v = mix_visible(32, grid, kind=kind, generator=g)
    assert v.shape == (32, n) and v.dtype == torch.bool
    assert (v.sum(1) == n // 2).all()
    first, second = v[:16], v[16:]
    assert not (first & second).any()
    # together they cover the canvas, except one position per pair when N is odd
    assert ((first | second).sum(1) == 2 * (n // 2)).all()


def test_mix_visible_block_is_clustered_and_seeded():
    g = torch.Generator().manual_seed(5)
    vb = mix_visible(256, 14, kind="block", generator=g)
    vr = mix_visible(256, 14, kind="random", generator=g)
    assert _edges(vb, 14, 14) < 0.8 * _edges(vr, 14, 14)
    a = mix_visible(8, 7, generator=torch.Generator().manual_seed(1))
    b = mix_visible(8, 7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_mix_visible_rejects_bad_arguments():
    with pytest.raises(ValueError):
        mix_visible(3, 4)
    with pytest.raises(ValueError):
        mix_visible(4, 4, kind="grid")
