"""A frozen patch embedding (stem): no training step moves it, copies keep it frozen, and the
optimiser groups still work."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from m3i.backbones import build_backbone
from m3i.train.finetune import layer_decay_groups

pytestmark = pytest.mark.usefixtures("one_thread")

# name, build settings, the stem's parameter prefix, the blocks' prefix
CASES = {
    "vit_micro": (dict(img_size=32, patch_size=8, depth=2), "patch_embed.", "blocks."),
    "convnext_atto": (dict(img_size=32, stem_stride=1), "stem.", "stages."),
    "resnet_nano": (dict(img_size=32), "stem.", "stages."),
}


def build(name: str, **kw):
    torch.manual_seed(0)
    settings, _, _ = CASES[name]
    return build_backbone(name, **settings, **kw)


def stem_names(model, prefix):
    return [n for n, _ in model.named_parameters() if n.startswith(prefix)]


@pytest.mark.parametrize("name", list(CASES))
def test_frozen_stem_survives_a_training_step(name):
    _, stem, blocks = CASES[name]
    model = build(name, frozen_patch_embed=True).train()
    assert model.frozen_patch_embed and stem_names(model, stem)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)  # the stem handed in too
    x = torch.randn(4, 3, 32, 32)
    feats = model.forward_features(x)
    loss = (feats.tokens - 1.0).pow(2).mean() + feats.pooled.pow(2).mean()
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not {n for n in changed if n.startswith(stem)}
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(stem))
    assert any(n.startswith(blocks) for n in changed)
    # the same step on a trainable stem moves it
    model = build(name).train()
    assert not model.frozen_patch_embed
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    feats = model.forward_features(x)
    ((feats.tokens - 1.0).pow(2).mean() + feats.pooled.pow(2).mean()).backward()
    opt.step()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith(stem))


@pytest.mark.parametrize("name", list(CASES))
def test_frozen_stem_stays_frozen_in_copies_and_loads(name):
    _, stem, _ = CASES[name]
    model = build(name, frozen_patch_embed=True)
    default = build(name)
    assert torch.equal(model.forward_features(torch.ones(2, 3, 32, 32)).pooled,
                       default.forward_features(torch.ones(2, 3, 32, 32)).pooled)  # same weights
    for other in (copy.deepcopy(model), copy.deepcopy(model).to(torch.float64)):
        assert all(not p.requires_grad for n, p in other.named_parameters() if n.startswith(stem))
        assert all(p.requires_grad for n, p in other.named_parameters() if not n.startswith(stem) and n != "pos_embed")
    model.load_state_dict(default.state_dict())
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith(stem))
    model.freeze_patch_embed(False)
    assert not model.frozen_patch_embed
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(stem))


@pytest.mark.parametrize("name", list(CASES))
def test_layer_decay_groups_leave_the_frozen_stem_out(name):
    _, stem, _ = CASES[name]
    model, default = build(name, frozen_patch_embed=True), build(name)
    head = nn.Linear(model.embed_dim, 3)

    def names(m):
        groups = layer_decay_groups(m, head, lr=1e-3, weight_decay=0.05, layer_decay=0.75)
        return {n: g["layer_id"] for g in groups for n in g["names"]}

    frozen, full = names(model), names(default)
    assert frozen == {n: i for n, i in full.items() if not n.startswith(stem)}
    assert all(full[n] == 0 for n in stem_names(default, stem))
    if name.startswith("vit"):
        assert model.no_weight_decay() == default.no_weight_decay()


def test_trainable_by_default_and_the_setting_is_checked():
    assert not build_backbone("vit_nano", img_size=32, patch_size=8).frozen_patch_embed
    with pytest.raises(ValueError, match="frozen_stem"):
        build_backbone("vit_nano", frozen_stem=True)
