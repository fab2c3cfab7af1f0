"""The backbone contract, for every registered backbone.

Every name of ``backbone_names()`` is built (at a small width and depth where its family's
constructor takes them, else at its registered size on a batch of one) and must answer to the
one interface the objective, evaluation and export rely on: ``Features`` of the right shapes,
a patch grid consistent with its input, a depth level for every parameter, weight-decay
exemptions that name real parameters, visible-token runs in the modes it supports, and a
patch embedding that can be frozen.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from m3i.backbones import Backbone, Features, backbone_names, build_backbone
from m3i.backbones.registry import _REGISTRY
from m3i.backbones.convnext import ConvNeXt
from m3i.backbones.resnet import ResNet
from m3i.backbones.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

IMG = 32


def registered(name: str) -> tuple[type, dict]:
    """The class a backbone name builds and the settings it registers with it."""
    found = inspect.getclosurevars(_REGISTRY[name]).nonlocals
    return found["cls"], dict(found["defaults"])


def small_settings(name: str) -> dict | None:
    """Settings that build ``name`` small at IMG pixels with a 4 × 4 grid; None: a family this file
    does not know, built at its registered size."""
    cls, defaults = registered(name)
    if issubclass(cls, ResNet):  # 3 or 4 stages as registered; final stride 8
        stages = len(defaults.get("dims", (64, 128, 256, 512)))
        return {"img_size": IMG, "dims": (8, 16, 24, 32)[-stages:], "depths": (1,) * stages, "patch_size": 8}
    if issubclass(cls, ConvNeXt):  # stem stride 1: final stride 8
        return {"img_size": IMG, "dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1), "stem_stride": 1}
    if issubclass(cls, VisionTransformer):
        return {"img_size": IMG, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    return None


NAMES = backbone_names()


def build(name: str, **kw) -> tuple[Backbone, int]:
    """The backbone and the batch size its checks run on."""
    torch.manual_seed(0)
    small = small_settings(name)
    if small is None:
        return build_backbone(name, **kw), 1
    return build_backbone(name, **small, **kw), 4


def image_of(model: Backbone, b: int) -> torch.Tensor:
    return torch.randn(b, model.in_chans, model.img_size, model.img_size)


def visible_rows(b: int, n: int, k: int, disjoint_pairs: bool = False) -> torch.Tensor:
    """(B, N) bool, k patches seen per row; with ``disjoint_pairs`` rows i and i + B/2 share none."""
    g = torch.Generator().manual_seed(b * 100 + n + k)
    vis = torch.zeros(b, n, dtype=torch.bool)
    if disjoint_pairs:
        h = b // 2
        for i in range(h):
            perm = torch.randperm(n, generator=g)
            vis[i, perm[:k]] = True
            vis[i + h, perm[k:2 * k]] = True
    else:
        for i in range(b):
            vis[i, torch.randperm(n, generator=g)[:k]] = True
    return vis


def check_features(f: Features, b: int, rows: int, d: int, layers: int = 0) -> None:
    assert isinstance(f, Features)
    assert f.pooled.shape == (b, d)
    assert f.tokens.shape == (b, rows, d)
    assert len(f.layers) == layers
    for h in f.layers:
        assert h.shape[:2] == (b, rows)
    assert torch.isfinite(f.pooled).all() and torch.isfinite(f.tokens).all()


@pytest.mark.parametrize("name", NAMES)
def test_registered_settings_fit_the_constructor(name):
    """The checks below build most names small; the settings each name registers (its width,
    depth, patch size) are still the constructor's own arguments."""
    cls, defaults = registered(name)
    inspect.signature(cls).bind(**defaults)
    if issubclass(cls, VisionTransformer):
        d = defaults["embed_dim"]
        assert d % defaults["num_heads"] == 0 and d % 4 == 0


