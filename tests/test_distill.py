"""Self-distillation's parts (DINO, iBOT, KoLeo) against their formulas.

Each loss is recomputed here in float64 from the papers' formulas, written independently of the
library: the softmaxes, the pairs of crops, the per-image means over masked patches, Sinkhorn–Knopp
as SwAV's and DINOv2's papers state it (the K × B matrix scaled to total 1, then alternately each
prototype's total to 1/K and each sample's to 1/B), the EMA centre, the nearest neighbours of
KoLeo and the prototype head. Then the whole objective of the ``dino`` and ``dinov2`` recipes is
recomputed from the modules themselves (a ViT run by hand on the mask-token input), losses and
the gradients of every trainable parameter.
"""
from __future__ import annotations

import math

import pytest
import torch

from m3i.config import ConfigError, describe_term, load_recipe
from m3i.decoders.prototypes import PrototypeHead
from m3i.encoders.centred import CentredEMACfg, Centring, sinkhorn_knopp
from m3i.estimators.cross_entropy import crop_cross_entropy, patch_cross_entropy
from m3i.estimators.koleo import koleo
from m3i.objective import Objective
from m3i.targets.dense_distill import masked_positions

from test_equivalence import BASE, assert_same_grads, perturb_teacher

pytestmark = pytest.mark.usefixtures("one_thread")
D64 = torch.float64


# ---------------------------------------------------------------------------- references (float64)
def ref_log_softmax(x):
    top = x.max(-1, keepdim=True).values
    return x - top - (x - top).exp().sum(-1, keepdim=True).log()


def ref_softmax(x):
    return ref_log_softmax(x).exp()


def ref_sinkhorn(scores, tau, iters):
    """SwAV / DINOv2, as their papers write it: Q = exp(s/τ)ᵀ (K × B), Q /= ΣQ; then ``iters`` times
    each row (prototype) to total 1/K and each column (sample) to total 1/B; finally Q·B, so that
    every sample's column totals 1. scores: (B, K)."""
    q = torch.exp(scores.to(D64) / tau).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(1, keepdim=True) / k
        q = q / q.sum(0, keepdim=True) / b
    return (q * b).t()


def ref_teacher(rows, tau_t, centring, center, iters):
    """(R, K) teacher scores -> their target distributions."""
    if centring == "sinkhorn":
        return ref_sinkhorn(rows, tau_t, iters)
    return ref_softmax((rows.to(D64) - center.to(D64)) / tau_t)


def ref_dino(student, teacher, tau_s, tau_t, centring, center, iters=3):
    """student (V, B, K), teacher (G, B, K) scores; crop v ≠ i against teacher crop i, mean over the pairs
    of the mean over the batch of −Σ q log p."""
    g, b, k = teacher.shape
    q = ref_teacher(teacher.reshape(g * b, k), tau_t, centring, center, iters).reshape(g, b, k)
    total, pairs = 0.0, 0
    for i in range(g):
        for v in range(student.shape[0]):
            if v == i:
                continue
            ce = -(q[i] * ref_log_softmax(student[v].to(D64) / tau_s)).sum(-1)
            total, pairs = total + ce.mean(), pairs + 1
    return total / pairs


def ref_ibot(student, teacher, hidden, tau_s, tau_t, centring, center, iters=3):
    """student, teacher (G, B, N, K) scores at every patch; hidden (G, B, N): the masked patches. The
    teacher's distributions over the masked patches of every image; per image the mean over its
    masked patches (0 with none), mean over the G·B images."""
    rows = teacher[hidden]                                     # (P, K): every masked patch
    q = torch.zeros(teacher.shape, dtype=D64)
    q[hidden] = ref_teacher(rows, tau_t, centring, center, iters)
    g, b, n, _ = teacher.shape
    total = 0.0
    for i in range(g):
        for j in range(b):
            m = hidden[i, j]
            if m.any():
                ce = -(q[i, j][m] * ref_log_softmax(student[i, j][m].to(D64) / tau_s)).sum(-1)
                total = total + ce.mean()
    return total / (g * b)


def ref_center(center, rows, momentum):
    return center.to(D64) * momentum + rows.to(D64).mean(0) * (1 - momentum)


