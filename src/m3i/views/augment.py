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
boxes describe the views without rounding.

Every random parameter of a view (crop box, flip, colour-jitter factors and order, grayscale,
blur sigma, solarize) is drawn on the host by :meth:`ViewAugment.draw`, from a given generator or
torch's global one; :meth:`ViewAugment.apply` runs the view on the device at fixed shapes: a
sample that skips an operation gets its neutral parameter or keeps its input, so no operation
selects a subset of the batch and the device never waits for the host. Crop boxes come from
:func:`crop_boxes` (torchvision's RandomResizedCrop sampler, for images of any size each), the
colour steps are kornia's functions (torchvision's formulas).

In training, the loader crops each view from the decoded original image (:mod:`m3i.views.loader`)
and the device runs only the colour steps (``apply(..., cropped=True)``); the device-side crop
(:func:`resized_crop`) serves images that are already on the device.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from kornia.color import rgb_to_grayscale
from kornia.enhance import (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction, adjust_hue,
                            adjust_saturation_with_gray_subtraction)
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ViewAugment", "crop_boxes", "resized_crop"]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    s = tuple(int(v) for v in size)
    if len(s) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return s  # type: ignore[return-value]


def crop_boxes(heights: Tensor, widths: Tensor, scale: Sequence[float], ratio: Sequence[float],
               generator: torch.Generator | None = None, attempts: int = 10) -> Tensor:
    """RandomResizedCrop's boxes, one per image of its own size: (B, 4) float ``(i, j, h, w)``,
    integer-valued, inside the image.

    torchvision's sampler, batched: up to ``attempts`` tries of an area fraction uniform in
    ``scale`` and an aspect ratio (w/h) log-uniform in ``ratio``, rounded to whole pixels; the
    first try that fits is placed uniformly in the image. Where none fits, the largest centred box
    of an aspect ratio clamped to ``ratio``. ``heights``, ``widths``: (B,) image sizes in pixels."""
    H, W = heights.to(torch.float64).reshape(-1, 1), widths.to(torch.float64).reshape(-1, 1)
    (lo, hi), (rlo, rhi) = (float(v) for v in scale), (float(v) for v in ratio)
    u = torch.rand(H.shape[0], attempts, 4, generator=generator, dtype=torch.float64)
    area = H * W * (lo + (hi - lo) * u[..., 0])
    aspect = torch.exp(math.log(rlo) + (math.log(rhi) - math.log(rlo)) * u[..., 1])
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    i, j = torch.floor(u[..., 2] * (H - h + 1)), torch.floor(u[..., 3] * (W - w + 1))
    first = fits.to(torch.int8).argmax(1, keepdim=True)
    tried = torch.cat([t.gather(1, first) for t in (i, j, h, w)], 1)
    # none fits: the whole image, cut to the nearest aspect ratio in range
    own = W / H
    fw = torch.where(own > rhi, torch.round(H * rhi), W)
    fh = torch.where(own < rlo, torch.round(W / rlo), H)
    centred = torch.cat([torch.floor((H - fh) / 2), torch.floor((W - fw) / 2), fh, fw], 1)
    return torch.where(fits.any(1, keepdim=True), tried, centred).float()


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


