"""DenseDecoder: the default layout, batch norm over tokens, positions after the projector, the
class token."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from m3i.train.strategy import global_batch_norm
from m3i.layers import Block, TokenBatchNorm
from m3i.decoders.dense import DenseDecoder
from m3i.views.relpos import absolute_positions, sincos_embed

pytestmark = pytest.mark.usefixtures("one_thread")

IN, W, HEADS, OUT = 12, 16, 2, 10
B, K, Q = 3, 5, 4


def decoder(projector_depth: int = 2, depth: int = 2, **kw) -> DenseDecoder:
    torch.manual_seed(0)
    return DenseDecoder(IN, W, projector_depth, depth, HEADS, OUT, **kw)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, K, IN, generator=g)
    pos = absolute_positions(4)[torch.randperm(16, generator=g)[:K]].unsqueeze(0).expand(B, -1, -1)
    qpos = torch.randn(B, Q, 4, generator=g) * 2
    cls = torch.randn(B, IN, generator=g)
    return tokens, pos, qpos, cls


def capture_input(module: nn.Module) -> list:
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


# ---------------------------------------------------------------------------- the default layout


def reference_block(blk: Block, x: torch.Tensor) -> torch.Tensor:
    """The pre-norm block written out from its parameters."""
    def ln(norm, t):
        return F.layer_norm(t, (W,), norm.weight, norm.bias, 1e-6)

    h = ln(blk.norm1, x)
    b, n, d = h.shape
    qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
    q, k, v = qkv
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // HEADS), dim=-1)
    x = x + F.linear((att @ v).transpose(1, 2).reshape(b, n, d), blk.attn.proj.weight, blk.attn.proj.bias)
    h = F.gelu(F.linear(ln(blk.norm2, x), blk.mlp.fc1.weight, blk.mlp.fc1.bias))
    return x + F.linear(h, blk.mlp.fc2.weight, blk.mlp.fc2.bias)


def test_default_parameters_are_the_original_layout_and_init():
    d = decoder()
    torch.manual_seed(0)  # the original construction, in its order
    ref = nn.Module()
    ref.embed = nn.Linear(IN, W)
    ref.pos = nn.Linear(W, W)
    ref.projector = nn.ModuleList(Block(W, HEADS, 4.0, 0.0) for _ in range(2))
    ref.projector_norm = nn.LayerNorm(W, eps=1e-6)
    ref.mask_token = nn.Parameter(torch.zeros(1, 1, W))
    ref.predictor = nn.ModuleList(Block(W, HEADS, 4.0, 0.0) for _ in range(2))
    ref.norm = nn.LayerNorm(W, eps=1e-6)
    ref.out = nn.Linear(W, OUT)
    nn.init.normal_(ref.mask_token, std=0.02)
    mine, theirs = d.state_dict(), ref.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # the options add no parameters: a default checkpoint loads into them
    for kw in ({"positions": "after_projector"}, {"cls_token": True}):
        assert list(decoder(**kw).state_dict()) == list(mine)
        decoder(**kw).load_state_dict(mine)


def test_default_outputs_equal_the_original_path_by_hand():
    d = decoder()
    tokens, pos, qpos, _ = inputs()
    with torch.no_grad():
        ctx = d.project(tokens, pos)
        pred = d.predict(ctx, qpos)
        x = F.linear(tokens, d.embed.weight, d.embed.bias) + F.linear(sincos_embed(pos, W), d.pos.weight, d.pos.bias)
        for blk in d.projector:
            x = reference_block(blk, x)
        ref_ctx = F.layer_norm(x, (W,), d.projector_norm.weight, d.projector_norm.bias, 1e-6)
        q = d.mask_token + F.linear(sincos_embed(qpos, W), d.pos.weight, d.pos.bias)
        x = torch.cat([ref_ctx, q], dim=1)
        for blk in d.predictor:
            x = reference_block(blk, x)
        x = F.layer_norm(x[:, K:], (W,), d.norm.weight, d.norm.bias, 1e-6)
        ref_pred = F.linear(x, d.out.weight, d.out.bias)
    assert ctx.shape == (B, K, W) and pred.shape == (B, Q, OUT)
    torch.testing.assert_close(ctx, ref_ctx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-5, atol=1e-5)
    assert torch.equal(d.patch_tokens(ctx), ctx)
    # positions matter before the projector, and the context positions are unused by predict
    assert not torch.allclose(d.project(tokens, pos.flip(1)), ctx)
    assert torch.equal(d.predict(ctx, qpos, pos=pos.flip(1)), pred)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="decoder.norm"):
        decoder(norm="group")
    with pytest.raises(ValueError, match="decoder.positions"):
        decoder(positions="before")


# ---------------------------------------------------------------------------- batch norm over tokens


def test_token_batch_norm_normalises_each_channel_over_all_tokens():
    torch.manual_seed(0)
    bn = TokenBatchNorm(W).train()
    with torch.no_grad():
        bn.bn.weight.uniform_(0.5, 2.0)
        bn.bn.bias.normal_()
    x = torch.randn(B, 7, W) * torch.linspace(0.5, 3, W) + torch.arange(W)
    y = bn(x)
    flat = x.reshape(-1, W)  # B·L tokens per channel
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    ref = (x - mean) / torch.sqrt(var + 1e-5) * bn.bn.weight + bn.bn.bias
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.bn.running_mean, 0.1 * mean)
    torch.testing.assert_close(bn.bn.running_var, 0.9 + 0.1 * flat.var(0, unbiased=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # statistics in the parameters' precision
        yb = bn.eval()(x.bfloat16())
    assert yb.dtype == torch.float32


def test_batch_norm_decoder_blocks_normalise_over_the_batch_of_tokens():
    d = decoder(norm="batch").train()
    norms = [m for n, m in d.named_modules() if n.endswith(("norm1", "norm2")) or n in ("projector_norm", "norm")]
    assert len(norms) == 2 * 4 + 2 and all(isinstance(m, TokenBatchNorm) for m in norms)
    assert not any(isinstance(m, nn.LayerNorm) for m in d.modules())
    # the same draws as the layer-norm decoder: only the norms differ
    layer = decoder().state_dict()
    common = [k for k in layer if "norm" not in k]
    assert all(torch.equal(d.state_dict()[k], layer[k]) for k in common)

    norm1 = d.predictor[1].norm1
    seen = []
    norm1.register_forward_hook(lambda m, a, out: seen.append((a[0].detach(), out.detach())))
    tokens, pos, qpos, _ = inputs()
    d.predict(d.project(tokens, pos), qpos)
    x, y = seen[0]  # (B, K + Q, W)
    flat = x.reshape(-1, W)
    ref = (x - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + 1e-5) * norm1.bn.weight + norm1.bn.bias
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)

    # in training a sample's prediction depends on the rest of the batch; in eval it does not
    def first(model, n):
        return model.predict(model.project(tokens[:n], pos[:n]), qpos[:n])[0]

    assert not torch.allclose(first(d, B), first(d, 2))
    d.eval()
    torch.testing.assert_close(first(d, B), first(d, 2))


def test_global_batch_norm_keeps_the_token_batch_norm():
    d = decoder(norm="batch").train()
    tokens, pos, qpos, _ = inputs()
    before = d.predict(d.project(tokens, pos), qpos)
    global_batch_norm(d)
    assert all(isinstance(m.bn, nn.modules.batchnorm._BatchNorm) for m in d.modules() if isinstance(m, TokenBatchNorm))
    torch.testing.assert_close(d.predict(d.project(tokens, pos), qpos), before)


# ---------------------------------------------------------------------------- positions after the projector


def test_after_projector_the_projection_carries_no_positions():
    d = decoder(positions="after_projector")
    tokens, pos, qpos, _ = inputs()
    other = torch.randn_like(pos) * 3
    ctx = d.project(tokens, pos)
    assert torch.equal(d.project(tokens, other), ctx)  # the target branch gets no decoder positions
    target_head = copy.deepcopy(d)
    assert torch.equal(target_head.project(tokens, other[:1]), ctx)
    pred = d.predict(ctx, qpos, pos=pos)
    assert pred.shape == (B, Q, OUT)
    assert not torch.allclose(d.predict(ctx, qpos, pos=other), pred)
    assert not torch.allclose(d.predict(ctx, qpos + 1, pos=pos), pred)
    with pytest.raises(ValueError, match="needs `pos`"):
        d.predict(ctx, qpos)


def test_after_projector_fixed_sincos_on_the_context_and_learned_map_on_the_queries():
    d = decoder(positions="after_projector", cls_token=True)
    tokens, pos, qpos, cls = inputs()
    seen = capture_input(d.predictor[0])
    ctx = d.project(tokens, pos, cls=cls)
    d.predict(ctx, qpos, pos=pos)
    x = seen[0]
    with torch.no_grad():
        assert torch.equal(x[:, :1], ctx[:, :1])  # the class token at no position
        torch.testing.assert_close(x[:, 1:K + 1], ctx[:, 1:] + sincos_embed(pos, W))
        torch.testing.assert_close(x[:, K + 1:], (d.mask_token + d.position(qpos)).expand(B, -1, -1))


# ---------------------------------------------------------------------------- the class token


@pytest.mark.parametrize("positions", ["embed", "after_projector"])
def test_class_token_goes_through_projector_and_predictor(positions):
    d = decoder(positions=positions, cls_token=True)
    tokens, pos, qpos, cls = inputs()
    seen = capture_input(d.projector[0])
    ctx = d.project(tokens, pos, cls=cls)
    assert ctx.shape == (B, 1 + K, W)
    torch.testing.assert_close(seen[0][:, 0], d.embed(cls))  # embedded, no position added
    assert d.patch_tokens(ctx).shape == (B, K, W)
    pred = d.predict(ctx, qpos, pos=pos)
    assert pred.shape == (B, Q, OUT)  # the class token is not an output
    other = cls + torch.randn_like(cls)
    assert not torch.allclose(d.predict(d.project(tokens, pos, cls=other), qpos, pos=pos), pred)
    ctx2 = ctx.clone()
    ctx2[:, 0] += torch.randn(B, W)  # through the predictor alone as well
    assert not torch.allclose(d.predict(ctx2, qpos, pos=pos), pred)
    # the target branch: every patch, the class token stripped
    all_pos = absolute_positions(4).unsqueeze(0)
    target = d.patch_tokens(copy.deepcopy(d).project(torch.randn(B, 16, IN), all_pos, cls=cls))
    assert target.shape == (B, 16, W)


def test_class_token_given_exactly_when_built_with_one():
    tokens, pos, qpos, cls = inputs()
    with pytest.raises(ValueError, match="cls_token=True"):
        decoder(cls_token=True).project(tokens, pos)
    with pytest.raises(ValueError, match="cls_token=False"):
        decoder().project(tokens, pos, cls=cls)