def ref_koleo(x, eps=1e-8):
    """−mean_i log(‖x̂_i − x̂_j* + eps‖ + eps), x̂ = x/‖x‖, j* the nearest j ≠ i (torch's pairwise distance)."""
    x = x.to(D64)
    x = x / x.norm(dim=-1, keepdim=True).clamp(min=eps)
    total = 0.0
    for i in range(x.shape[0]):
        dist = [float((x[i] - x[j]).detach().norm()) if j != i else math.inf for j in range(x.shape[0])]
        j = min(range(len(dist)), key=dist.__getitem__)
        total = total - torch.log((x[i] - x[j] + eps).norm() + eps)
    return total / x.shape[0]


def ref_head(head: PrototypeHead, x):
    """MLP (Linear, GELU between), L2-normalise, cosine to every L2-normalised prototype (× scale)."""
    linears = [m for m in head.mlp.modules() if isinstance(m, torch.nn.Linear)]
    for i, lin in enumerate(linears):
        x = x @ lin.weight.t() + lin.bias
        if i < len(linears) - 1:
            x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    x = x / x.norm(dim=-1, keepdim=True)
    w = head.prototypes / head.prototypes.norm(dim=-1, keepdim=True)
    out = x @ w.t()
    return out if head.scale is None else out * head.scale


def cosines(rows, k, generator):
    """Scores as a prototype head gives them (norm_last_layer): cosines in [-1, 1]."""
    rows = rows if isinstance(rows, tuple) else (rows,)
    return torch.rand(*rows, k, generator=generator) * 2 - 1


def centring(mode, k, **kw) -> Centring:
    return Centring(CentredEMACfg(kind="centred_ema", centring=mode, **kw), k)


def close(a, b, rtol=2e-5, atol=1e-6):
    torch.testing.assert_close(a.detach().to(D64), b.detach().to(D64), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------- the parts
@pytest.mark.parametrize("rows,k", [(6, 4), (16, 32), (33, 7)])
@pytest.mark.parametrize("tau", [0.04, 0.1, 0.5])
@pytest.mark.parametrize("iters", [1, 3])
def test_sinkhorn_knopp_is_the_papers_algorithm(rows, k, tau, iters):
    g = torch.Generator().manual_seed(rows * k)
    scores = cosines(rows, k, g)
    got = sinkhorn_knopp(scores, torch.tensor(tau), iters)
    close(got, ref_sinkhorn(scores, tau, iters), rtol=1e-4)
    close(got.sum(-1), torch.ones(rows))  # every sample's distribution totals 1
    # with padding rows (weight 0): the algorithm over the others alone, 0 at the padding
    valid = torch.arange(rows) % 3 != 1
    got = sinkhorn_knopp(scores, tau, iters, valid)
    want = torch.zeros(rows, k, dtype=D64)
    want[valid] = ref_sinkhorn(scores[valid], tau, iters)
    close(got, want, rtol=1e-4)


@pytest.mark.parametrize("mode", ["ema", "sinkhorn"])
@pytest.mark.parametrize("b,g,v,k", [(4, 2, 2, 8), (5, 2, 10, 16), (3, 1, 4, 32), (6, 3, 5, 11)])
@pytest.mark.parametrize("tau_s,tau_t", [(0.1, 0.04), (0.2, 0.07)])
def test_dino_loss_is_the_mean_over_crop_pairs_of_the_cross_entropy(mode, b, g, v, k, tau_s, tau_t):
    gen = torch.Generator().manual_seed(b * 100 + v * 10 + k)
    student = torch.randn(b, v, k, generator=gen, requires_grad=True)
    teacher = cosines((b, g), k, gen)
    c = centring(mode, k, temperature=tau_t, center_momentum=0.8)
    c.center.copy_(torch.randn(k, generator=gen) * 0.3)
    center = c.center.clone()
    loss = crop_cross_entropy(student, c(teacher), tau_s)
    s64 = student.detach().to(D64).requires_grad_()
    want = ref_dino(s64.transpose(0, 1), teacher.transpose(0, 1), tau_s, tau_t, mode, center)
    close(loss, want)
    (g1,), (g2,) = torch.autograd.grad(loss, [student]), torch.autograd.grad(want, [s64])
    close(g1, g2, rtol=1e-4, atol=1e-7)
    # the centre moves after the optimiser step, once, by the batch's mean teacher score
    c.after_step(1)
    if mode == "ema":
        close(c.center, ref_center(center, teacher.reshape(-1, k), 0.8))
    else:
        assert torch.equal(c.center, center)
    assert int(c.step) == 1


@pytest.mark.parametrize("mode", ["ema", "sinkhorn"])
@pytest.mark.parametrize("b,g,n,k,spare", [(4, 2, 16, 8, 0), (5, 2, 9, 16, 3), (3, 1, 25, 32, 25)])
@pytest.mark.parametrize("tau_s,tau_t", [(0.1, 0.04), (0.2, 0.07)])
def test_ibot_loss_is_the_mean_over_images_of_the_mean_over_masked_patches(mode, b, g, n, k, spare, tau_s, tau_t):
    """Masks that hide a different number of patches per image, some none; M positions gathered
    per image (``spare`` more than the most any hides), padded with weight 0."""
    gen = torch.Generator().manual_seed(n * k + b)
    counts = torch.randint(0, n // 2 + 1, (g, b), generator=gen)
    counts[0, 0] = 0
    hidden = torch.stack([torch.stack([torch.randperm(n, generator=gen) < c for c in row]) for row in counts])
    student = torch.randn(g, b, n, k, generator=gen)
    teacher = cosines((g, b, n), k, gen)
    m = min(n, int(counts.max()) + spare)
    idx, valid = masked_positions(~hidden.reshape(g * b, n), m)
    assert valid.sum(1).tolist() == counts.reshape(-1).tolist()

    def gather(x):
        return torch.gather(x.reshape(g * b, n, k), 1, idx.unsqueeze(-1).expand(-1, -1, k)).reshape(g, b, m, k)

    s = gather(student).requires_grad_()
    c = centring(mode, k, temperature=tau_t, center_momentum=0.7)
    c.center.copy_(torch.randn(k, generator=gen) * 0.3)
    center = c.center.clone()
    valid = valid.reshape(g, b, m)
    loss = patch_cross_entropy(s, c(gather(teacher), valid), valid, tau_s)
    s64 = student.to(D64).requires_grad_()
    want = ref_ibot(s64, teacher, hidden, tau_s, tau_t, mode, center)
    close(loss, want)
    (g1,), (g2,) = torch.autograd.grad(loss, [s]), torch.autograd.grad(want, [s64])
    close(g1, gather(g2), rtol=1e-4, atol=1e-7)
    c.after_step(3)
    if mode == "ema":  # the centre of the masked patches' scores
        close(c.center, ref_center(center, teacher[hidden], 0.7))


@pytest.mark.parametrize("rows,dim", [(5, 3), (16, 8), (31, 64)])
def test_koleo_is_the_mean_log_distance_to_the_nearest_neighbour(rows, dim):
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows), requires_grad=True)
    x64 = x.detach().to(D64).requires_grad_()
    loss, want = koleo(x), ref_koleo(x64)
    close(loss, want)
    (g1,), (g2,) = torch.autograd.grad(loss, [x]), torch.autograd.grad(want, [x64])
    close(g1, g2, rtol=1e-4, atol=1e-7)


