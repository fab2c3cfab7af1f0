"""The sigmoid estimator (SigLIP) against its formula, written here in float64 with explicit loops:
every pair (i, j) of the batch a binary problem, positive on the diagonal, with a temperature t
and a bias b; the negative log-likelihood summed over a row's pairs and averaged over the rows
that carry a caption (SigLIP's normalisation). Then the `siglip` recipe's term: SigLIP's initial
temperature and bias, both learned, and its loss on its own embeddings."""
from __future__ import annotations

import math

import pytest
import torch

from m3i.config import ConfigError, load_recipe
from m3i.estimators.sigmoid import Sigmoid, SigmoidCfg, batch_sigmoid
from m3i.objective import Objective

pytestmark = pytest.mark.usefixtures("one_thread")


def ref_sigmoid(img, txt, avail, t, b):
    """(1 / |A|) Σ_{i∈A} Σ_{j∈A} log(1 + exp(−s_ij (t·x_i·y_j + b))), s_ij = +1 if i = j else −1,
    A the rows with a caption; float64, one pair at a time."""
    rows = [i for i in range(img.shape[0]) if bool(avail[i])]
    total = img.new_zeros((), dtype=torch.float64)
    for i in rows:
        for j in rows:
            z = t * (img[i].double() * txt[j].double()).sum() + b
            s = 1.0 if i == j else -1.0
            total = total + torch.log1p(torch.exp(-s * z))
    return total / max(len(rows), 1)


CASES = [  # (rows, width, t, b, rows without a caption)
    (3, 4, 10.0, -10.0, ()),
    (8, 16, 10.0, -10.0, (0, 5)),
    (17, 5, 1.3, 0.5, (2, 3, 16)),
    (6, 32, 25.0, -3.0, (1,)),
]


@pytest.mark.parametrize("b_rows,dim,t,b,missing", CASES)
def test_the_loss_and_its_gradients_are_the_formulas(b_rows, dim, t, b, missing):
    g = torch.Generator().manual_seed(b_rows * 7 + dim)
    img = torch.nn.functional.normalize(torch.randn(b_rows, dim, generator=g), dim=1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(b_rows, dim, generator=g), dim=1).requires_grad_()
    scale, bias = torch.tensor(t, requires_grad=True), torch.tensor(b, requires_grad=True)
    avail = torch.ones(b_rows, dtype=torch.bool)
    avail[list(missing)] = False
    got = batch_sigmoid(img, txt, avail, scale, bias)
    ref = ref_sigmoid(img, txt, avail, scale.double(), bias.double())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(got, [img, txt, scale, bias])
    want = torch.autograd.grad(ref, [img, txt, scale, bias])
    for name, a, w in zip(("image", "text", "t", "b"), grads, want):
        torch.testing.assert_close(a.double(), w.double(), rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    # a row without a caption takes part in no pair: no gradient reaches it
    for i in missing:
        assert float(grads[0][i].abs().max()) == 0 and float(grads[1][i].abs().max()) == 0


def test_no_caption_in_the_batch_gives_zero_and_finite_gradients():
    img, txt = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    loss = batch_sigmoid(img, txt, torch.zeros(4, dtype=torch.bool), torch.tensor(10.0), torch.tensor(-10.0))
    loss.backward()
    assert float(loss.detach()) == 0 and torch.isfinite(img.grad).all() and float(img.grad.abs().max()) == 0


def test_the_estimator_normalises_and_holds_its_learned_bias():
    est = Sigmoid(SigmoidCfg(kind="sigmoid", bias=-4.0))
    assert isinstance(est.bias, torch.nn.Parameter) and float(est.bias.detach()) == -4.0 and est.bias.ndim == 0
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(5, 6, generator=g) * 3, torch.randn(5, 6, generator=g) * 0.2
    avail = torch.tensor([True, True, False, True, True])
    got = est.paired(pred, target, avail, torch.tensor(0.1))
    norm = lambda x: x.double() / x.double().norm(dim=1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(got.double(), ref_sigmoid(norm(pred), norm(target), avail, 10.0, -4.0), rtol=1e-5, atol=1e-6)
    # the bias handed in (read through gradient accumulation's share) is the one used
    shifted = est.paired(pred, target, avail, torch.tensor(0.1), bias=torch.tensor(1.0))
    torch.testing.assert_close(shifted.double(), ref_sigmoid(norm(pred), norm(target), avail, 10.0, 1.0), rtol=1e-5, atol=1e-6)
    fixed = Sigmoid(SigmoidCfg(kind="sigmoid", learn_bias=False))
    assert not any(True for _ in fixed.parameters()) and float(fixed.bias) == -10.0


SMALL = ["backbone.name=vit_nano", "backbone.depth=2", "data.batch_size=8", "terms.0.target_encoder.tower=scratch",
         "terms.0.target_encoder.width=16", "terms.0.target_encoder.depth=1", "terms.0.target_encoder.heads=2",
         "terms.0.target_encoder.trainable=true"]


def test_the_siglip_term_starts_at_siglips_temperature_and_bias_and_is_the_formula():
    recipe = load_recipe("siglip", overrides=SMALL)
    torch.manual_seed(0)
    obj = Objective(recipe)
    term = obj.terms[0]
    # t' = log 10 and b = −10, both learned, neither decayed
    assert float(term.log_scale.detach()) == pytest.approx(math.log(10.0)) and isinstance(term.log_scale, torch.nn.Parameter)
    assert float(term.estimator.bias.detach()) == -10.0
    no_decay = {id(p) for p in obj.param_groups(0.1)[1]["params"]}
    assert id(term.estimator.bias) in no_decay and "terms.0.estimator.bias" in obj.checkpoint_state()
    with torch.no_grad():
        term.log_scale.fill_(math.log(7.0))
        term.estimator.bias.fill_(-2.5)
    g = torch.Generator().manual_seed(1)
    captions = [None, "a red apple", "two cats", None, "a small boat", "a tree", "an old key", "a blue car"]
    batch = {"image": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
             "label": torch.full((8,), -1), "caption": captions}
    staged = obj.stage(batch, torch.device("cpu"))
    views = obj.views_of(staged)
    out = obj(staged, views)
    emb = term.embed(obj.context(staged, views), 0, 0)
    norm = lambda x: x.double() / x.double().norm(dim=1, keepdim=True)  # noqa: E731
    avail = torch.tensor([c is not None for c in captions])
    ref = ref_sigmoid(norm(emb.pred.detach()), norm(emb.target.detach()), avail, 7.0, -2.5)
    torch.testing.assert_close(out.terms["caption"].double(), ref, rtol=1e-5, atol=1e-6)
    assert int(out.samples["caption"]) == 6
    out.loss.backward()
    assert float(term.estimator.bias.grad.abs()) > 0 and float(term.log_scale.grad.abs()) > 0


def test_a_sigmoid_setting_of_another_kind_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"terms\.0\.estimator\.bias: unknown key \(not a setting of kind 'boltzmann'\)"):
        load_recipe("clip", overrides=["terms.0.estimator.bias=-10"])
    with pytest.raises(ConfigError, match=r"terms\.0\.estimator\.candidates: unknown key \(not a setting of kind 'sigmoid'\)"):
        load_recipe("siglip", overrides=["terms.0.estimator.candidates=batch"])
    with pytest.raises(ConfigError, match=r"estimator\.kind: a 'label' target is a category scored against the table of "
                                          r"every class; it takes 'boltzmann', got 'sigmoid'"):
        load_recipe("supervised", overrides=["terms.0.estimator={kind: sigmoid}"])
