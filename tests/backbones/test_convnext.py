"""ConvNeXt backbone: shapes, timm layout, mix/fill semantics, checkpointing, registry."""
from __future__ import annotations

import pytest
import torch

from m3i.backbones import Features, backbone_names, build_backbone
from m3i.backbones.convnext import ConvNeXt

ATTO_DIMS = (40, 80, 160, 320)


pytestmark = pytest.mark.usefixtures("one_thread")
SMALL_DEPTHS = (1, 1, 1, 2)


def small_model(stem_stride: int = 2, fill: bool = True, **kw) -> ConvNeXt:
    torch.manual_seed(0)
    kw = {"img_size": 32, "depths": SMALL_DEPTHS, "stem_stride": stem_stride, "fill": fill, **kw}
    model = build_backbone("convnext_atto", **kw)
    # layer scale at 1e-6 makes every block an identity; larger values exercise the blocks
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    return model.eval()


def pair_masks(B: int, N: int, K: int, seed: int = 0) -> torch.Tensor:
    """(B, N) visible masks with K True per row; rows b and b + B/2 are disjoint."""
    g = torch.Generator().manual_seed(seed)
    h = B // 2
    visible = torch.zeros(B, N, dtype=torch.bool)
    for b in range(h):
        perm = torch.randperm(N, generator=g)
        visible[b, perm[:K]] = True
        visible[b + h, perm[K : 2 * K]] = True
    return visible


def expected_timm_layout(in_chans, dims, depths, stem_kernel):
    """Parameter names and shapes of timm's ConvNeXt (conv_mlp=False, num_classes=0), by hand."""
    out = {
        "stem.0.weight": (dims[0], in_chans, stem_kernel, stem_kernel),
        "stem.0.bias": (dims[0],),
        "stem.1.weight": (dims[0],),
        "stem.1.bias": (dims[0],),
    }
    for s in range(4):
        d = dims[s]
        if s > 0:
            out[f"stages.{s}.downsample.0.weight"] = (dims[s - 1],)
            out[f"stages.{s}.downsample.0.bias"] = (dims[s - 1],)
            out[f"stages.{s}.downsample.1.weight"] = (d, dims[s - 1], 2, 2)
            out[f"stages.{s}.downsample.1.bias"] = (d,)
        for b in range(depths[s]):
            p = f"stages.{s}.blocks.{b}."
            out[p + "conv_dw.weight"] = (d, 1, 7, 7)
            out[p + "conv_dw.bias"] = (d,)
            out[p + "norm.weight"] = (d,)
            out[p + "norm.bias"] = (d,)
            out[p + "mlp.fc1.weight"] = (4 * d, d)
            out[p + "mlp.fc1.bias"] = (4 * d,)
            out[p + "mlp.fc2.weight"] = (d, 4 * d)
            out[p + "mlp.fc2.bias"] = (d,)
            out[p + "gamma"] = (d,)
    out["head.norm.weight"] = (dims[-1],)
    out["head.norm.bias"] = (dims[-1],)
    return out


# ---------------------------------------------------------------------- shapes


@pytest.mark.parametrize("stem_stride,grid", [(1, 4), (2, 2)])
def test_shapes_in_all_modes(stem_stride, grid):
    model = small_model(stem_stride)
    assert model.embed_dim == 320 and model.in_chans == 3 and model.img_size == 32
    assert model.patch_size == stem_stride * 8
    assert model.grid_size == (grid, grid) and model.num_patches == grid * grid
    N, D, B = grid * grid, 320, 4
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        full = model.forward_features(x, return_layers=2)
        assert isinstance(full, Features)
        assert full.pooled.shape == (B, D) and full.tokens.shape == (B, N, D)
        assert [t.shape for t in full.layers] == [(B, N, D)] * 2
        assert model(x).shape == (B, D)
        K = N // 2
        visible = pair_masks(B, N, K)
        for mode in ("mix", "fill"):
            f = model.forward_features(x, visible, mode=mode, return_layers=1)
            assert f.pooled.shape == (B, D) and f.tokens.shape == (B, K, D)
            assert [t.shape for t in f.layers] == [(B, K, D)]
            assert torch.isfinite(f.tokens).all() and torch.isfinite(f.pooled).all()