def test_spread_predictions_score_lower_than_clustered_ones():
    """KoLeo is an entropy estimate: spreading the same points apart lowers the loss."""
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    assert koleo(x) < koleo(x * torch.tensor([1.0, 0.05, 0.05, 0.05]) + torch.tensor([1.0, 0, 0, 0]))


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_prototype_head_is_its_formula_and_its_prototypes_stay_frozen_for_their_steps(norm_last_layer):
    torch.manual_seed(0)
    head = PrototypeHead(12, [20, 24], 8, 30, norm_last_layer=norm_last_layer, freeze_steps=2)
    if head.scale is not None:
        with torch.no_grad():
            head.scale.uniform_(0.5, 2.0)
    x = torch.randn(5, 3, 12)  # patch tokens: any leading shape
    out = head(x)
    close(out, ref_head(head, x.to(D64).float()))
    frozen = [head.prototypes] + ([head.scale] if head.scale is not None else [])
    for step, moves in ((0, False), (1, False), (2, True), (7, True)):
        head.after_step(step)
        head.zero_grad()
        y = head(x)
        assert torch.equal(y, out)  # the same value, frozen or not
        y.square().sum().backward()
        assert all(bool((p.grad.abs().sum() > 0) == moves) for p in frozen), step
        assert float(head.mlp.net[0].weight.grad.abs().sum()) > 0


