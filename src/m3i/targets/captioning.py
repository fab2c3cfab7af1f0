"""The captioning target: an image predicts its caption's tokens (CoCa, CapPa, LocCa).

z is the caption's tokens from the text towers' tokenizer (target encoder ``tokenizer``: the
identity on tokens), g a text decoder reading the online backbone's tokens (decoder ``text``),
p̂ a softmax over the vocabulary at each token (estimator ``tokens``): −log p̂(caption | image), a
generative bound on I(image; text). The decoder is trained by teacher forcing; with
``target.parallel`` a fraction of the samples is predicted in parallel instead (CapPa: every
input token a mask token, every token predicted at once).

The host tokenises each batch's captions to a fixed length when the batch is staged
(:meth:`Captioning.stage`): the step reads nothing back, and a sample without a caption predicts
no token at the same shape.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .base import TARGETS, Embedding, Target, TargetCfg, whole


class CaptioningCfg(TargetCfg):
    kind: Literal["captioning"]
    # the fraction of samples predicted in parallel (CapPa: 0.75); the rest by teacher forcing
    parallel: float = Field(0.0, ge=0.0, le=1.0)


_TOKENIZERS: dict[tuple[str, int], object] = {}


def tokenizer_of(encoder, max_length: int):
    """The target encoder's tokenizer at ``max_length`` tokens a caption (read once per setting)."""
    key = (encoder.model_dump_json(), max_length)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = encoder.build(max_length)
    return _TOKENIZERS[key]


@TARGETS.register
class Captioning(Target):
    kind = "captioning"
    Config = CaptioningCfg
    form = "tokens"
    encoders = ("tokenizer",)
    needs = "captions"

    @classmethod
    def describe(cls, term) -> str:
        p = term.target.parallel
        return "the caption's tokens" + (f" ({p:.0%} predicted in parallel)" if p else "")

    @staticmethod
    def tokenizer(cfg):
        """The term's tokenizer (``cfg``: the term's settings): captions cut and padded to the
        decoder's ``max_length``."""
        return tokenizer_of(cfg.target_encoder, cfg.decoder.max_length)

    def out_dim(self, cfg, backbone):
        return self.tokenizer(cfg).get_vocab_size()

    def tokens(self, cfg, texts: list[str]) -> dict[str, torch.Tensor]:
        """Texts -> the decoder's input ``inputs`` (each token's predecessor, [CLS] first), the tokens it
        predicts ``targets`` (the text's tokens and [SEP]) and ``weights`` (those that are no
        padding), each (N, max_length − 1), on the CPU."""
        tok = self.tokenizer(cfg)
        ids = torch.tensor([e.ids for e in tok.encode_batch(texts)], dtype=torch.long)
        pad = tok.token_to_id("[PAD]")
        return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": ids[:, 1:] != pad}

    def stage(self, term, batch):
        """On the host: every row's tokens (the empty text where there is none), which rows carry a
        caption, and which are predicted in parallel (drawn here, ``target.parallel`` of them)."""
        captions = batch.captions
        avail = torch.tensor([c is not None for c in captions], dtype=torch.bool)
        out = self.tokens(term.cfg, [c if c is not None else "" for c in captions])
        out["weights"] &= avail.unsqueeze(1)
        parallel = term.cfg.target.parallel
        out["parallel"] = torch.rand(len(captions)) < parallel if parallel else torch.zeros(len(captions), dtype=torch.bool)
        return {**out, "avail": avail}

    @staticmethod
    def context(features) -> torch.Tensor:
        """The image tokens the decoder attends to: the pooled token, then the patch tokens."""
        return torch.cat([features.pooled.unsqueeze(1), features.tokens], dim=1)

    def embed(self, term, ctx, s, t):
        staged = ctx.batch.drawn.targets[term.name]
        feats = ctx.online(s, term.cfg.source.masked)
        hidden = term.decoder(staged["inputs"], self.context(feats), staged["parallel"])
        avail = staged["avail"]
        return Embedding(hidden.flatten(0, 1), staged["targets"].flatten(), staged["weights"].flatten(), avail.sum())

    def score(self, term, emb, share=whole):
        head = term.decoder.head
        return term.estimator.tokens(emb.pred, share(head.weight), share(head.bias), emb.target, emb.avail)
