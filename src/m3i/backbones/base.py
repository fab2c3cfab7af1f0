"""The one backbone interface every encoder f_θ answers to."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import debug


@dataclass
class Features:
    """What a backbone returns.

    pooled: (B, D) image representation.
    tokens: (B, K, D) final-norm tokens at the visible positions (ascending), all N if none hidden.
    layers: outputs of the last ``return_layers`` blocks at the same positions, before the final norm.
    filled: with ``mode="fill"``, (B, N, D) final-norm tokens at every position, the hidden ones
        computed from the mask token (iBOT's predictions at the masked patches); else None.
    """

    pooled: Tensor
    tokens: Tensor
    layers: list[Tensor] = field(default_factory=list)
    filled: Tensor | None = None


class Backbone(nn.Module):
    """Base class: subclasses set the attributes below and implement ``forward_features``."""

    embed_dim: int
    grid_size: tuple[int, int]
    patch_size: int
    in_chans: int
    img_size: int
    supports_drop: bool = True  # can compute only the visible tokens (input mode "drop")
    # the input modes of masked views (m3i.config.ViewsCfg.input_mode) the backbone takes
    input_modes: tuple[str, ...] = ("drop", "mix", "fill")
    frozen_patch_embed: bool = False  # the patch embedding (stem) is not trained

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward_features(
        self, x: Tensor, visible: Tensor | None = None, mode: str = "drop", return_layers: int = 0,
        count: int | None = None,
    ) -> Features:
        """``count``: the number of True per row of ``visible`` when the caller knows it (the
        backbone then reads nothing back to the host: `visible_indices`)."""
        raise NotImplementedError

    def forward(self, x: Tensor, visible: Tensor | None = None, mode: str = "drop") -> Tensor:
        return self.forward_features(x, visible, mode).pooled

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError

    def use_channels_last(self) -> None:
        """Keep images and convolution weights in the channels-last memory format (what a GPU's
        convolution kernels run fastest on); token backbones have nothing to change."""

    def stem_module(self) -> nn.Module:
        """The patch embedding: the layers that turn pixels into the first features."""
        raise NotImplementedError

    def freeze_patch_embed(self, frozen: bool = True) -> None:
        """Keep the patch embedding at its initial (or loaded) weights (MoCo v3, SIM), or train it
        again (``frozen=False``). Its parameters get ``requires_grad=False``, which ``deepcopy``,
        ``.to()`` and ``load_state_dict`` keep; the optimiser groups of training and fine-tuning
        leave such parameters out (their layer ids are unchanged). A batch norm in the stem still
        normalises with batch statistics in training and tracks its running averages."""
        self.frozen_patch_embed = bool(frozen)
        self.stem_module().requires_grad_(not frozen)

    @property
    def num_layers(self) -> int:
        """Depth levels for layer-wise learning-rate decay: the stem (0), one per block, and
        everything after the last block (``num_layers``, the level a classification head joins)."""
        raise NotImplementedError

    def layer_id(self, name: str) -> int:
        """The depth level, in ``[0, num_layers]``, of the parameter called ``name``."""
        raise NotImplementedError


def reads_values(count: int | None) -> bool:
    """Whether a backbone checks ``visible`` by its values: when the caller gave no ``count`` (the
    values are read anyway) or in debug mode."""
    return count is None or debug.enabled()


def visible_indices(visible: Tensor, count: int | None = None) -> Tensor:
    """(B, N) bool with K True per row -> (B, K) long indices in ascending order.

    ``count``: K when the caller knows it (from the mask's configuration): nothing is read back
    to the host (the rows are checked only in debug mode, :mod:`m3i.debug`). Without it K is
    read from ``visible``, which waits for the device. ``count`` = N (every patch): every position,
    in order, hidden ones included (the ``fill`` input of masks whose rows hide different numbers)."""
    if count is not None and count == visible.shape[1]:
        return torch.arange(count, device=visible.device).expand(visible.shape[0], count)
    if reads_values(count):
        counts = visible.sum(1)
        if visible.shape[0] and not bool((counts == (counts[0] if count is None else count)).all()):
            want = "the same number of patches" if count is None else f"{count} patches"
            raise ValueError(f"every row of `visible` must show {want}, got {counts.tolist()}")
        if count is None:
            count = int(counts[0]) if visible.shape[0] else 0
    # a stable sort puts the True positions first in their original order
    order = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)
    return order[:, :count]