def test_teacher_temperature_warms_up_linearly_on_the_device():
    c = centring("ema", 4, temperature=0.07, warmup_temperature=0.04, warmup_steps=10)
    for step, tau in ((0, 0.04), (5, 0.055), (10, 0.07), (25, 0.07)):
        c.after_step(step)
        assert float(c.temperature()) == pytest.approx(tau)
    assert float(centring("ema", 4, temperature=0.06).temperature()) == pytest.approx(0.06)


def test_a_skipped_step_keeps_the_centre():
    c = centring("ema", 3, center_momentum=0.5)
    c(torch.ones(2, 3))
    c.after_step(1, skip=torch.tensor(True))
    assert torch.equal(c.center, torch.zeros(3))
    c(torch.ones(2, 3))
    c.after_step(2, skip=torch.tensor(False))
    assert torch.equal(c.center, torch.full((3,), 0.5))
    c.after_step(3)  # no score since: nothing to apply
    assert torch.equal(c.center, torch.full((3,), 0.5))


# ---------------------------------------------------------------------------- the objective
def vit_fill(vit, x, visible):
    """The ViT's mask-token input by hand: hidden patch embeddings replaced by the mask token, the
    class token and positions added, blocks, final norm -> (pooled, every token)."""
    patches = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    patches = torch.where(visible.unsqueeze(-1), patches, vit.mask_token.expand_as(patches))
    seq = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1), patches + vit.pos_embed[:, 1:]], 1)
    for blk in vit.blocks:
        seq = blk(seq)
    out = vit.norm(seq)
    return out[:, 0], out[:, 1:]


def distill_objective(name: str, *extra: str) -> Objective:
    over = BASE + ["terms.0.decoder.hidden=[40]", "terms.0.decoder.bottleneck=16", "terms.0.decoder.prototypes=24",
                   "data.batch_size=6", *extra]
    torch.manual_seed(0)
    obj = Objective(load_recipe(name, overrides=over)).train()
    perturb_teacher(obj)
    with torch.no_grad():  # centres and temperatures off their initial values, the prototypes trained
        for t in obj.terms:
            if hasattr(t, "centring"):
                t.centring.center.normal_(0, 0.3)
                t.centring.step.fill_(5)
            if isinstance(t.decoder, PrototypeHead):
                t.decoder.after_step(5)
    return obj


def batch_of(b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8),
            "label": torch.full((b,), -1), "caption": [None] * b}


def staged(obj: Objective, seed: int):
    """A batch of 6 staged (its views' parameters and masks drawn on the host), and its views."""
    torch.manual_seed(seed)
    batch = obj.stage(batch_of(6, seed), torch.device("cpu"))
    return batch, obj.views_of(batch)


@pytest.mark.parametrize("extra", [[], ["views.local.count=3"], ["views.local=null", "views.count=3",
                                                                  "views.augment=[{crop_scale: [0.4, 1.0]}]"]])
def test_the_dino_recipe_is_dinos_loss(extra):
    """Every crop (2 global and local ones, or 3 global) against each other global crop of the
    teacher; the EMA centre and the teacher temperature at its step."""
    obj = distill_objective("dino", *extra)
    batch, views = staged(obj, 1)
    out = obj(batch, views)
    term, cfg = obj.terms[0], obj.recipe.views
    student = torch.stack([ref_head(term.decoder, obj.backbone.forward_features(views.images[v]).pooled)
                           for v in range(cfg.total)])
    with torch.no_grad():
        teacher = torch.stack([ref_head(obj.teacher.heads["dino"], obj.teacher.backbone.forward_features(
            views.images[v]).pooled) for v in cfg.global_views()])
    enc = obj.recipe.terms[0].target_encoder
    tau_t = enc.warmup_temperature + (enc.temperature - enc.warmup_temperature) * min(5 / enc.warmup_steps, 1) \
        if enc.warmup_steps else enc.temperature
    want = ref_dino(student, teacher, 0.1, tau_t, "ema", term.centring.center)
    close(out.terms["dino"], want)
    assert_same_grads(obj, out.loss, want)


