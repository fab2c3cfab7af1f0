"""View augmentation t(x): random resized crop + flip + colour, with the geometry recorded.

Each view remembers where it came from: its crop box ``(i, j, h, w)`` (top, left, height,
width, in source-image pixels) and whether it was mirrored. ``relpos.relative_positions``
turns two such records into the positions of one view's patches in the other view's grid.

Geometry convention (shared with ``relpos``): pixel ``x`` of an image covers ``[x, x + 1)``,
so its centre is at ``x + 0.5``. A crop box spans ``[j, j + w) × [i, i + h)``. Output pixel
``k`` of a view of width ``S`` has its centre at the crop's normalised coordinate
``u = (k + 0.5) / S`` (``1 − u`` when flipped), i.e. at source coordinate ``j + w·u``.
The crop is resampled with one batched bilinear ``grid_sample`` that follows this convention
exactly (border values repeat where an up-scaled crop touches the image edge), so the recorded
boxes describe the views without rounding. Crop and flip parameters are drawn by kornia's
batched samplers; colour operations are kornia's batched modules.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import kornia.augmentation as KA
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ViewAugment", "resized_crop"]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    s = tuple(int(v) for v in size)
    if len(s) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return s  # type: ignore[return-value]


def resized_crop(images: Tensor, boxes: Tensor, flips: Tensor | None, size: int | Sequence[int]) -> Tensor:
    """Crop each image to its box, resize it to ``size`` and mirror it where ``flips`` is True.

    Args:
        images: (B, C, H, W) float.
        boxes: (B, 4) float ``(i, j, h, w)`` in source pixels (any real values; parts outside
            the image repeat the border).
        flips: (B,) bool or None (no flips).
        size: output size, int or ``(Sh, Sw)``.

    Returns:
        (B, C, Sh, Sw), bilinear; output pixel ``(k, l)`` samples source point
        ``(i + h·(k+½)/Sh, j + w·u)`` with ``u = (l+½)/Sw``, or ``1 − (l+½)/Sw`` when flipped.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    sh, sw = _pair(size)
    boxes = boxes.to(device=images.device, dtype=images.dtype)
    i, j, h, w = boxes.unbind(-1)
    sign = torch.ones_like(w)
    if flips is not None:
        sign = torch.where(flips.to(images.device), -sign, sign)
    # affine_grid maps output normalised coords o ∈ [-1, 1] (pixel centres, align_corners=False)
    # to input normalised coords g = 2·x/W − 1 with x = j + w·(o + 1)/2 (mirrored: o → −o).
    theta = torch.zeros(B, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = sign * w / W
    theta[:, 0, 2] = (2 * j + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * i + h) / H - 1
    grid = F.affine_grid(theta, [B, C, sh, sw], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _channel_stats(values: Sequence[float], channels: int, name: str) -> Tensor:
    v = [float(x) for x in values] if isinstance(values, Sequence) else [float(values)]
    if len(v) == channels:
        return torch.tensor(v)
    if len(v) == 1 or all(x == v[0] for x in v):
        return torch.full((channels,), v[0])
    raise ValueError(f"{name} has {len(v)} values but the images have {channels} channels")


class ViewAugment(nn.Module):
    """SIM-style view augmentation that records each view's crop box and flip.

    Defaults follow SIM (and BYOL): RandomResizedCrop(scale 0.08–1, ratio 3/4–4/3), horizontal
    flip p=0.5, colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, Gaussian blur and
    solarize off (SIM uses blur p=1.0 / 0.1 and solarize p=0 / 0.2 on its two views: build two
    instances). An operation with probability 0 is skipped entirely.

    Single-channel images get brightness and contrast jitter only (saturation, hue and
    grayscale need three channels).

    ``forward(images01) -> (views, boxes, flips)``:
        images01: (B, C, H, W) float in [0, 1] (uint8 is accepted and scaled by 1/255).
        views: (B, C, Sh, Sw) normalised with ``mean``/``std``.
        boxes: (B, 4) float ``(i, j, h, w)`` = top, left, height, width of the crop in
            source pixels (integer-valued).
        flips: (B,) bool, True where the view was mirrored left-right.
    All outputs live on the input's device; random parameters are drawn from torch's global
    generator on the CPU, so ``torch.manual_seed`` reproduces them on any device.
    """

    def __init__(
        self,
        size: int | Sequence[int] = 224,
        crop_scale: Sequence[float] = (0.08, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float = 0.0,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_p: float = 0.0,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        super().__init__()
        self.size = _pair(size)
        for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("gray_p", gray_p),
                        ("blur_p", blur_p), ("solarize_p", solarize_p)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        lo, hi = (float(v) for v in crop_scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {tuple(crop_scale)}")
        rlo, rhi = (float(v) for v in crop_ratio)
        if not 0.0 < rlo <= rhi:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {tuple(crop_ratio)}")
        if len(jitter) != 4:
            raise ValueError(f"jitter must be (brightness, contrast, saturation, hue), got {tuple(jitter)}")
        self.flip_p = float(flip_p)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

        # Only the parameter sampler of this module is used (forward_parameters); the crop itself
        # is resampled by `resized_crop`, whose geometry is exactly the recorded box.
        self.crop = KA.RandomResizedCrop(self.size, scale=(lo, hi), ratio=(rlo, rhi))
        b, c, s, hue = (float(v) for v in jitter)
        self.jitter_rgb = KA.ColorJitter(b, c, s, hue, p=jitter_p) if jitter_p > 0 and any(jitter) else None
        self.jitter_gray = KA.ColorJitter(b, c, 0.0, 0.0, p=jitter_p) if jitter_p > 0 and (b or c) else None
        self.gray = KA.RandomGrayscale(p=gray_p) if gray_p > 0 else None
        if blur_p > 0:
            smax = float(max(blur_sigma))
            k = 2 * math.ceil(3 * smax) + 1  # covers ±3σ
            k = max(3, min(k, (min(self.size) // 2) * 2 - 1))  # reflect padding needs radius < size
            self.blur = KA.RandomGaussianBlur((k, k), tuple(float(v) for v in blur_sigma), p=blur_p)
        else:
            self.blur = None
        # threshold fixed at 0.5 (PIL's 128 on [0, 1]), no additive shift
        self.solarize = KA.RandomSolarize(0.0, 0.0, p=solarize_p) if solarize_p > 0 else None

    def sample_geometry(self, batch: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Draw crop boxes (B, 4) float ``(i, j, h, w)`` and flips (B,) bool, on the CPU."""
        params = self.crop.forward_parameters(torch.Size((batch, 1, height, width)))
        src = params["src"]  # (B, 4, 2) corners (x, y), inclusive pixel indices
        x0, y0 = src[:, 0, 0], src[:, 0, 1]
        x1, y1 = src[:, 2, 0], src[:, 2, 1]
        boxes = torch.stack([y0, x0, y1 - y0 + 1, x1 - x0 + 1], dim=-1).float()
        if self.flip_p > 0:
            flips = torch.rand(batch) < self.flip_p
        else:
            flips = torch.zeros(batch, dtype=torch.bool)
        return boxes, flips

    def colour(self, views01: Tensor) -> Tensor:
        """Apply the colour operations to (B, C, Sh, Sw) views in [0, 1]; returns the same shape."""
        rgb = views01.shape[1] == 3
        jitter = self.jitter_rgb if rgb else self.jitter_gray
        if jitter is not None:
            views01 = jitter(views01)
        if rgb and self.gray is not None:
            views01 = self.gray(views01)
        if self.blur is not None:
            views01 = self.blur(views01)
        if self.solarize is not None:
            views01 = self.solarize(views01)
        return views01.clamp_(0.0, 1.0)

    def normalise(self, views01: Tensor) -> Tensor:
        """(B, C, Sh, Sw) in [0, 1] → normalised with ``mean``/``std`` (per channel)."""
        C = views01.shape[1]
        mean = _channel_stats(self.mean, C, "mean").to(views01).view(1, C, 1, 1)
        std = _channel_stats(self.std, C, "std").to(views01).view(1, C, 1, 1)
        return (views01 - mean) / std

    def forward(self, images01: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images01 (B, C, H, W) in [0, 1] → views (B, C, Sh, Sw), boxes (B, 4), flips (B,)."""
        if images01.ndim != 4:
            raise ValueError(f"images01 must be (B, C, H, W), got shape {tuple(images01.shape)}")
        if images01.dtype == torch.uint8:
            images01 = images01.float().div_(255.0)
        elif not images01.is_floating_point():
            raise TypeError(f"images01 must be float in [0, 1] or uint8, got {images01.dtype}")
        B, C, H, W = images01.shape
        boxes, flips = self.sample_geometry(B, H, W)
        boxes = boxes.to(images01.device)
        flips = flips.to(images01.device)
        views = resized_crop(images01, boxes, flips, self.size)
        views = self.colour(views)
        return self.normalise(views), boxes, flips

    def extra_repr(self) -> str:
        return f"size={self.size}, flip_p={self.flip_p}, mean={self.mean}, std={self.std}"
