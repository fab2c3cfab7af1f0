"""ResNet backbone: shapes, mix/fill semantics, identity at initialisation, clear errors."""
from __future__ import annotations

import pytest
import torch

from m3i.backbones import build_backbone
from m3i.backbones.resnet import BasicBlock, ResNet

pytestmark = pytest.mark.usefixtures("one_thread")


def model(patch_size: int = 8, fill: bool = True, **kw) -> ResNet:
    torch.manual_seed(0)
    m = build_backbone("resnet_nano", img_size=32, patch_size=patch_size, fill=fill, **kw)
    with torch.no_grad():  # zero-initialised residual branches would make every block trivial
        for mod in m.modules():
            if isinstance(mod, BasicBlock):
                mod.conv2[1].weight.fill_(0.5)
    return m.eval()


@pytest.mark.parametrize("patch_size, stem_stride, grid", [(4, 1, 8), (8, 2, 4), (16, 4, 2)])
def test_shapes_and_grid(patch_size, stem_stride, grid):
    m = model(patch_size)
    assert m.stem_stride == stem_stride and m.grid_size == (grid, grid) and m.embed_dim == 128
    f = m.forward_features(torch.randn(4, 3, 32, 32), return_layers=1)
    assert f.pooled.shape == (4, 128) and f.tokens.shape == (4, grid * grid, 128) and f.layers[0].shape[1] == grid ** 2


def test_residual_blocks_start_as_identity_plus_relu():
    torch.manual_seed(0)
    blk = build_backbone("resnet_nano", img_size=32).stages[0].blocks[0].eval()
    x = torch.randn(2, 32, 8, 8)
    assert torch.equal(blk(x), torch.relu(x))  # zero-init of the last BN: the branch adds 0


def test_mix_equals_the_network_on_the_mixed_image():
    m = model()
    x = torch.randn(4, 3, 32, 32)
    visible = torch.zeros(4, 16, dtype=torch.bool)
    visible[0, :8], visible[2, 8:] = True, True
    visible[1, ::2], visible[3, 1::2] = True, True
    f = m.forward_features(x, visible, mode="mix")
    for b in range(2):
        keep = visible[b].view(1, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
        canvas = torch.where(keep, x[b:b + 1], x[b + 2:b + 3])
        full = m.forward_features(canvas).tokens[0]
        assert torch.allclose(f.tokens[b], full[visible[b]], atol=1e-5)
        assert torch.allclose(f.tokens[b + 2], full[visible[b + 2]], atol=1e-5)


def test_fill_puts_the_mask_token_at_hidden_stem_positions():
    m = model()
    x = torch.randn(2, 3, 32, 32)
    visible = torch.ones(2, 16, dtype=torch.bool)
    assert torch.allclose(m.forward_features(x, visible, mode="fill").tokens, m.forward_features(x).tokens, atol=1e-6)
    visible[:, 5] = False
    changed = m.forward_features(x, visible, mode="fill").pooled
    assert not torch.allclose(changed, m.forward_features(x).pooled, atol=1e-4)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="multiple of the final stride 16"):
        build_backbone("resnet_nano", img_size=40, patch_size=16)
    with pytest.raises(ValueError, match="must be 4, 8, 16 for 3 stages, got 6"):
        build_backbone("resnet_nano", patch_size=6)
    with pytest.raises(ValueError, match="cannot drop tokens"):
        model().forward_features(torch.randn(2, 3, 32, 32), torch.ones(2, 16, dtype=torch.bool), mode="drop")
    with pytest.raises(ValueError, match="no timm layout"):
        model().timm_state_dict()


@pytest.mark.parametrize("name", ["resnet_nano", "resnet_micro", "resnet18", "resnet34"])
def test_every_config_trains_a_step(name):
    m = build_backbone(name, img_size=32, patch_size=8).train()
    x = torch.randn(2, 3, 32, 32)
    m.forward_features(x).pooled.sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if n != "mask_token")