def test_the_dinov2_recipe_is_dino_ibot_and_koleo():
    """DINO on every crop, the global ones masked with mask tokens; iBOT at the masked patches through
    the same head (its own centre, Sinkhorn–Knopp); KoLeo on each global crop's pooled features."""
    obj = distill_objective("dinov2", "views.local.count=2", "views.mask.probability=0.75")
    batch, views = staged(obj, 2)
    out = obj(batch, views)
    cfg, head, teacher_head = obj.recipe.views, obj.terms[0].decoder, obj.teacher.heads["dino"]
    g = cfg.global_views()
    filled = {v: vit_fill(obj.backbone, views.images[v], views.visible[v]) for v in g}
    pooled = [filled[v][0] if v in g else obj.backbone.forward_features(views.images[v]).pooled for v in range(cfg.total)]
    student = torch.stack([ref_head(head, p) for p in pooled])
    with torch.no_grad():
        t_feats = {v: obj.teacher.backbone.forward_features(views.images[v]) for v in g}
        teacher = torch.stack([ref_head(teacher_head, t_feats[v].pooled) for v in g])
        t_tokens = torch.stack([ref_head(teacher_head, t_feats[v].tokens) for v in g])
    s_tokens = torch.stack([ref_head(head, filled[v][1]) for v in g])
    hidden = torch.stack([~views.visible[v] for v in g])
    enc = obj.recipe.terms[0].target_encoder
    tau_t = enc.warmup_temperature + (enc.temperature - enc.warmup_temperature) * min(5 / enc.warmup_steps, 1)
    want = {"dino": ref_dino(student, teacher, 0.1, tau_t, "sinkhorn", None),
            "ibot": ref_ibot(s_tokens, t_tokens, hidden, 0.1, tau_t, "sinkhorn", None),
            "koleo": ref_koleo(filled[0][0]) + ref_koleo(filled[1][0])}
    for name, value in want.items():
        close(out.terms[name], value)
    assert hidden.any() and (~hidden.any(-1)).any()  # masked images, and images shown whole
    total = want["dino"] + want["ibot"] + 0.1 * want["koleo"]
    close(out.loss, total)
    assert_same_grads(obj, out.loss, total)
    assert not any(n.startswith("terms.1.decoder") for n, _ in obj.named_parameters())  # one head, DINO's


def test_a_separate_ibot_head_and_the_ema_centre():
    obj = distill_objective("dinov2", "views.local=null", "terms.1.decoder={kind: prototypes, hidden: [40], "
                            "bottleneck: 16, prototypes: 20}", "terms.1.target_encoder.centring=ema")
    assert obj.terms[1].centring.center.shape == (20,) and obj.teacher.heads["ibot"].prototypes.shape == (20, 16)
    batch, views = staged(obj, 3)
    out = obj(batch, views)
    g = obj.recipe.views.global_views()
    filled = {v: vit_fill(obj.backbone, views.images[v], views.visible[v])[1] for v in g}
    with torch.no_grad():
        t_tokens = torch.stack([ref_head(obj.teacher.heads["ibot"], obj.teacher.backbone.forward_features(
            views.images[v]).tokens) for v in g])
    s_tokens = torch.stack([ref_head(obj.terms[1].decoder, filled[v]) for v in g])
    hidden = torch.stack([~views.visible[v] for v in g])
    center = obj.terms[1].centring.center.clone()
    enc = obj.recipe.terms[1].target_encoder
    tau_t = enc.warmup_temperature + (enc.temperature - enc.warmup_temperature) * min(5 / enc.warmup_steps, 1)
    close(out.terms["ibot"], ref_ibot(s_tokens, t_tokens, hidden, 0.1, tau_t, "ema", center))
    obj.update_teacher(6, 100, skip=torch.tensor(False))
    close(obj.terms[1].centring.center, ref_center(center, t_tokens[hidden], enc.center_momentum))
    assert int(obj.terms[1].centring.step) == 6 and int(obj.terms[0].decoder.step) == 6


# ---------------------------------------------------------------------------- recipes and refusals
def test_the_recipes_describe_their_parts():
    rows = {n: [describe_term(t, load_recipe(n).views.input_mode) for t in load_recipe(n).terms] for n in
            ("dino", "dinov2")}
    assert rows["dino"][0]["target"] == "the teacher's distribution over prototypes of each other global crop"
    assert rows["dino"][0]["target_encoder"].startswith("EMA encoder + prototype head, centred (EMA of its mean, m=0.9)")
    assert rows["dino"][0]["estimator"] == "cross-entropy over the prototypes (τ_s=0.1)"
    assert "Sinkhorn–Knopp (3 rounds), sharpened (τ_t=0.04 → 0.07)" in rows["dinov2"][1]["target_encoder"]
    assert rows["dinov2"][1]["target"].endswith("at each masked patch of the unmasked crop")
    assert rows["dinov2"][2]["estimator"].startswith("KoLeo")
    assert [r["input"] for r in rows["dinov2"]] == ["every crop (masked (mask-token) global views, local crops)",
                                                     "masked (mask-token) global views",
                                                     "masked (mask-token) view 1, both ways"]
    assert rows["dino"][0]["input"] == "every crop (global views, local crops)"


