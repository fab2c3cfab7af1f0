"""Relative positions: the closed formula of the paper's cross-view positions, flips, image content, sin-cos embedding."""
import math

import pytest
import torch

from m3i.views import ViewAugment, absolute_positions, relative_positions, sincos_embed


def _random_boxes(batch, size=64, gen=None):
    h = torch.randint(8, size + 1, (batch,), generator=gen).float()
    w = torch.randint(8, size + 1, (batch,), generator=gen).float()
    i = (torch.rand(batch, generator=gen) * (size - h + 1)).floor()
    j = (torch.rand(batch, generator=gen) * (size - w + 1)).floor()
    return torch.stack([i, j, h, w], dim=-1)


@pytest.mark.parametrize("G", [1, 4, 7, 14])
def test_matches_closed_formula_without_flips(G):
    gen = torch.Generator().manual_seed(G)
    b1, b2 = _random_boxes(12, gen=gen), _random_boxes(12, gen=gen)
    no = torch.zeros(12, dtype=torch.bool)
    pos = relative_positions(b1, no, b2, None, G)  # source = view 1, target = view 2
    assert pos.shape == (12, G * G, 4)
    for b in range(12):
        i1, j1, h1, w1 = b1[b].tolist()
        i2, j2, h2, w2 = b2[b].tolist()
        di, dj, dh, dw = (i2 - i1) / h1, (j2 - j1) / w1, h2 / h1, w2 / w1
        for r in range(G):
            for c in range(G):
                y = dh * (r + 0.5) + di * G - 0.5
                x = dw * (c + 0.5) + dj * G - 0.5
                want = torch.tensor([y, x, 10 * math.log(dh), 10 * math.log(dw)])
                torch.testing.assert_close(pos[b, r * G + c], want, atol=1e-4, rtol=1e-5)


def test_identical_boxes_give_absolute_positions():
    gen = torch.Generator().manual_seed(0)
    box = _random_boxes(5, gen=gen)
    for flip in (torch.zeros(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool)):
        pos = relative_positions(box, flip, box, flip, (3, 6))
        want = absolute_positions((3, 6)).expand(5, 18, 4)
        torch.testing.assert_close(pos, want, atol=1e-5, rtol=0)


def test_absolute_positions_layout():
    p = absolute_positions((2, 3))
    assert p.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 2, 0, 0]]


def test_flips_mirror_x():
    gen = torch.Generator().manual_seed(1)
    gh, gw = 3, 5
    bs, bt = _random_boxes(7, gen=gen), _random_boxes(7, gen=gen)
    f, t = torch.zeros(7, dtype=torch.bool), torch.ones(7, dtype=torch.bool)
    none = relative_positions(bs, f, bt, f, (gh, gw)).view(7, gh, gw, 4)
    src = relative_positions(bs, t, bt, f, (gh, gw)).view(7, gh, gw, 4)
    tgt = relative_positions(bs, f, bt, t, (gh, gw)).view(7, gh, gw, 4)
    both = relative_positions(bs, t, bt, t, (gh, gw)).view(7, gh, gw, 4)
    # flipping the source mirrors x about the source grid's centre line
    torch.testing.assert_close(src[..., 1], (gw - 1) - none[..., 1])
    # flipping the target reverses the order of its columns
    torch.testing.assert_close(tgt[..., 1], none[..., 1].flip(-1))
    torch.testing.assert_close(both[..., 1], (gw - 1) - none[..., 1].flip(-1))
    for p in (src, tgt, both):  # y and the scales ignore flips
        torch.testing.assert_close(p[..., [0, 2, 3]], none[..., [0, 2, 3]])


def test_positions_point_at_the_same_image_content():
    """Target patch content equals source-view content extrapolated to the predicted position."""
    torch.manual_seed(0)
    B, H, W, S, P = 32, 64, 64, 16, 4
    G = S // P
    xr = torch.arange(W, dtype=torch.float32).view(1, W).expand(H, W) / (W - 1)
    yr = torch.arange(H, dtype=torch.float32).view(H, 1).expand(H, W) / (H - 1)
    img = torch.stack([xr, yr, torch.zeros(H, W)]).expand(B, 3, H, W).contiguous()
    aug = ViewAugment(size=S, crop_scale=(0.3, 1.0), jitter_p=0.0, gray_p=0.0, mean=(0.0,), std=(1.0,))
    vs, bs, fs = aug(img)
    vt, bt, ft = aug(img)
    assert fs.any() and (~fs).any()
    # patch means (B, 2, G, G): for a linear ramp, the value at the patch centre
    ms = vs[:, :2].reshape(B, 2, G, P, G, P).mean((3, 5))
    mt = vt[:, :2].reshape(B, 2, G, P, G, P).mean((3, 5))
    pos = relative_positions(bs, fs, bt, ft, G)
    rr, cc = torch.meshgrid(torch.arange(G).float(), torch.arange(G).float(), indexing="ij")
    design = torch.stack([rr.flatten(), cc.flatten(), torch.ones(G * G)], dim=-1).double()  # (N, 3)
    for b in range(B):
        # the source view is affine in its own grid coordinates: fit it, evaluate at the positions
        coef = torch.linalg.lstsq(design, ms[b].flatten(1).T.double()).solution  # (3, 2)
        q = torch.cat([pos[b, :, :2].double(), torch.ones(G * G, 1, dtype=torch.float64)], dim=-1)
        pred = (q @ coef).T.float()  # (2, N)
        torch.testing.assert_close(pred, mt[b].flatten(1), atol=2e-4, rtol=0)


def test_sincos_embed_shape_and_values():
    assert sincos_embed(torch.zeros(2, 5, 4), 64).shape == (2, 5, 64)
    e0 = sincos_embed(torch.zeros(4), 16)
    assert e0.tolist() == ([0.0, 0.0, 1.0, 1.0]) * 4
    with pytest.raises(ValueError):
        sincos_embed(torch.zeros(3, 4), 12)
    pos = torch.tensor([1.5, -2.0, 0.3, 7.0])
    dim = 32
    e = sincos_embed(pos, dim)
    q = dim // 4
    for comp in range(4):
        for k in range(q // 2):
            w = 1.0 / 10000 ** (2 * k / q)
            assert abs(e[comp * q + k].item() - math.sin(pos[comp].item() * w)) < 1e-5
            assert abs(e[comp * q + q // 2 + k].item() - math.cos(pos[comp].item() * w)) < 1e-5


def test_relative_positions_embed_end_to_end():
    box = torch.tensor([[0.0, 0.0, 32.0, 32.0], [4.0, 8.0, 16.0, 24.0]])
    pos = relative_positions(box, None, box.flip(0), None, 4)
    emb = sincos_embed(pos, 48)
    assert emb.shape == (2, 16, 48) and torch.isfinite(emb).all()
