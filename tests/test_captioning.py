"""The captioning target: the token cross-entropy against its formula (float64, a hand-written
log-sum-exp per token), the caption's tokens as the host stages them (teacher forcing: each
position reads the token before and predicts its own; padding and captionless rows count for
nothing), the text decoder's masks (causal rows, parallel rows that read no token), and the
`coca` recipe's term equal to the formula on its own outputs."""
from __future__ import annotations

import math

import pytest
import torch

from m3i.config import ConfigError, load_recipe
from m3i.encoders.text import load_minilm_tokenizer
from m3i.estimators.tokens import token_cross_entropy
from m3i.objective import Objective

pytestmark = pytest.mark.usefixtures("one_thread")


def ref_tokens(pred, table, bias, target, weights):
    """Σ_r w_r (log Σ_v exp(ℓ_rv) − ℓ_r,target(r)) / Σ_r w_r,  ℓ_rv = pred_r · table_v + bias_v;
    float64, one token at a time."""
    total, count = pred.new_zeros((), dtype=torch.float64), 0
    for r in range(pred.shape[0]):
        if not bool(weights[r]):
            continue
        logits = table.double() @ pred[r].double() + (0.0 if bias is None else bias.double())
        top = logits.max().detach()
        total = total + top + torch.log(torch.exp(logits - top).sum()) - logits[int(target[r])]
        count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("rows,dim,vocab,with_bias", [(5, 4, 7, True), (23, 8, 50, False), (40, 16, 300, True)])
def test_token_cross_entropy_and_its_gradients_are_the_formula(rows, dim, vocab, with_bias):
    g = torch.Generator().manual_seed(rows)
    pred = torch.randn(rows, dim, generator=g).requires_grad_()
    table = torch.randn(vocab, dim, generator=g).requires_grad_()
    bias = torch.randn(vocab, generator=g).requires_grad_() if with_bias else None
    target = torch.randint(0, vocab, (rows,), generator=g)
    weights = torch.rand(rows, generator=g) < 0.7
    got = token_cross_entropy(pred, table, bias, target, weights)
    ref = ref_tokens(pred, table, bias, target, weights)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    params = [pred, table] + ([bias] if with_bias else [])
    for a, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a.double(), w.double(), rtol=1e-4, atol=1e-6)


SMALL = ["data.batch_size=8", "terms.0.target_encoder.tower=scratch", "terms.0.target_encoder.width=16",
         "terms.0.target_encoder.depth=1", "terms.0.target_encoder.heads=2", "terms.0.target_encoder.trainable=true",
         "terms.1.decoder.width=32", "terms.1.decoder.heads=2", "terms.1.decoder.depth=2", "terms.1.decoder.max_length=8"]
CAPTIONS = [None, "crossed swords", "a face with tears of joy and many more words", None, "ear of rice", "cat", "", "dog"]


def coca(*extra: str) -> Objective:
    torch.manual_seed(0)
    return Objective(load_recipe("coca", overrides=SMALL + list(extra)))