@pytest.mark.parametrize("override,message", [
    (["terms.0.estimator={kind: boltzmann}"], "terms.0.estimator.kind: a 'distill' target is the teacher's "
                                             "distribution over prototypes; it takes 'cross_entropy', got 'boltzmann'"),
    (["terms.0.target_encoder={kind: ema}"], "terms.0.target_encoder.kind: a 'distill' target needs 'centred_ema'"),
    (["terms.0.swap_views=true"], "terms.0.swap_views: a 'distill' target reads every crop already"),
    (["terms.0.decoder={kind: global}"], "terms.0.decoder.kind: a 'distill' target is scored over the prototypes "
                                        "of a 'prototypes' head"),
    (["views.local=null", "views.count=1", "views.augment=[{}]"], "terms.0.target.kind: a 'distill' target pairs "
                                                                 "each global crop"),
])
def test_a_dino_term_that_does_not_fit_is_refused_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe("dino", overrides=override)


@pytest.mark.parametrize("override,message", [
    (["views.input_mode=drop", "backbone.name=vit_nano", "views.mask={ratio: 0.5}"],
     "terms.1.target.kind: a 'dense_distill' target is predicted from the mask tokens at the hidden patches: it "
     "needs views.input_mode fill, got 'drop'"),
    (["terms.1.source.masked=false"], "terms.1.source.masked: a 'dense_distill' target is predicted at the masked"),
    (["terms.2.estimator={kind: gaussian}"], "terms.2.estimator.kind: an 'entropy' target is scored by an entropy "
                                             "estimator \\('koleo'\\), got 'gaussian'"),
    (["terms.0.estimator={kind: koleo}"], "terms.0.estimator.kind: 'koleo' estimates the entropy of the prediction"),
])
def test_a_dinov2_term_that_does_not_fit_is_refused_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("dinov2", overrides=override)


def test_koleo_scores_only_the_entropy_target():
    with pytest.raises(ConfigError, match="terms.0.estimator.kind: 'koleo' estimates the entropy of the prediction "
                                          "alone: it scores the 'entropy' target, not a 'view' one"):
        load_recipe("simclr", overrides=["terms.0.estimator={kind: koleo}"])


def test_a_shared_head_names_another_term_with_a_prototype_head():
    with pytest.raises(ValueError, match=r"terms.ibot.decoder.term: 'dinox' is not another term of the recipe "
                                         r"\(others: 'dino', 'koleo'\)"):
        Objective(load_recipe("dinov2", overrides=["terms.1.decoder.term=dinox"]))
    with pytest.raises(ValueError, match="terms.ibot.decoder.term: term 'koleo' has no prototype head to share"):
        Objective(load_recipe("dinov2", overrides=["terms.1.decoder.term=koleo"]))


@pytest.mark.parametrize("name,size", [("vit_nano", {"patch_size": 8}), ("resnet_nano", {"patch_size": 8}),
                                       ("convnext_atto", {"stem_stride": 1})])
def test_the_mask_token_input_returns_every_position(name, size):
    """``Features.filled``: with ``mode="fill"`` the tokens at every patch (the hidden ones from the
    mask token), the visible ones equal to ``tokens``; None for the other inputs."""
    from m3i.backbones import build_backbone, visible_indices

    torch.manual_seed(0)
    net = build_backbone(name, img_size=32, fill=True, **size).eval()
    x = torch.randn(3, 3, 32, 32)
    vis = torch.stack([torch.randperm(16) < 10 for _ in range(3)])
    feats = net.forward_features(x, vis, mode="fill", count=10)
    assert feats.filled.shape == (3, 16, net.embed_dim)
    idx = visible_indices(vis, 10)
    close(torch.gather(feats.filled, 1, idx.unsqueeze(-1).expand(-1, -1, net.embed_dim)), feats.tokens)
    other = net.forward_features(x, ~vis, mode="fill", count=6)  # the mask token elsewhere: other outputs
    assert not torch.allclose(other.filled, feats.filled)
    assert net.forward_features(x).filled is None
