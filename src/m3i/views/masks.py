"""Patch masks for masked image modelling: True = masked (hidden from the encoder).

Every row of a mask hides exactly the same number of patches, so the encoder's visible token
count K is the same for every sample (the backbone contract). Patches are indexed row-major
over a ``gh × gw`` grid, ``N = gh·gw``.

DINOv2's masks are the exception (``views.mask.ratio: [lo, hi]``, ``views.mask.probability``,
:func:`mask_counts`): a fixed number of a batch's masked-view images are masked, each hiding its
own share of the range, and the rest none; they run only as the ``fill`` input, which keeps every
token (a mask token in place of each hidden patch), so no row's count is needed.

Randomness comes from an optional ``torch.Generator``; masks are drawn on the generator's
device (the CPU without one) and moved to ``device`` at the end, so a seeded generator gives
the same mask whatever ``device`` is.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["grid_shape", "num_masked", "random_mask", "block_mask", "mix_visible", "mask_counts", "draw_visible",
           "draw_masks", "visible_count"]


def grid_shape(grid: int | Sequence[int]) -> tuple[int, int]:
    """``grid`` as ``(gh, gw)``; an int means a square grid."""
    if isinstance(grid, int):
        g = (grid, grid)
    else:
        g = tuple(int(v) for v in grid)
        if len(g) != 2:
            raise ValueError(f"grid must be an int or (gh, gw), got {grid!r}")
    if g[0] < 1 or g[1] < 1:
        raise ValueError(f"grid must be positive, got {grid!r}")
    return g  # type: ignore[return-value]


def num_masked(n: int, ratio: float) -> int:
    """Patches hidden per row: ``ratio·n`` rounded half up (``ratio`` in [0, 1])."""
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    return min(n, int(math.floor(float(ratio) * n + 0.5 + 1e-9)))


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _first(order: Tensor, count: int | Tensor) -> Tensor:
    """(B, n) bool: True at the first ``count`` positions of each row's ``order`` (``count`` an
    int, or (B,): each row its own)."""
    if isinstance(count, Tensor):
        return order.argsort(dim=1) < count.view(-1, 1)
    mask = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    return mask.scatter_(1, order[:, :count], True)


def _random_count(batch: int, n: int, count: int | Tensor, generator: torch.Generator | None) -> Tensor:
    """(B, n) bool with exactly ``count`` True per row (an int, or (B,) each row's), uniformly at random."""
    noise = torch.rand(batch, n, generator=generator, device=_gen_device(generator))
    return _first(noise.argsort(dim=1), count)


def random_mask(
    batch: int,
    grid: int | Sequence[int],
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniformly random mask, (B, N) bool, exactly ``num_masked(N, ratio)`` True per row."""
    gh, gw = grid_shape(grid)
    n = gh * gw
    mask = _random_count(batch, n, num_masked(n, ratio), generator)
    return mask.to(device) if device is not None else mask


def _neighbour_count(mask: Tensor, gh: int, gw: int) -> Tensor:
    """(B, N) bool → (B, N) number of 4-neighbours that are True."""
    m = mask.view(-1, gh, gw).float()
    out = torch.zeros_like(m)
    out[:, 1:, :] += m[:, :-1, :]
    out[:, :-1, :] += m[:, 1:, :]
    out[:, :, 1:] += m[:, :, :-1]
    out[:, :, :-1] += m[:, :, 1:]
    return out.view(mask.shape)


def _fix_count(mask: Tensor, count: Tensor, gh: int, gw: int, generator: torch.Generator | None) -> Tensor:
    """Top up or trim each row of ``mask`` to exactly ``count`` (B,) True, keeping blocks compact.

    Missing patches are taken first from unmasked patches next to the mask, surplus ones are
    removed first from masked patches on the mask's edge; ties are broken at random.
    """
    B, n = mask.shape
    noise = torch.rand(B, n, generator=generator, device=mask.device)
    nb = _neighbour_count(mask, gh, gw)
    # order: masked patches first (most interior first), then unmasked (most adjacent first)
    score = mask.float() * 10.0 + nb + noise * 0.5
    return _first(score.argsort(dim=1, descending=True), count)


def _block_count(
    batch: int,
    gh: int,
    gw: int,
    count: int | Tensor,
    min_patches: int,
    max_patches: int | None,
    aspect: tuple[float, float],
    generator: torch.Generator | None,
    max_rounds: int | None = None,
) -> Tensor:
    """(B, gh·gw) bool with exactly ``count`` True per row (an int, or (B,) each row's), built
    from random rectangles."""
    n = gh * gw
    dev = _gen_device(generator)
    mask = torch.zeros(batch, gh, gw, dtype=torch.bool, device=dev)
    if isinstance(count, Tensor):
        count = count.to(device=dev, dtype=torch.long).clamp(0, n)
        if batch == 0 or not bool(count.any()):
            return mask.view(batch, n)
    elif count == 0 or batch == 0:
        return mask.view(batch, n)
    elif count >= n:
        return torch.ones(batch, n, dtype=torch.bool, device=dev)
    else:
        count = torch.full((batch,), count, dtype=torch.long, device=dev)
    rows = torch.arange(gh, device=dev).view(1, gh, 1)
    cols = torch.arange(gw, device=dev).view(1, 1, gw)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    cap = count if max_patches is None else count.clamp(max=max_patches).clamp(min=1)
    have = torch.zeros(batch, dtype=torch.long, device=dev)
    rounds = 64 if max_rounds is None else max_rounds  # rows converge in < 48 rounds in practice
    for _ in range(rounds):
        remaining = count - have
        # block area ~ U[min(min_patches, remaining), min(cap, remaining)] (BEiT's rule, made to
        # work when fewer than min_patches remain or the grid is small)
        hi = torch.minimum(remaining, cap).clamp(min=1).float()
        lo = torch.minimum(torch.full_like(hi, float(min_patches)), hi)
        r = torch.rand(batch, 4, generator=generator, device=dev)
        area = lo + (hi - lo) * r[:, 0]
        ar = torch.exp(log_lo + (log_hi - log_lo) * r[:, 1])
        bh = torch.sqrt(area * ar).round().clamp(1, gh).long()
        bw = torch.sqrt(area / ar).round().clamp(1, gw).long()
        top = (r[:, 2] * (gh - bh + 1)).floor().long().clamp(max=gh - 1)
        left = (r[:, 3] * (gw - bw + 1)).floor().long().clamp(max=gw - 1)
        top, left, bh, bw = (t.view(batch, 1, 1) for t in (top, left, bh, bw))
        block = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
        new = block & ~mask
        delta = new.flatten(1).sum(1)
        accept = (delta > 0) & (have + delta <= count)
        mask |= new & accept.view(batch, 1, 1)
        have = have + torch.where(accept, delta, torch.zeros_like(delta))
        if bool((have >= count).all()):
            break
    mask = mask.view(batch, n)
    if bool((have != count).any()):
        mask = _fix_count(mask, count, gh, gw, generator)
    return mask


def block_mask(
    batch: int,
    grid: int | Sequence[int],
    ratio: float,
    min_patches: int = 4,
    max_patches: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """BEiT-style blockwise mask, (B, N) bool, exactly ``num_masked(N, ratio)`` True per row.

    Rectangles of random area (``min_patches`` … remaining count, at most ``max_patches``) and
    log-uniform aspect ratio in ``aspect`` are added while they do not overshoot the target;
    rectangles are clipped to the grid, so tiny grids work. Rows that end short are topped up
    with patches adjacent to the mask (random tie-breaks).
    """
    gh, gw = grid_shape(grid)
    if min_patches < 1:
        raise ValueError(f"min_patches must be >= 1, got {min_patches}")
    if not 0 < aspect[0] <= aspect[1]:
        raise ValueError(f"aspect must satisfy 0 < lo <= hi, got {aspect}")
    mask = _block_count(batch, gh, gw, num_masked(gh * gw, ratio), min_patches, max_patches,
                        (float(aspect[0]), float(aspect[1])), generator)
    return mask.to(device) if device is not None else mask


def mix_visible(
    batch: int,
    grid: int | Sequence[int],
    kind: str = "block",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Visible sets for the two-image mixed input, (B, N) bool, True = visible.

    ``batch`` must be even; sample ``b`` and sample ``b + B/2`` share one canvas. Every row has
    exactly ``K = N // 2`` visible patches and partners' visible sets are disjoint: sample ``b``
    sees the unmasked part of a ``kind`` mask hiding ``N − K`` patches, its partner sees the
    hidden part (minus one random position when N is odd). ``~visible`` is each sample's mask.
    """
    if batch % 2:
        raise ValueError(f"mix_visible needs an even batch, got {batch}")
    gh, gw = grid_shape(grid)
    n = gh * gw
    k = n // 2
    half = batch // 2
    if kind == "block":
        hidden = _block_count(half, gh, gw, n - k, 4, None, (0.3, 1 / 0.3), generator)
    elif kind == "random":
        hidden = _random_count(half, n, n - k, generator)
    else:
        raise ValueError(f"kind must be 'block' or 'random', got {kind!r}")
    first = ~hidden
    second = hidden
    if n - k > k:  # odd N: drop one random position from the partner's set
        noise = torch.rand(half, n, generator=generator, device=hidden.device)
        noise = noise.masked_fill(~hidden, -1.0)
        drop = noise.argmax(dim=1, keepdim=True)
        second = hidden.clone()
        second.scatter_(1, drop, False)
    visible = torch.cat([first, second], dim=0)
    return visible.to(device) if device is not None else visible


def visible_count(views_cfg, num_patches: int) -> int:
    """Patches every mask of the recipe's views (``views_cfg``) shows per row: half the grid in
    the mixed input; masks whose rows differ (:func:`mask_counts`) are read as the ``fill`` input
    keeps them, every token (a mask token in place of each hidden patch), so this is the grid."""
    if views_cfg.input_mode == "mix":
        return num_patches // 2
    if views_cfg.mask.varies:
        return num_patches
    return num_patches - num_masked(num_patches, views_cfg.mask.ratio_range[0])


def mask_counts(rows: int, num_patches: int, mask_cfg, generator: torch.Generator | None = None) -> Tensor:
    """(rows,) long: the patches each of ``rows`` masked-view images hides, as DINOv2 assigns them
    to a batch: ``⌊rows · probability⌋`` images are masked, the i-th of them at a share drawn
    uniformly in the i-th of as many equal parts of ``[lo, hi]`` (so the shares spread over the
    whole range), ``num_masked`` of the grid; the others hide none; then the rows are shuffled.
    Drawn from ``generator`` on the CPU."""
    lo, hi = mask_cfg.ratio_range
    masked = min(rows, math.floor(rows * mask_cfg.probability + 1e-9))
    edges = torch.linspace(lo, hi, masked + 1, dtype=torch.float64)
    ratios = edges[:-1] + (edges[1:] - edges[:-1]) * torch.rand(masked, generator=generator, dtype=torch.float64)
    counts = torch.zeros(rows, dtype=torch.long)
    counts[:masked] = torch.floor(ratios * num_patches + 0.5 + 1e-9).long().clamp(max=num_patches)
    return counts[torch.randperm(rows, generator=generator)]


def draw_visible(views_cfg, batch_size: int, grid: tuple[int, int], generator: torch.Generator | None = None,
                 counts: Tensor | None = None) -> Tensor:
    """A (B, N) bool visible set of the recipe's mask, drawn on the host (from ``generator``, torch's
    global CPU generator when None). ``counts``: (B,) patches each row hides, when the mask varies
    (drawn here, :func:`mask_counts`, when not given)."""
    m, g = views_cfg.mask, generator
    if views_cfg.input_mode == "mix":
        return mix_visible(batch_size, grid, kind=m.kind, generator=g)
    gh, gw = grid_shape(grid)
    if not m.varies:
        ratio = m.ratio_range[0]
        if m.kind == "block":
            return ~block_mask(batch_size, grid, ratio, min_patches=m.min_block, generator=g)
        return ~random_mask(batch_size, grid, ratio, generator=g)
    if counts is None:
        counts = mask_counts(batch_size, gh * gw, m, g)
    if m.kind == "block":
        return ~_block_count(batch_size, gh, gw, counts, m.min_block, None, (0.3, 1 / 0.3), g)
    return ~_random_count(batch_size, gh * gw, counts, g)


def draw_masks(views_cfg, batch_size: int, grid: tuple[int, int], views: Sequence[int],
               generator: torch.Generator | None = None) -> dict[int, Tensor]:
    """The visible sets of the masked ``views`` of a batch, ``{view: (B, N) bool}``, drawn on the
    host in the order of ``views``. Masks that vary are assigned over every masked-view image of
    the batch together (:func:`mask_counts` over ``len(views) · B`` rows), as DINOv2 assigns them
    over both global crops."""
    if not views_cfg.mask.varies or views_cfg.input_mode == "mix":
        return {v: draw_visible(views_cfg, batch_size, grid, generator) for v in views}
    gh, gw = grid_shape(grid)
    counts = mask_counts(len(views) * batch_size, gh * gw, views_cfg.mask, generator).view(len(views), batch_size)
    return {v: draw_visible(views_cfg, batch_size, grid, generator, counts[k]) for k, v in enumerate(views)}
