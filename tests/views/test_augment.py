"""ViewAugment: recorded boxes and flips describe the views exactly; colour ops; determinism."""
import pytest
import torch
import torch.nn.functional as F

from m3i.views import ViewAugment, resized_crop

NO_COLOUR = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0, mean=(0.0,), std=(1.0,))


def _ramp(batch, h, w):
    """(B, 3, h, w): channel 0 = x index / (w-1), channel 1 = y index / (h-1), channel 2 = 0."""
    x = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w) / (w - 1)
    y = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w) / (h - 1)
    img = torch.stack([x, y, torch.zeros(h, w)])
    return img.unsqueeze(0).expand(batch, 3, h, w).contiguous()


def test_views_equal_crop_then_resize_of_recorded_box():
    torch.manual_seed(0)
    src = torch.rand(24, 3, 64, 64)
    aug = ViewAugment(size=16, crop_scale=(0.3, 1.0), **NO_COLOUR)
    views, boxes, flips = aug(src)
    assert views.shape == (24, 3, 16, 16) and boxes.shape == (24, 4) and flips.shape == (24,)
    assert boxes.dtype.is_floating_point and flips.dtype == torch.bool
    assert flips.any() and (~flips).any()
    for b in range(24):
        i, j, h, w = (int(v) for v in boxes[b])
        assert 0 <= i and 0 <= j and i + h <= 64 and j + w <= 64
        assert h >= 16 and w >= 16  # down-scaling crops: interpolate never clamps
        ref = F.interpolate(src[b : b + 1, :, i : i + h, j : j + w], size=(16, 16), mode="bilinear",
                            align_corners=False)[0]
        if flips[b]:
            ref = ref.flip(-1)
        torch.testing.assert_close(views[b], ref, atol=1e-5, rtol=0)


def test_ramp_values_encode_box_and_flip():
    torch.manual_seed(1)
    H = W = 32
    S = 24
    src = _ramp(64, H, W)
    views, boxes, flips = ViewAugment(size=S, **NO_COLOUR)(src)
    k = (torch.arange(S, dtype=torch.float32) + 0.5) / S
    for b in range(64):
        i, j, h, w = boxes[b].tolist()
        u = 1 - k if flips[b] else k
        x_idx = (j + w * u - 0.5).clamp(0, W - 1) / (W - 1)  # source pixel index of each column
        y_idx = (i + h * k - 0.5).clamp(0, H - 1) / (H - 1)
        torch.testing.assert_close(views[b, 0], x_idx.view(1, S).expand(S, S), atol=1e-5, rtol=0)
        torch.testing.assert_close(views[b, 1], y_idx.view(S, 1).expand(S, S), atol=1e-5, rtol=0)
    area = boxes[:, 2] * boxes[:, 3] / (H * W)
    assert area.min() >= 0.07 and area.max() <= 1.0