def gaussian_blur(images: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """(B, C, H, W) images, each blurred with its own ``sigma`` (B,): a separable Gaussian of
    ``kernel`` taps, reflect padding (as kornia's ``gaussian_blur2d``), one grouped convolution
    per direction."""
    b, c, h, w = images.shape
    r = kernel // 2
    t = torch.arange(-r, r + 1, device=images.device, dtype=images.dtype)
    g = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.to(images.dtype).view(-1, 1) ** 2))
    g = (g / g.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (B·C, kernel)
    x = F.pad(images.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    x = F.conv2d(x, g.view(b * c, 1, 1, kernel), groups=b * c)
    x = F.conv2d(x, g.view(b * c, 1, kernel, 1), groups=b * c)
    return x.view(b, c, h, w)


def _hue(x: Tensor, turns: Tensor) -> Tensor:
    return adjust_hue(x, turns * (2 * math.pi))


# the jitter steps, in the index order of ``ViewAugment.draw``'s factors
_JITTER = (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction,
           adjust_saturation_with_gray_subtraction, _hue)


def _channel_stats(values: Sequence[float], channels: int, name: str) -> list[float]:
    v = [float(x) for x in values] if isinstance(values, Sequence) else [float(values)]
    if len(v) == channels:
        return v
    if len(v) == 1 or all(x == v[0] for x in v):
        return [v[0]] * channels
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

        self.crop_scale, self.crop_ratio = (lo, hi), (rlo, rhi)
        self.jitter = tuple(float(v) for v in jitter)
        self.jitter_p = float(jitter_p) if any(self.jitter) else 0.0
        self.gray_p, self.blur_p, self.solarize_p = float(gray_p), float(blur_p), float(solarize_p)
        self.blur_sigma = tuple(float(v) for v in blur_sigma)
        if len(self.blur_sigma) != 2 or not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be (lo, hi) with 0 < lo <= hi, got {tuple(blur_sigma)}")
        self._stats: dict = {}  # per-channel mean and std on a device, by (channels, device, dtype)
        smax = max(self.blur_sigma)
        k = 2 * math.ceil(3 * smax) + 1  # covers ±3σ
        self.blur_kernel = max(3, min(k, (min(self.size) // 2) * 2 - 1))  # reflect padding needs radius < size

    def sample_geometry(self, batch: int, height: int | Tensor, width: int | Tensor,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw crop boxes (B, 4) float ``(i, j, h, w)`` and flips (B,) bool, on the CPU, for
        images of ``height × width`` (ints, or (B,) tensors: each image its own size)."""
        sizes = [torch.as_tensor(v).expand(batch) for v in (height, width)]
        boxes = crop_boxes(*sizes, self.crop_scale, self.crop_ratio, generator)
        if self.flip_p > 0:
            flips = torch.rand(batch, generator=generator) < self.flip_p
        else:
            flips = torch.zeros(batch, dtype=torch.bool)
        return boxes, flips

    def _jitter_steps(self, channels: int) -> list[int]:
        """The jitter steps that can change an image of ``channels`` channels: 0 brightness,
        1 contrast, 2 saturation, 3 hue (the last two need three channels)."""
        return [k for k in range(4) if self.jitter[k] and (channels == 3 or k < 2)] if self.jitter_p else []

    def draw(self, batch: int, channels: int, height: int | Tensor, width: int | Tensor,
             generator: torch.Generator | None = None) -> dict:
        """Every random parameter of ``batch`` views of (channels, height, width) images (each its
        own size where ``height`` and ``width`` are (B,) tensors), drawn on the CPU from
        ``generator`` (torch's global generator when None): ``box`` (B, 4), ``flip`` (B,), and those of the
        colour operations in use: ``jitter`` (B, 4) factors (brightness, contrast, saturation
        multipliers, hue in turns; neutral 1, 1, 1, 0 where a sample is not jittered) with
        ``jitter_on`` (B,) and ``order`` (the steps' order for the batch, a tuple), ``gray`` (B,),
        ``blur_sigma`` (B,) with ``blur_on`` (B,), ``solarize`` (B,)."""
        g = generator

        def rand() -> Tensor:
            return torch.rand(batch, generator=g)

        boxes, flips = self.sample_geometry(batch, height, width, g)
        p: dict = {"box": boxes, "flip": flips}
        steps = self._jitter_steps(channels)
        if steps:
            on = rand() < self.jitter_p
            factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(batch, 1)
            for k in steps:
                r = self.jitter[k]
                lo, hi = (-r, r) if k == 3 else (max(0.0, 1.0 - r), 1.0 + r)
                factors[:, k] = torch.where(on, lo + (hi - lo) * rand(), factors[:, k])
            order = torch.randperm(4, generator=g).tolist()
            p.update(jitter=factors, jitter_on=on, order=tuple(k for k in order if k in steps))
        if self.gray_p and channels == 3:
            p["gray"] = rand() < self.gray_p
        if self.blur_p:
            p["blur_on"] = rand() < self.blur_p
            lo, hi = self.blur_sigma
            p["blur_sigma"] = lo + (hi - lo) * rand()
        if self.solarize_p:
            p["solarize"] = rand() < self.solarize_p
        return p

    def draw_views(self, views: int, batch: int, channels: int, height: int | Tensor, width: int | Tensor,
                   generator: torch.Generator | None = None) -> list[dict]:
        """The parameters of ``views`` views of each of ``batch`` images, drawn in one call (one
        :meth:`draw` of ``views · batch`` rows: multi-crop's local crops, which share this
        augmentation) -> one dict per view, as :meth:`draw` returns: each view its own boxes,
        flips and colour factors; the jitter steps' order is one for them all (as it is one per
        batch for a view), so the device colours them in one call."""
        sizes = [torch.as_tensor(v).expand(batch).repeat(views) for v in (height, width)]
        p = self.draw(views * batch, channels, *sizes, generator=generator)
        return [{k: v[i * batch:(i + 1) * batch].clone() if isinstance(v, Tensor) else v for k, v in p.items()}
                for i in range(views)]

    def colour(self, views01: Tensor, params: dict) -> Tensor:
        """Apply the colour operations of ``params`` (:meth:`draw`, on the views' device) to
        (B, C, Sh, Sw) views in [0, 1]; returns the same shape, in [0, 1]."""
        x = views01
        if "jitter" in params:
            f = params["jitter"].to(x.dtype)
            y = x.clamp(0.0, 1.0)
            for k in params["order"]:
                y = _JITTER[k](y, f[:, k]).clamp(0.0, 1.0)
            x = torch.where(params["jitter_on"].view(-1, 1, 1, 1), y, x)
        if "gray" in params:
            x = torch.where(params["gray"].view(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)
        if "blur_on" in params:
            x = torch.where(params["blur_on"].view(-1, 1, 1, 1), gaussian_blur(x, params["blur_sigma"], self.blur_kernel), x)
        if "solarize" in params:
            x = torch.where(params["solarize"].view(-1, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
        return x.clamp(0.0, 1.0)

    def normalise(self, views01: Tensor) -> Tensor:
        """(B, C, Sh, Sw) in [0, 1] → normalised with ``mean``/``std`` (per channel)."""
        C = views01.shape[1]
        mean, std = _channel_stats(self.mean, C, "mean"), _channel_stats(self.std, C, "std")
        if len(set(mean)) == 1 and len(set(std)) == 1:  # plain numbers: no tensor to copy to the device
            return (views01 - mean[0]) / std[0]
        key = (C, views01.device, views01.dtype)
        if key not in self._stats:  # copied to the device once
            self._stats[key] = tuple(torch.tensor(v, dtype=views01.dtype).view(1, C, 1, 1).to(views01.device)
                                     for v in (mean, std))
        m, s = self._stats[key]
        return (views01 - m) / s

    def apply(self, images01: Tensor, params: dict, cropped: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """images01 (B, C, H, W) float in [0, 1] and ``params`` from :meth:`draw` (on the images'
        device) -> views (B, C, Sh, Sw), boxes (B, 4), flips (B,). Fixed shapes, no host read.
        ``cropped``: ``images01`` are the views' crops already (cut, resized and mirrored by the
        loader, :mod:`m3i.views.loader`): only the colour steps and the normalisation run."""
        views = images01 if cropped else resized_crop(images01, params["box"], params["flip"], self.size)
        return self.normalise(self.colour(views, params)), params["box"], params["flip"]

    def forward(self, images01: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images01 (B, C, H, W) in [0, 1] → views (B, C, Sh, Sw), boxes (B, 4), flips (B,);
        draws the parameters on the host and copies them to the images' device."""
        if images01.ndim != 4:
            raise ValueError(f"images01 must be (B, C, H, W), got shape {tuple(images01.shape)}")
        if images01.dtype == torch.uint8:
            images01 = images01.float().div_(255.0)
        elif not images01.is_floating_point():
            raise TypeError(f"images01 must be float in [0, 1] or uint8, got {images01.dtype}")
        params = self.draw(*images01.shape)
        params = {k: v.to(images01.device) if isinstance(v, Tensor) else v for k, v in params.items()}
        return self.apply(images01, params)

    def extra_repr(self) -> str:
        return f"size={self.size}, flip_p={self.flip_p}, mean={self.mean}, std={self.std}"