def images(seed: int, n: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_the_host_stages_teacher_forcing_from_the_towers_tokenizer():
    obj = coca()
    term = obj.terms[1]
    staged = term.target.stage(term, type("B", (), {"captions": CAPTIONS})())
    tok = load_minilm_tokenizer(8)  # the text towers' own tokenizer, cut at 8
    pad = tok.token_to_id("[PAD]")
    for i, caption in enumerate(CAPTIONS):
        ids = tok.encode(caption or "").ids
        ids = ids + [pad] * (8 - len(ids))  # the target pads every caption to the same length
        assert staged["inputs"][i].tolist() == ids[:-1]   # [CLS], then each token before the one predicted
        assert staged["targets"][i].tolist() == ids[1:]   # the caption's tokens, then [SEP]
        counted = [t != pad for t in ids[1:]] if caption is not None else [False] * 7
        assert staged["weights"][i].tolist() == counted
    assert staged["avail"].tolist() == [c is not None for c in CAPTIONS]
    assert staged["targets"][2, -1] == tok.token_to_id("[SEP]")  # a long caption is cut, its end kept
    assert not staged["parallel"].any()  # coca: teacher forcing only


def test_the_share_predicted_in_parallel_is_drawn_on_the_host():
    obj = coca("terms.1.target.parallel=0.75")
    term = obj.terms[1]
    torch.manual_seed(5)
    drawn = term.target.stage(term, type("B", (), {"captions": ["a cat"] * 4000})())["parallel"]
    assert drawn.dtype == torch.bool and abs(float(drawn.float().mean()) - 0.75) < 0.03
    every = coca("terms.1.target.parallel=1.0").terms[1]
    assert every.target.stage(every, type("B", (), {"captions": ["a cat"] * 5})())["parallel"].all()


def test_the_decoder_is_causal_and_a_parallel_row_reads_no_token():
    obj = coca()
    dec = obj.terms[1].decoder
    with torch.no_grad():
        dec.head.weight.normal_()  # started at zero (CapPa): give the outputs something to show
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, 2000, (3, 7), generator=g)
    context = torch.randn(3, 5, 128, generator=g)
    out = dec(ids, context)
    changed = ids.clone()
    changed[:, 4] += 1
    again = dec(changed, context)
    torch.testing.assert_close(again[:, :4], out[:, :4])     # a position never reads a later token
    assert (again[:, 4:] - out[:, 4:]).abs().amax(dim=(0, 2)).min() > 1e-4
    parallel = torch.tensor([True, False, True])
    p1, p2 = dec(ids, context, parallel), dec(changed, context, parallel)
    torch.testing.assert_close(p1[parallel], p2[parallel])   # every input a mask token
    torch.testing.assert_close(p1[~parallel], out[~parallel])
    assert (p1[0, 0] - out[0, 0]).abs().max() > 1e-4         # and each attends to all of them
    moved = dec(ids, torch.randn(3, 5, 128, generator=g))     # it reads the image
    assert (moved - out).abs().amax(dim=(1, 2)).min() > 1e-4


def test_the_captioning_term_is_the_token_cross_entropy_of_its_outputs():
    obj = coca("terms.1.target.parallel=0.5")
    term = obj.terms[1]
    batch = {"image": images(1), "label": torch.full((8,), -1), "caption": CAPTIONS}
    staged = obj.stage(batch, torch.device("cpu"))
    views = obj.views_of(staged)
    out = obj(staged, views)
    # the output layer starts at zero (CapPa): every token of the vocabulary equally likely
    assert float(out.terms["captioning"].detach()) == pytest.approx(math.log(30522), rel=1e-6)
    with torch.no_grad():
        term.decoder.head.weight.normal_(std=0.1)
        term.decoder.head.bias.normal_()
    out = obj(staged, views)
    emb = term.embed(obj.context(staged, views), 0, 0)
    ref = ref_tokens(emb.pred.detach(), term.decoder.head.weight.detach(), term.decoder.head.bias.detach(),
                     emb.target, emb.avail)
    torch.testing.assert_close(out.terms["captioning"].double(), ref, rtol=1e-5, atol=1e-6)
    assert int(out.samples["captioning"]) == 6 and emb.pred.shape == (8 * 7, 32)
    out.loss.backward()
    assert float(term.decoder.blocks[0].cross.kv.weight.grad.abs().max()) > 0  # through the image's tokens
    assert any(float(p.grad.abs().max()) > 0 for p in obj.backbone.parameters())


def test_captioning_parts_that_do_not_fit_are_refused_naming_the_field():
    term = "terms.1={name: c, target: {kind: captioning}, target_encoder: {kind: tokenizer}, decoder: {kind: text}, "
    with pytest.raises(ConfigError, match=r"estimator\.kind: a 'captioning' target is a caption's tokens, each scored "
                                          r"against every token of the vocabulary; it takes 'tokens', got 'boltzmann'"):
        load_recipe("clip", overrides=[term + "estimator: {kind: boltzmann}}"])
    with pytest.raises(ConfigError, match=r"decoder\.kind: a 'captioning' target .* needs the 'text' decoder"):
        load_recipe("clip", overrides=[term.replace("{kind: text}", "{kind: global}") + "estimator: {kind: tokens}}"])
    with pytest.raises(ConfigError, match=r"target_encoder\.kind: a 'captioning' target needs 'tokenizer', got 'text'"):
        load_recipe("clip", overrides=[term.replace("{kind: tokenizer}", "{kind: text}") + "estimator: {kind: tokens}}"])
    with pytest.raises(ConfigError, match=r"target\.parallel: Input should be less than or equal to 1"):
        load_recipe("coca", overrides=["terms.1.target.parallel=1.5"])
    with pytest.raises(ConfigError, match=r"terms\.0\.decoder\.kind: a 'caption' target \(one global target per image\) "
                                          r"needs the 'global'"):
        load_recipe("clip", overrides=["terms.0.decoder={kind: text}"])