def test_resized_crop_identity_box():
    img = torch.rand(3, 2, 10, 12)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 12.0]]).expand(3, 4)
    out = resized_crop(img, boxes, None, (10, 12))
    torch.testing.assert_close(out, img, atol=1e-6, rtol=0)
    out = resized_crop(img, boxes, torch.tensor([True, False, True]), (10, 12))
    torch.testing.assert_close(out[0], img[0].flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], img[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_colour_ops_keep_shape_and_range(channels):
    torch.manual_seed(2)
    aug = ViewAugment(size=32, blur_p=0.5, solarize_p=0.3)  # SIM defaults + blur + solarize
    x = torch.rand(256, channels, 32, 32)
    views, boxes, flips = aug(x)
    assert views.shape == (256, channels, 32, 32)
    assert torch.isfinite(views).all()
    assert views.min() >= -1.0 - 1e-5 and views.max() <= 1.0 + 1e-5  # mean 0.5, std 0.5
    assert boxes.shape == (256, 4) and flips.shape == (256,)


def test_colour_ops_do_not_change_geometry():
    x = torch.rand(16, 3, 40, 40)
    torch.manual_seed(3)
    _, b0, f0 = ViewAugment(size=20, **NO_COLOUR)(x)
    torch.manual_seed(3)
    _, b1, f1 = ViewAugment(size=20, blur_p=1.0, solarize_p=0.5)(x)
    assert torch.equal(b0, b1) and torch.equal(f0, f1)


def test_grayscale_always():
    torch.manual_seed(4)
    v, _, _ = ViewAugment(size=16, jitter_p=0.0, gray_p=1.0)(torch.rand(8, 3, 16, 16))
    torch.testing.assert_close(v[:, 0], v[:, 1])
    torch.testing.assert_close(v[:, 1], v[:, 2])


def test_deterministic_under_manual_seed():
    x = torch.rand(32, 3, 32, 32)
    aug = ViewAugment(size=16, blur_p=0.5, solarize_p=0.2)
    torch.manual_seed(5)
    a = aug(x)
    torch.manual_seed(5)
    b = aug(x)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    torch.manual_seed(6)
    c = aug(x)
    assert not torch.equal(a[1], c[1])


def test_uint8_input_and_config():
    aug = ViewAugment(size=8, gray_p=0.0, jitter_p=0.0)
    assert aug.size == (8, 8)
    x = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)
    torch.manual_seed(7)
    v8, b8, f8 = aug(x)
    torch.manual_seed(7)
    vf, bf, ff = aug(x.float() / 255)
    torch.testing.assert_close(v8, vf)
    with pytest.raises(ValueError):
        ViewAugment(size=8, flip_p=1.5)
    with pytest.raises(ValueError):
        ViewAugment(size=8, mean=(0.1, 0.2, 0.3))(torch.rand(2, 1, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.rand(64, 3, 32, 32)
    aug = ViewAugment(size=16, **NO_COLOUR)
    torch.manual_seed(8)
    vc, bc, fc = aug(x)
    torch.manual_seed(8)
    vg, bg, fg = aug(x.cuda())
    assert vg.is_cuda and bg.is_cuda and fg.is_cuda
    torch.testing.assert_close(vg.cpu(), vc, atol=1e-5, rtol=0)
    assert torch.equal(bg.cpu(), bc) and torch.equal(fg.cpu(), fc)
    torch.manual_seed(8)
    v, _, _ = ViewAugment(size=16, blur_p=0.5, solarize_p=0.2)(x.cuda())
    assert v.is_cuda and torch.isfinite(v).all()


def test_colour_matches_kornia_per_sample():
    """The batched, fixed-shape colour stage against kornia's own modules run on each image alone
    with that image's drawn parameters (skipped operations leave the image as it was)."""
    import kornia.augmentation as KA
    from kornia.filters import gaussian_blur2d

    torch.manual_seed(9)
    aug = ViewAugment(size=16, jitter_p=0.6, gray_p=0.4, blur_p=0.5, solarize_p=0.5)
    x = torch.rand(12, 3, 16, 16)
    p = aug.draw(12, 3, 16, 16)
    assert p["jitter_on"].any() and (~p["jitter_on"]).any()
    out = aug.colour(x, p)
    for b in range(12):
        y = x[b:b + 1]
        if p["jitter_on"][b]:
            f = p["jitter"][b].tolist()
            ref = KA.ColorJitter(*[(v, v) for v in f[:3]], hue=(f[3], f[3]), p=1.0, order=p["order"])
            y = ref(y)
        if p["gray"][b]:
            y = KA.RandomGrayscale(p=1.0)(y)
        if p["blur_on"][b]:
            s = float(p["blur_sigma"][b])
            y = gaussian_blur2d(y, (aug.blur_kernel,) * 2, torch.tensor([[s, s]]), border_type="reflect")
        if p["solarize"][b]:
            y = torch.where(y < 0.5, y, 1.0 - y)
        torch.testing.assert_close(out[b:b + 1], y.clamp(0, 1), atol=2e-5, rtol=0, msg=f"sample {b}")
