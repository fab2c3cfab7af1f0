"""Tests for the ViT backbone: timm layout, the three masking modes, checkpointing, configs."""
import math

import pytest
import torch

from m3i.backbones import Features, backbone_names, build_backbone
from m3i.backbones.vit import VisionTransformer

IMG, PATCH, DIM, DEPTH, HEADS = 32, 8, 64, 2, 4
N = (IMG // PATCH) ** 2  # 16 patches


def small(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    args = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
    args.update(kw)
    return VisionTransformer(**args).eval()


def images(b: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, IMG, IMG, generator=g)


def random_visible(b: int, k: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vis = torch.zeros(b, N, dtype=torch.bool)
    for i in range(b):
        vis[i, torch.randperm(N, generator=g)[:k]] = True
    return vis


def paired_visible(b: int, k: int, seed: int = 3) -> torch.Tensor:
    """Rows i and i + b/2 get disjoint sets of k patches (some positions seen by neither)."""
    assert b % 2 == 0 and 2 * k <= N
    g = torch.Generator().manual_seed(seed)
    vis = torch.zeros(b, N, dtype=torch.bool)
    h = b // 2
    for i in range(h):
        perm = torch.randperm(N, generator=g)
        vis[i, perm[:k]] = True
        vis[i + h, perm[k : 2 * k]] = True
    return vis


def expected_timm_layout(depth, dim, chans, patch, n, hidden):
    """timm VisionTransformer(num_classes=0, class token, no reg tokens, no layer scale)."""
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + n, dim),
        "patch_embed.proj.weight": (dim, chans, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (dim,),
                p + "norm1.bias": (dim,),
                p + "attn.qkv.weight": (3 * dim, dim),
                p + "attn.qkv.bias": (3 * dim,),
                p + "attn.proj.weight": (dim, dim),
                p + "attn.proj.bias": (dim,),
                p + "norm2.weight": (dim,),
                p + "norm2.bias": (dim,),
                p + "mlp.fc1.weight": (hidden, dim),
                p + "mlp.fc1.bias": (hidden,),
                p + "mlp.fc2.weight": (dim, hidden),
                p + "mlp.fc2.bias": (dim,),
            }
        )
    shapes["norm.weight"] = (dim,)
    shapes["norm.bias"] = (dim,)
    return shapes


# ---------------------------------------------------------------- layout and init


def test_state_dict_matches_timm_layout():
    model = small()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_timm_layout(DEPTH, DIM, 3, PATCH, N, 4 * DIM)
    assert list(model.buffers()) == []
    assert {k for k, _ in model.named_parameters()} == set(got)
    assert model.timm_state_dict().keys() == model.state_dict().keys()
    assert model.blocks[0].norm1.eps == 1e-6 and model.norm.eps == 1e-6


def test_mask_token_only_with_fill():
    model = small(fill=True)
    sd = model.state_dict()
    assert tuple(sd["mask_token"].shape) == (1, 1, DIM)
    export = model.timm_state_dict()
    assert "mask_token" not in export
    assert {k: tuple(v.shape) for k, v in export.items()} == expected_timm_layout(DEPTH, DIM, 3, PATCH, N, 4 * DIM)
    # the export loads into a plain model strictly
    plain = small()
    plain.load_state_dict(export, strict=True)
    assert "mask_token" not in small().state_dict()


def test_pos_embed_is_fixed_sincos():
    model = small()
    pe = model.pos_embed
    assert isinstance(pe, torch.nn.Parameter) and not pe.requires_grad
    assert small(learn_pos_embed=True).pos_embed.requires_grad
    assert torch.all(pe[0, 0] == 0)
    q = DIM // 4
    grid = IMG // PATCH
    for r, c in [(0, 0), (1, 2), (3, 1)]:
        row = pe[0, 1 + r * grid + c]
        # channel 0 / q: the column's sin / cos at the lowest frequency (ω = 1); 2q / 3q: the row's
        assert math.isclose(row[0].item(), math.sin(c), abs_tol=1e-6)
        assert math.isclose(row[q].item(), math.cos(c), abs_tol=1e-6)
        assert math.isclose(row[2 * q].item(), math.sin(r), abs_tol=1e-6)
        assert math.isclose(row[3 * q].item(), math.cos(r), abs_tol=1e-6)
    assert pe.abs().max() <= 1.0 + 1e-6


def test_init_statistics():
    model = small(embed_dim=128, num_heads=4)
    w = model.blocks[0].mlp.fc1.weight
    assert 0.015 < w.std().item() < 0.02 and w.abs().max() <= 0.04 + 1e-6  # normal(0.02) cut at ±2σ
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert model.cls_token.abs().max() < 1e-4
    assert torch.all(model.patch_embed.proj.bias == 0)


# ---------------------------------------------------------------- shapes and modes


@pytest.mark.parametrize("mode", ["drop", "mix", "fill"])
def test_shapes(mode):
    model = small(fill=True)
    b, k = 4, 6
    vis = paired_visible(b, k)
    out = model.forward_features(images(b), vis, mode=mode, return_layers=2)
    assert isinstance(out, Features)
    assert out.pooled.shape == (b, DIM)
    assert out.tokens.shape == (b, k, DIM)
    assert len(out.layers) == 2 and all(h.shape == (b, k, DIM) for h in out.layers)
    full = model.forward_features(images(b), None, mode=mode)
    assert full.tokens.shape == (b, N, DIM) and full.layers == []
    assert model(images(b)).shape == (b, DIM)


def test_drop_all_visible_equals_full():
    model = small()
    x = images(3)
    full = model.forward_features(x, return_layers=1)
    drop = model.forward_features(x, torch.ones(3, N, dtype=torch.bool), "drop", return_layers=1)
    torch.testing.assert_close(drop.pooled, full.pooled)
    torch.testing.assert_close(drop.tokens, full.tokens)
    torch.testing.assert_close(drop.layers[0], full.layers[0])


def test_last_layer_then_norm_gives_tokens():
    model = small()
    out = model.forward_features(images(2), random_visible(2, 5), return_layers=DEPTH)
    torch.testing.assert_close(model.norm(out.layers[-1]), out.tokens)


def test_mix_equals_drop():
    model = small()
    b, k = 6, 5
    x, vis = images(b), paired_visible(b, k)
    drop = model.forward_features(x, vis, "drop", return_layers=2)
    mix = model.forward_features(x, vis, "mix", return_layers=2)
    torch.testing.assert_close(mix.pooled, drop.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mix.tokens, drop.tokens, atol=1e-5, rtol=1e-5)
    for a, d in zip(mix.layers, drop.layers):
        torch.testing.assert_close(a, d, atol=1e-5, rtol=1e-5)


def test_mix_complementary_masks_equal_drop():
    """Canvas fully covered by the two images (no isolated positions)."""
    model = small()
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(N, generator=g)
    vis = torch.zeros(2, N, dtype=torch.bool)
    vis[0, perm[: N // 2]] = True
    vis[1] = ~vis[0]
    x = images(2)
    drop = model.forward_features(x, vis, "drop")
    mix = model.forward_features(x, vis, "mix")
    torch.testing.assert_close(mix.pooled, drop.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mix.tokens, drop.tokens, atol=1e-5, rtol=1e-5)


def test_masked_tokens_never_computed():
    model = small()
    seen = []
    masks = []
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    model.blocks[0].attn.register_forward_hook(lambda m, args, out: masks.append(args[1] if len(args) > 1 else None))
    b, k = 4, 3
    model.forward_features(images(b), random_visible(b, k), "drop")
    assert seen[-1] == (b, k + 1, DIM)
    # the mixed input runs as drop: one sequence per image, no attention mask (the fused kernels apply)
    model.forward_features(images(b), paired_visible(b, k), "mix")
    assert seen[-1] == (b, k + 1, DIM) and masks[-1] is None
    model.forward_features(images(b))
    assert seen[-1] == (b, 1 + N, DIM)


def test_drop_ignores_hidden_pixels():
    model = small()
    vis = random_visible(2, 4)
    x = images(2)
    y = x.clone()
    grid = IMG // PATCH
    for i in range(2):  # scramble every hidden patch
        for p in (~vis[i]).nonzero().flatten().tolist():
            r, c = divmod(p, grid)
            y[i, :, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = 7.0
    for mode in ("drop", "fill"):
        m = small(fill=True) if mode == "fill" else model
        a, bb = m.forward_features(x, vis, mode), m.forward_features(y, vis, mode)
        torch.testing.assert_close(a.tokens, bb.tokens)
        torch.testing.assert_close(a.pooled, bb.pooled)


def test_fill_uses_mask_token_and_differs_from_drop():
    model = small(fill=True)
    vis = random_visible(2, 4)
    x = images(2)
    fill = model.forward_features(x, vis, "fill")
    drop = model.forward_features(x, vis, "drop")
    assert not torch.allclose(fill.tokens, drop.tokens)
    model.train()
    model.forward_features(x, vis, "fill").tokens.sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert model.pos_embed.grad is None


def test_fill_all_visible_equals_full():
    model = small(fill=True)
    x = images(2)
    torch.testing.assert_close(
        model.forward_features(x, torch.ones(2, N, dtype=torch.bool), "fill").tokens,
        model.forward_features(x).tokens,
    )


# ---------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("mode", ["drop", "mix"])
def test_grad_checkpointing_same_gradients(mode):
    model = small().train()
    x, vis = images(4), paired_visible(4, 5)

    def grads():
        model.zero_grad(set_to_none=True)
        out = model.forward_features(x, vis, mode, return_layers=1)
        (out.pooled.square().sum() + out.tokens.sum() + out.layers[0].mean()).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    model.set_grad_checkpointing(True)
    ckpt = grads()
    model.set_grad_checkpointing(False)
    assert ref.keys() == ckpt.keys() and "blocks.0.attn.qkv.weight" in ref
    for k in ref:
        torch.testing.assert_close(ckpt[k], ref[k], atol=1e-6, rtol=1e-5)


def test_drop_path_only_in_training():
    model = small(drop_path_rate=0.5)
    x = images(2)
    torch.testing.assert_close(model.forward_features(x).pooled, model.forward_features(x).pooled)
    assert model.blocks[-1].drop_path.p == pytest.approx(0.5)
    assert model.blocks[0].drop_path.p == 0.0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(img_size=30), "img_size"),
        (dict(num_heads=5), "num_heads"),
        (dict(embed_dim=66, num_heads=3), "embed_dim"),
        (dict(depth=0), "depth"),
        (dict(patch_size=0), "patch_size"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
    ],
)
def test_bad_config_raises(kw, field):
    with pytest.raises(ValueError, match=field):
        small(**kw)


def test_bad_inputs_raise():
    model = small(fill=False)
    x = images(2)
    with pytest.raises(ValueError, match="x must"):
        model.forward_features(torch.randn(2, 3, 20, 20))
    with pytest.raises(ValueError, match="visible"):
        model.forward_features(x, torch.ones(2, N - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="visible"):
        model.forward_features(x, torch.ones(2, N))
    uneven = torch.zeros(2, N, dtype=torch.bool)
    uneven[0, :3] = True
    uneven[1, :4] = True
    with pytest.raises(ValueError, match="same number"):
        model.forward_features(x, uneven)
    with pytest.raises(ValueError, match="mode"):
        model.forward_features(x, mode="shuffle")
    with pytest.raises(ValueError, match="return_layers"):
        model.forward_features(x, return_layers=DEPTH + 1)
    with pytest.raises(ValueError, match="fill=True"):
        model.forward_features(x, random_visible(2, 4), "fill")
    with pytest.raises(ValueError, match="even"):
        model.forward_features(images(3), random_visible(3, 4), "mix")
    overlap = torch.zeros(2, N, dtype=torch.bool)
    overlap[:, :4] = True
    with pytest.raises(ValueError, match="disjoint"):
        model.forward_features(x, overlap, "mix")


# ---------------------------------------------------------------- registry

CONFIGS = {  # name: (embed_dim, depth, num_heads, patch_size)
    "vit_nano": (128, 4, 4, 16),
    "vit_micro": (192, 6, 3, 16),
    "vit_tiny": (192, 12, 3, 16),
    "vit_small": (384, 12, 6, 16),
    "vit_base": (768, 12, 12, 16),
    "vit_large": (1024, 24, 16, 16),
    "vit_huge": (1280, 32, 16, 14),
}


def test_registry_lists_every_vit():
    assert set(CONFIGS) <= set(backbone_names())
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vit_gigantic")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_registered_config_builds(name):
    dim, depth, heads, patch = CONFIGS[name]
    model = build_backbone(name, depth=1)
    assert isinstance(model, VisionTransformer)
    assert (model.embed_dim, model.num_heads, model.patch_size, model.in_chans) == (dim, heads, patch, 3)
    assert model.img_size == 224 and model.grid_size == (224 // patch,) * 2
    assert len(model.blocks) == 1
    n = (224 // patch) ** 2
    with torch.no_grad():
        out = model.eval().forward_features(torch.randn(1, 3, 224, 224), torch.ones(1, n, dtype=torch.bool))
    assert out.pooled.shape == (1, dim) and out.tokens.shape == (1, n, dim)


def test_config_overrides():
    model = build_backbone("vit_nano", img_size=32, patch_size=4, in_chans=1)
    assert model.grid_size == (8, 8) and model.in_chans == 1 and len(model.blocks) == 4
    assert model.forward_features(torch.randn(2, 1, 32, 32)).tokens.shape == (2, 64, 128)
    with pytest.raises(ValueError, match="img_size"):
        build_backbone("vit_huge", depth=1, img_size=224 + 1)


# ---------------------------------------------------------------- other image sizes


def test_position_table_resampling():
    from m3i.backbones.vit import resample_pos_embed, sincos_pos_embed_2d

    table = sincos_pos_embed_2d((4, 4), DIM)[None]
    assert resample_pos_embed(table, (4, 4), (4, 4)) is table  # the trained grid: untouched
    const = torch.full((1, 16, DIM), 0.3)
    torch.testing.assert_close(resample_pos_embed(const, (4, 4), (8, 6)), torch.full((1, 48, DIM), 0.3))
    # a table that depends on the column only keeps depending on the column only, in order
    ramp = torch.arange(4.0).repeat(4).view(1, 16, 1).expand(1, 16, DIM)
    up = resample_pos_embed(ramp, (4, 4), (8, 8)).view(8, 8, DIM)
    torch.testing.assert_close(up, up[:1].expand(8, 8, DIM))
    assert bool((up[0, 1:, 0] >= up[0, :-1, 0]).all()) and up[0, 0, 0] < up[0, -1, 0]


def test_larger_image_runs_on_a_resampled_table():
    model = small(fill=True)
    big = torch.randn(2, 3, 2 * IMG, 3 * IMG)  # a 8 x 12 patch grid on a model trained at 4 x 4
    vis = torch.zeros(2, 6 * N, dtype=torch.bool)
    vis[:, ::2] = True
    with torch.no_grad():
        out = model.forward_features(big)
        dropped = model.forward_features(big, vis, mode="drop")
        filled = model.forward_features(big, torch.ones(2, 6 * N, dtype=torch.bool), mode="fill")
    assert out.tokens.shape == (2, 6 * N, DIM) and out.pooled.shape == (2, DIM)
    assert dropped.tokens.shape == (2, 3 * N, DIM)
    torch.testing.assert_close(filled.tokens, out.tokens)  # every mode sees the same resampled table
    with pytest.raises(ValueError, match=r"visible must have shape \(B, N\) = \(2, 96\)"):
        model.forward_features(big, torch.ones(2, N, dtype=torch.bool))