@pytest.mark.parametrize("name", NAMES)
def test_geometry_and_features(name):
    model, b = build(name)
    model.eval()
    size = model.img_size
    assert isinstance(model, Backbone)
    assert size % model.patch_size == 0
    assert model.grid_size == (size // model.patch_size, size // model.patch_size)
    assert model.num_patches == model.grid_size[0] * model.grid_size[1]
    if small_settings(name) is not None:
        assert size == IMG and model.grid_size == (4, 4)
    x = image_of(model, b)
    assert x.shape[1] == model.in_chans == 3
    with torch.no_grad():
        f = model.forward_features(x)
        check_features(f, b, model.num_patches, model.embed_dim)
        torch.testing.assert_close(model(x), f.pooled)
        check_features(model.forward_features(x, return_layers=1), b, model.num_patches, model.embed_dim, 1)


@pytest.mark.parametrize("name", NAMES)
def test_layer_ids_and_weight_decay_names(name):
    model, _ = build(name, fill=True)
    names = [n for n, _ in model.named_parameters()]
    depth = model.num_layers
    assert isinstance(depth, int) and depth >= 1
    ids = {n: model.layer_id(n) for n in names}
    assert all(isinstance(i, int) and 0 <= i <= depth for i in ids.values()), ids
    stem = {id(p) for p in model.stem_module().parameters()}
    stem_names = [n for n, p in model.named_parameters() if id(p) in stem]
    assert stem_names and all(ids[n] == 0 for n in stem_names)
    assert max(ids.values()) == depth  # the final norm joins the level after the last block
    own = getattr(model, "no_weight_decay", None)
    if callable(own):
        assert set(own()) <= set(names), set(own()) - set(names)


@pytest.mark.parametrize("name", NAMES)
def test_visible_tokens(name):
    model, b = build(name, fill=True)
    model.eval()
    b = max(b, 2)  # the mixed input pairs sample i with i + B/2
    n, d = model.num_patches, model.embed_dim
    k = n // 2
    x = image_of(model, b)
    vis = visible_rows(b, n, k)
    pairs = visible_rows(b, n, k, disjoint_pairs=True)
    with torch.no_grad():
        if model.supports_drop:
            check_features(model.forward_features(x, vis, mode="drop"), b, k, d)
            check_features(model.forward_features(x, vis, mode="drop", return_layers=1), b, k, d, 1)
        else:
            with pytest.raises(ValueError):
                model.forward_features(x, vis, mode="drop")
        check_features(model.forward_features(x, vis, mode="fill"), b, k, d)
        check_features(model.forward_features(x, pairs, mode="mix"), b, k, d)
        check_features(model.forward_features(x, pairs, mode="mix", return_layers=1), b, k, d, 1)
        # every patch seen: the visible run reads the tokens of the full run
        full = model.forward_features(x)
        all_seen = torch.ones(b, n, dtype=torch.bool)
        for mode in (("drop",) if model.supports_drop else ()) + ("fill",):
            f = model.forward_features(x, all_seen, mode=mode)
            torch.testing.assert_close(f.tokens, full.tokens, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(f.pooled, full.pooled, rtol=1e-4, atol=1e-5)
        # uneven counts per row are refused
        uneven = vis.clone()
        uneven[0] = True
        with pytest.raises(ValueError):
            model.forward_features(x, uneven, mode="fill")


@pytest.mark.parametrize("name", NAMES)
def test_freeze_patch_embed(name):
    model, _ = build(name)
    stem = list(model.stem_module().parameters())
    stem_ids = {id(p) for p in stem}
    rest = [p for p in model.parameters() if id(p) not in stem_ids and p.requires_grad]
    assert stem and all(p.requires_grad for p in stem) and not model.frozen_patch_embed
    model.freeze_patch_embed()
    assert model.frozen_patch_embed
    assert not any(p.requires_grad for p in stem)
    assert all(p.requires_grad for p in rest)
    model.freeze_patch_embed(False)
    assert all(p.requires_grad for p in stem) and not model.frozen_patch_embed
    # built frozen: the same
    frozen, _ = build(name, frozen_patch_embed=True)
    assert frozen.frozen_patch_embed and not any(p.requires_grad for p in frozen.stem_module().parameters())