def test_full_image_tokens_and_pooled_follow_the_head():
    model = small_model(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = model.forward_features(x, return_layers=1)
        raw = f.layers[-1]  # the last block's output, before the final norm
        torch.testing.assert_close(f.tokens, model.head.norm(raw))
        torch.testing.assert_close(f.pooled, model.head.norm(raw.mean(1)))


def test_img_size_must_divide_by_final_stride():
    with pytest.raises(ValueError, match=r"img_size=40.*32"):
        build_backbone("convnext_atto", img_size=40)
    with pytest.raises(ValueError, match="img_size=24"):
        build_backbone("convnext_atto", img_size=24, stem_stride=2)
    with pytest.raises(ValueError, match="stem_stride"):
        build_backbone("convnext_atto", img_size=32, stem_stride=3)
    with pytest.raises(ValueError, match="depths"):
        build_backbone("convnext_atto", img_size=32, depths=(1, 1, 1))


# ---------------------------------------------------------------------- layout


@pytest.mark.parametrize("stem_stride", [4, 2])
def test_state_dict_layout_matches_timm(stem_stride):
    model = build_backbone("convnext_atto", img_size=32, depths=SMALL_DEPTHS, stem_stride=stem_stride, fill=True)
    want = expected_timm_layout(3, ATTO_DIMS, SMALL_DEPTHS, stem_stride)
    got = {k: tuple(v.shape) for k, v in model.timm_state_dict(conv_mlp=False).items()}
    assert got == want
    # the only non-timm tensor is the fill-mode mask token
    assert set(model.state_dict()) - set(want) == {"mask_token"}
    # gamma initialised to 1e-6 (layer scale)
    assert torch.allclose(model.stages[0].blocks[0].gamma, torch.full((40,), 1e-6))


def test_timm_export_uses_conv_mlp_kernels_for_atto_and_round_trips():
    model = build_backbone("convnext_atto", img_size=32, depths=SMALL_DEPTHS, stem_stride=2)
    sd = model.timm_state_dict()  # atto is a conv-MLP model in timm
    assert sd["stages.3.blocks.1.mlp.fc1.weight"].shape == (1280, 320, 1, 1)
    assert sd["stages.0.blocks.0.mlp.fc2.weight"].shape == (40, 160, 1, 1)
    with torch.device("meta"):
        tiny = build_backbone("convnext_tiny", img_size=32, depths=SMALL_DEPTHS)
    assert tiny.timm_state_dict()["stages.0.blocks.0.mlp.fc1.weight"].shape == (384, 96)

    other = build_backbone("convnext_atto", img_size=32, depths=SMALL_DEPTHS, stem_stride=2, fill=True)
    sd = {k: v + 1.0 for k, v in sd.items()}
    sd["head.fc.weight"] = torch.zeros(10, 320)  # a classifier is ignored
    other.load_timm_state_dict(sd)
    for k, v in other.timm_state_dict().items():
        torch.testing.assert_close(v, sd[k])


def test_convnext_tiny_parameter_count_matches_timm():
    # timm convnext_tiny: 28,589,128 parameters with its 768 -> 1000 classifier (769,000)
    with torch.device("meta"):
        model = build_backbone("convnext_tiny")
    assert sum(p.numel() for p in model.parameters()) == 28_589_128 - 769_000


# ---------------------------------------------------------------------- mix / fill / drop


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_mix_equals_network_on_the_mixed_image(stem_stride):
    model = small_model(stem_stride)
    B, p = 4, model.patch_size
    gh, gw = model.grid_size
    N = gh * gw
    visible = pair_masks(B, N, N // 2, seed=1)
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        f = model.forward_features(x, visible, mode="mix", return_layers=2)
        # reference: paste the pixels of image b into image b + B/2 under b's visible patches
        h = B // 2
        canvas = x[h:].clone()
        up = visible[:h].reshape(h, gh, gw).repeat_interleave(p, 1).repeat_interleave(p, 2)
        up = up[:, None].expand(-1, 3, -1, -1)
        canvas[up] = x[:h][up]
        ref = model.forward_features(canvas, return_layers=2)
    for b in range(B):
        idx = visible[b].nonzero().squeeze(1)  # ascending
        c = b % h
        torch.testing.assert_close(f.tokens[b], ref.tokens[c, idx])
        for got, want in zip(f.layers, ref.layers):
            torch.testing.assert_close(got[b], want[c, idx])
        torch.testing.assert_close(f.pooled[b], model.head.norm(ref.layers[-1][c, idx].mean(0)))


def test_mix_checks_its_inputs():
    model = small_model(1)
    x = torch.randn(3, 3, 32, 32)
    with pytest.raises(ValueError, match="even"):
        model.forward_features(x, torch.ones(3, 16, dtype=torch.bool), mode="mix")
    x = torch.randn(2, 3, 32, 32)
    overlapping = torch.zeros(2, 16, dtype=torch.bool)
    overlapping[:, :4] = True
    with pytest.raises(ValueError, match="disjoint"):
        model.forward_features(x, overlapping, mode="mix")
    with pytest.raises(ValueError, match="visible"):
        model.forward_features(x, torch.ones(2, 15, dtype=torch.bool), mode="mix")


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_fill_replaces_the_right_stem_positions(stem_stride):
    model = small_model(stem_stride)
    B = 2
    gh, gw = model.grid_size
    N = gh * gw
    visible = torch.zeros(B, N, dtype=torch.bool)
    visible[0, [0, N - 1]] = True
    visible[1, [1, 2]] = True
    x = torch.randn(B, 3, 32, 32)
    seen = {}
    first_block = model.stages[0].blocks[0]  # its input is the (filled) stem output
    hook = first_block.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach()))
    try:
        with torch.no_grad():
            f = model.forward_features(x, visible, mode="fill")
            stem = model.stem(x)
    finally:
        hook.remove()
    filled = seen["x"]
    r = 8  # final-stride patch in stem positions
    assert filled.shape == (B, 40, gh * r, gw * r)
    token = model.mask_token.detach()
    for b in range(B):
        for n in range(N):
            i, j = divmod(n, gw)
            patch = filled[b, :, i * r : (i + 1) * r, j * r : (j + 1) * r]
            if visible[b, n]:
                torch.testing.assert_close(patch, stem[b, :, i * r : (i + 1) * r, j * r : (j + 1) * r])
            else:
                torch.testing.assert_close(patch, token[:, None, None].expand_as(patch))
    assert f.tokens.shape == (B, 2, 320)


