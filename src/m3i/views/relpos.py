"""Positions of one view's patches in another view's patch grid, and their sin-cos embedding.

A view is described by its crop box ``(i, j, h, w)`` in source-image pixels and its flip
(see ``augment``). A position is a 4-vector ``(y, x, s_h, s_w)``: the patch centre in the
*source* view's grid units (source patch centres at the integers ``0 … G−1``, origin at the
source view's top-left patch) and the log-scale of the target view relative to the source,
``s_h = 10·log(h_t / h_s)``, ``s_w = 10·log(w_t / w_s)``. A view's own patches sit at
``(r, c, 0, 0)`` (``absolute_positions``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .masks import grid_shape

__all__ = ["relative_positions", "absolute_positions", "sincos_embed"]


def _grid_centres(n: int, device, dtype) -> Tensor:
    """(n,) normalised centres (k + ½)/n of n cells."""
    return (torch.arange(n, device=device, dtype=dtype) + 0.5) / n


def relative_positions(
    box_s: Tensor,
    flip_s: Tensor | None,
    box_t: Tensor,
    flip_t: Tensor | None,
    grid: int | Sequence[int],
) -> Tensor:
    """Centres of the target view's patches in the source view's grid, plus relative scale.

    Args:
        box_s, box_t: (B, 4) ``(i, j, h, w)`` crop boxes of the source and target views, in
            source-image pixels.
        flip_s, flip_t: (B,) bool horizontal flips of the views (None = not flipped).
        grid: the patch grid ``G`` or ``(gh, gw)`` of both views.

    Returns:
        (B, N, 4) float, N = gh·gw, patches row-major over the target grid: for target patch
        ``(r, c)``, ``(y, x, 10·log(h_t/h_s), 10·log(w_t/w_s))`` where ``(y, x)`` is its centre
        in the source view's grid units. Without flips
        ``y = (h_t/h_s)(r+½) + gh·(i_t−i_s)/h_s − ½`` and likewise for ``x``.
    """
    gh, gw = grid_shape(grid)
    box_s = box_s.float() if not box_s.is_floating_point() else box_s
    box_t = box_t.to(box_s)
    B = box_s.shape[0]
    i_s, j_s, h_s, w_s = (v.view(B, 1) for v in box_s.unbind(-1))
    i_t, j_t, h_t, w_t = (v.view(B, 1) for v in box_t.unbind(-1))
    dev, dt = box_s.device, box_s.dtype

    # horizontal: target patch centre → target-view normalised u → image x → source-view u → grid x
    u = _grid_centres(gw, dev, dt).view(1, gw).expand(B, gw)
    if flip_t is not None:
        u = torch.where(flip_t.to(dev).view(B, 1), 1.0 - u, u)
    x_img = j_t + w_t * u
    u_s = (x_img - j_s) / w_s
    if flip_s is not None:
        u_s = torch.where(flip_s.to(dev).view(B, 1), 1.0 - u_s, u_s)
    x = u_s * gw - 0.5  # (B, gw)

    # vertical: no flips
    v = _grid_centres(gh, dev, dt).view(1, gh)
    y = (i_t + h_t * v - i_s) / h_s * gh - 0.5  # (B, gh)

    yy = y.view(B, gh, 1).expand(B, gh, gw)
    xx = x.view(B, 1, gw).expand(B, gh, gw)
    sh = (10.0 * torch.log(h_t / h_s)).view(B, 1, 1).expand(B, gh, gw)
    sw = (10.0 * torch.log(w_t / w_s)).view(B, 1, 1).expand(B, gh, gw)
    return torch.stack([yy, xx, sh, sw], dim=-1).reshape(B, gh * gw, 4)


def absolute_positions(grid: int | Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """(N, 4) float ``(r, c, 0, 0)`` for the patches of a ``gh × gw`` grid, row-major."""
    gh, gw = grid_shape(grid)
    r = torch.arange(gh, device=device, dtype=torch.float32).view(gh, 1).expand(gh, gw)
    c = torch.arange(gw, device=device, dtype=torch.float32).view(1, gw).expand(gh, gw)
    z = torch.zeros(gh, gw, device=device)
    return torch.stack([r, c, z, z], dim=-1).reshape(gh * gw, 4)


def sincos_embed(pos: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Sin-cos embedding of 4-vector positions.

    Args:
        pos: (..., 4) float positions ``(y, x, s_h, s_w)``.
        dim: output width, divisible by 8.

    Returns:
        (..., dim): for each of the 4 components in order, ``dim/4`` channels
        ``[sin(p·ω_0) … sin(p·ω_{d−1}), cos(p·ω_0) … cos(p·ω_{d−1})]`` with ``d = dim/8`` and
        ``ω_k = 1 / temperature^(2k / (dim/4))``.
    """
    if dim % 8:
        raise ValueError(f"sincos_embed needs dim divisible by 8, got {dim}")
    if pos.shape[-1] != 4:
        raise ValueError(f"positions must be (..., 4), got shape {tuple(pos.shape)}")
    quarter = dim // 4
    half = quarter // 2
    pos = pos.float() if not pos.is_floating_point() else pos
    k = torch.arange(half, device=pos.device, dtype=pos.dtype)
    omega = 1.0 / temperature ** (2.0 * k / quarter)  # (half,)
    angles = pos.unsqueeze(-1) * omega  # (..., 4, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., 4, quarter)
    return emb.flatten(-2)
