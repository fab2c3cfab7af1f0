"""``m3i eval --task captions``: what a captioning term learned.

Two readings of the term's text decoder on a data set's test images:

- captions generated greedily (the most likely token at each step, from [CLS] to [SEP]) for a few
  images, beside their true caption or class name;
- zero-shot classification by caption likelihood: each image is given the class whose prompt
  (the one contrastive zero-shot uses, ``a <class name>``) the decoder finds most likely,
  log p(prompt | image) summed over its tokens, as CapPa scores classes. Where the recipe also has
  a caption term (CoCa, the all-in-one recipe), its contrastive zero-shot score is reported beside.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from .. import runs
from ..device import autocast_for, resolve_device, resolve_precision
from ..objective import Objective
from ..targets.captioning import Captioning
from ..terms import Term
from . import metrics
from .run import EvalSet, class_prompts, load_evalset, score

SHOW = 8  # images whose captions are generated


def captioning_term(obj: Objective) -> Term:
    """The objective's captioning term (the first one); ValueError when it has none."""
    term = next((t for t in obj.terms if isinstance(t.target, Captioning)), None)
    if term is None:
        raise ValueError(f"--task captions: this checkpoint's recipe ({obj.recipe.name}) has no captioning target; "
                         f"captions need a recipe with one (coca, m3i-one)")
    return term


def image_context(obj: Objective, images: Tensor) -> Tensor:
    """uint8 images -> the tokens the decoder attends to, as in training (pooled, then patches)."""
    return Captioning.context(obj.backbone.forward_features(obj.normalize(images)))


@torch.no_grad()
def generate(obj: Objective, term: Term, images: Tensor) -> list[str]:
    """Greedy captions of uint8 images (B, 3, S, S), at most the decoder's positions long."""
    tok = Captioning.tokenizer(term.cfg)
    return [tok.decode(row, skip_special_tokens=True) for row in generate_ids(obj, term, images).tolist()]


@torch.no_grad()
def generate_ids(obj: Objective, term: Term, images: Tensor) -> Tensor:
    """(B, 1 + n) token ids: [CLS], then the most likely token at each step until every row has
    ended ([SEP], then [PAD]) or the decoder's positions are used up."""
    tok = Captioning.tokenizer(term.cfg)
    start, end, pad = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    dev = next(obj.parameters()).device
    context = image_context(obj, images.to(dev))
    ids = torch.full((len(images), 1), start, dtype=torch.long, device=dev)
    done = torch.zeros(len(images), dtype=torch.bool, device=dev)
    for _ in range(term.decoder.positions):
        hidden = term.decoder(ids, context)
        nxt = term.decoder.head(hidden[:, -1]).argmax(-1)
        nxt = torch.where(done, pad, nxt)
        ids = torch.cat([ids, nxt.unsqueeze(1)], dim=1)
        done |= nxt == end
        if bool(done.all()):
            break
    return ids


@torch.no_grad()
def log_likelihoods(obj: Objective, term: Term, images: Tensor, texts: list[str], batch: int = 4096,
                    progress: bool = False) -> Tensor:
    """(N, T): log p(text | image) of every uint8 image and text, summed over the text's tokens
    and its [SEP] (teacher forcing, as the term trains); ``batch``: sequences per decoder call."""
    dev = next(obj.parameters()).device
    tokens = term.target.tokens(term.cfg, texts)
    n = int(tokens["weights"].any(0).nonzero().max()) + 1  # the decoder is causal: later positions change nothing
    inputs, targets, weights = (tokens[k][:, :n].to(dev) for k in ("inputs", "targets", "weights"))
    t = len(texts)
    per = max(1, batch // t)
    out = []
    for i in tqdm(range(0, len(images), per), desc="caption likelihood", disable=not progress, leave=False):
        context = image_context(obj, images[i:i + per].to(dev))
        b = context.shape[0]
        hidden = term.decoder(inputs.repeat(b, 1), context.repeat_interleave(t, dim=0))
        logp = torch.log_softmax(term.decoder.head(hidden).float(), dim=-1)
        picked = logp.gather(-1, targets.repeat(b, 1).unsqueeze(-1)).squeeze(-1)
        out.append((picked * weights.repeat(b, 1)).sum(1).view(b, t).cpu())
    return torch.cat(out)


def score_captions(obj: Objective, data: EvalSet, show: int = SHOW, progress: bool = True) -> dict:
    """Captions of the first ``show`` test images beside their truth, and (a labelled set) the
    caption-likelihood zero-shot score, with the contrastive one where the recipe has a caption term."""
    term = captioning_term(obj)
    images, labels, captions = data.test
    names = [data.classes[int(y)] if data.classes and int(y) >= 0 else None for y in labels[:show]]
    truth = [c if c else name for c, name in zip(captions[:show], names)]
    shown = [{"generated": g, "true": t} for g, t in zip(generate(obj, term, images[:show]), truth)]
    out = {"task": "captions", "dataset": data.dataset, "captions": shown, "metrics": {}, "n_test": int(len(labels))}
    if len(data.classes) >= 2:
        scores = log_likelihoods(obj, term, images, class_prompts(data.classes), progress=progress)
        out["metrics"].update({f"caption_{k}": v for k, v in metrics.topk_accuracy(scores, labels).items()})
        if obj.caption_term() is not None:
            zs = score(obj, "zeroshot", data, progress)["metrics"]
            out["metrics"].update({f"contrastive_{k}": v for k, v in zs.items()})
    return out


def evaluate_captions(checkpoint: str | Path, dataset: str, device: str | None = None, limit: int | None = None,
                      split: str = "test", show: int = SHOW, out: Path | None = None, progress: bool = True,
                      verbose: bool = True) -> dict:
    """``m3i eval --task captions``: print the captions and the scores; ``out``: also write the
    captions there, one ``generated<TAB>true`` line per image."""
    dev = resolve_device(device)
    obj = runs.load_run(checkpoint, dev)
    captioning_term(obj)  # before any image is read
    data = load_evalset(dataset, obj.backbone.img_size, with_train=False, limit=limit, progress=progress, split=split)
    with autocast_for(dev, resolve_precision("auto", dev)):
        result = score_captions(obj, data, show, progress)
    result["checkpoint"], result["split"] = str(checkpoint), split
    if out is not None:
        out.write_text("".join(f"{c['generated']}\t{c['true']}\n" for c in result["captions"]))
    if verbose:
        print(f"captions on {dataset}, {split} split ({result['n_test']} {split} images)")
        for c in result["captions"]:
            print(f"  {c['generated']!r:<40} true: {c['true']!r}")
        for k, v in result["metrics"].items():
            print(f"  {k:<18} {v:.4f}")
    return result