def test_fill_with_everything_visible_equals_the_full_image():
    model = small_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = model.forward_features(x, torch.ones(2, 4, dtype=torch.bool), mode="fill")
        ref = model.forward_features(x)
    torch.testing.assert_close(f.tokens, ref.tokens)
    torch.testing.assert_close(f.pooled, ref.pooled)


def test_fill_needs_a_mask_token():
    model = small_model(fill=False)
    assert model.mask_token is None
    with pytest.raises(ValueError, match="fill=True"):
        model.forward_features(torch.randn(2, 3, 32, 32), pair_masks(2, 4, 2), mode="fill")


def test_drop_raises_and_names_the_working_modes():
    model = small_model()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="cannot drop") as err:
        model.forward_features(x, pair_masks(2, 4, 2), mode="drop")
    assert "mix" in str(err.value) and "fill" in str(err.value)
    with pytest.raises(ValueError, match="unknown mode"):
        model.forward_features(x, mode="swap")
    with pytest.raises(ValueError, match="return_layers"):
        model.forward_features(x, return_layers=3)


# ---------------------------------------------------------------------- training utilities


def test_grad_checkpointing_gives_equal_grads():
    model = small_model(drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    visible = pair_masks(2, 4, 2, seed=2)

    def grads():
        model.zero_grad()
        f = model.forward_features(x, visible, mode="mix", return_layers=1)
        (f.pooled.square().sum() + f.tokens.sum() + f.layers[0].mean()).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    checked = grads()
    model.set_grad_checkpointing(False)
    assert plain.keys() == checked.keys() and len(plain) > 0
    for k in plain:
        torch.testing.assert_close(checked[k], plain[k], msg=k)


def test_drop_path_trains():
    model = small_model(drop_path_rate=0.5).train()
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert model.stages[3].blocks[1].drop_path.p == pytest.approx(0.5)


WANT = {
    "convnext_atto": ((40, 80, 160, 320), (2, 2, 6, 2)),
    "convnext_femto": ((48, 96, 192, 384), (2, 2, 6, 2)),
    "convnext_pico": ((64, 128, 256, 512), (2, 2, 6, 2)),
    "convnext_nano": ((80, 160, 320, 640), (2, 2, 8, 2)),
    "convnext_tiny": ((96, 192, 384, 768), (3, 3, 9, 3)),
    "convnext_small": ((96, 192, 384, 768), (3, 3, 27, 3)),
    "convnext_base": ((128, 256, 512, 1024), (3, 3, 27, 3)),
    "convnext_large": ((192, 384, 768, 1536), (3, 3, 27, 3)),
}


def test_every_registered_config_builds():
    assert sorted(n for n in backbone_names() if n.startswith("convnext")) == sorted(WANT)
    for name, (dims, depths) in WANT.items():
        # meta tensors: the full structure and shapes without allocating or initialising weights
        with torch.device("meta"):
            model = build_backbone(name, img_size=32, stem_stride=1, fill=True)
        assert model.embed_dim == dims[-1] and model.grid_size == (4, 4), name
        shapes = {k: tuple(v.shape) for k, v in model.timm_state_dict(conv_mlp=False).items()}
        assert shapes == expected_timm_layout(3, dims, depths, 1), name
        assert model.mask_token.shape == (dims[0],), name
    # and a real (CPU) one at its registered depths
    model = build_backbone("convnext_atto", img_size=32, stem_stride=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 320)
