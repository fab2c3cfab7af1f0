"""Each recipe's training step next to its peer's implementation of the same method, on the CPU.

    PYTHONPATH=src python benchmarks/peers.py [--recipes supervised simclr mae clip] [--pairs 12]

Needs timm, lightly and open_clip (with torchvision). One config for both sides: a ViT of width
192, depth 6, 3 heads, at 32 px with 4-px patches (65 tokens), batch 128, bf16 autocast, fused
AdamW, gradient clipping at 1.0. The two steps run in one process, alternating step by step (the
first of each pair alternating too), so a busy machine slows both alike; it prints the images/s
of each side and the median, over the pairs, of m3i's speed over the peer's.

- supervised: timm's ``VisionTransformer`` with its own head and ``F.cross_entropy``;
- simclr: a timm ViT, lightly's ``SimCLRProjectionHead`` (192-512-128, batch norm) and
  ``NTXentLoss`` (τ = 0.2), two views;
- mae: lightly's ``MaskedVisionTransformerTIMM`` and ``MAEDecoderTIMM`` (width 128, depth 2,
  4 heads), its token mask at ratio 0.75, the squared error on per-patch normalised pixels;
- clip: a timm ViT and a 128-d head, open_clip's ``ClipLoss`` against cached text embeddings
  (384-d, through a linear map, as m3i's frozen MiniLM tower gives them), learned logit scale.

Both sides get their views from m3i's view stage (crop, flip, colour: the same parameters drawn
on the host and applied on the device), so the comparison is of the model, the objective and the
optimiser step. m3i's side is its trainer's own step, built as `m3i pretrain` builds it
(`m3i.train.setup`), on a batch staged as the loop stages it (`Objective.stage`, timed with the
step); the peers' optimiser step is one for all (`common.PeerUpdate`).
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from common import PeerUpdate, PeerViews, m3i_step, random_batch, timed, timm_vit, trainer_step

WIDTH, DEPTH, HEADS, SIZE, PATCH, BATCH = 192, 6, 3, 32, 4, 128
CLASSES = 10
CPU = torch.device("cpu")
M3I_OVERRIDES = ["backbone.name=vit_micro", f"backbone.img_size={SIZE}", f"backbone.patch_size={PATCH}",
                 f"data.image_size={SIZE}", f"data.batch_size={BATCH}", "train.precision=bf16", "train.steps=1000",
                 "train.warmup_steps=0"]


def vit(num_classes: int = 0) -> nn.Module:
    return timm_vit(SIZE, PATCH, WIDTH, DEPTH, HEADS, num_classes)


def synthetic_batch() -> dict:
    return random_batch(BATCH, SIZE, CLASSES, caption="a photo of thing number {}")


def m3i_side(name: str):
    """m3i's side: the trainer's step of recipe ``name`` -> (the step, its objective)."""
    from m3i.config import load_recipe

    batch = synthetic_batch()
    run = trainer_step(load_recipe(name, overrides=M3I_OVERRIDES), CPU, CLASSES, batch["caption"])
    return m3i_step(run, batch), run.task


class PeerStep:
    """The peer's model and loss on views from m3i's view stage, through the peers' one optimiser step."""

    def __init__(self, name: str, objective):
        self.name = name
        torch.manual_seed(0)
        if name == "supervised":
            self.model = nn.ModuleDict({"vit": vit(CLASSES)})
        elif name == "simclr":
            from lightly.loss import NTXentLoss
            from lightly.models.modules import SimCLRProjectionHead

            self.model = nn.ModuleDict({"vit": vit(), "head": SimCLRProjectionHead(WIDTH, 512, 128)})
            self.loss = NTXentLoss(temperature=0.2)
        elif name == "mae":
            from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

            self.model = nn.ModuleDict({"enc": MaskedVisionTransformerTIMM(vit=vit()), "dec": MAEDecoderTIMM(
                num_patches=(SIZE // PATCH) ** 2, patch_size=PATCH, embed_dim=WIDTH, decoder_embed_dim=128,
                decoder_depth=2, decoder_num_heads=4)})
        elif name == "clip":
            from open_clip.loss import ClipLoss

            self.model = nn.ModuleDict({"vit": vit(), "head": nn.Linear(WIDTH, 128), "text": nn.Linear(384, 128)})
            self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())
            self.model.register_parameter("logit_scale", self.logit_scale)
            self.text_cache = torch.randn(BATCH, 384)  # cached frozen-tower embeddings
            self.loss = ClipLoss()
        else:
            raise ValueError(f"no peer for {name!r}")
        self.model.train()
        self.update = PeerUpdate(self.model)
        self.batch = synthetic_batch()
        self.views = PeerViews(objective, self.batch["image"])

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        m = self.model
        if self.name == "supervised":
            return F.cross_entropy(m["vit"](x[0]).float(), self.batch["label"])
        if self.name == "simclr":
            return self.loss(m["head"](m["vit"](x[0])), m["head"](m["vit"](x[1])))
        if self.name == "clip":
            img = F.normalize(m["head"](m["vit"](x[0])).float(), dim=-1)
            txt = F.normalize(m["text"](self.text_cache).float(), dim=-1)
            return self.loss(img, txt, self.logit_scale.exp().clamp(max=100))
        return self.mae(x[0])

    def mae(self, images: torch.Tensor) -> torch.Tensor:
        """lightly's MAE example: encode the kept tokens, decode with mask tokens, regress the
        (per-patch normalised) pixels of the masked patches."""
        from lightly.models import utils

        enc, dec = self.model["enc"], self.model["dec"]
        b, seq = images.shape[0], enc.sequence_length
        idx_keep, idx_mask = utils.random_token_mask(size=(b, seq), mask_ratio=0.75, device=images.device)
        encoded = enc.encode(images=images, idx_keep=idx_keep)
        x = utils.repeat_token(dec.mask_token, (b, seq))
        x = utils.set_at_index(x, idx_keep, dec.embed(encoded).type_as(x))
        pred = dec.predict(utils.get_at_index(dec.decode(x), idx_mask))
        target = utils.get_at_index(utils.patchify(images, PATCH), idx_mask - 1)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return F.mse_loss(pred.float(), target.float())

    def __call__(self) -> torch.Tensor:
        x = self.views.apply(self.views.draw())
        return self.update(lambda: self.forward(x), CPU)


def pairs(ours, peer, n: int) -> tuple[list[float], list[float]]:
    """Seconds of ``n`` steps of each side, alternating step by step, the first of each pair
    alternating too, after two steps of warm-up each (allocations, optimiser state)."""
    for step in (ours, peer):
        step()
        step()
    mine, theirs = [], []
    for i in range(n):
        for side in ((peer, ours) if i % 2 else (ours, peer)):
            (mine if side is ours else theirs).append(timed(side, CPU))
    return mine, theirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["supervised", "simclr", "mae", "clip"])
    p.add_argument("--pairs", type=int, default=12, help="steps per side, alternating")
    a = p.parse_args()
    print(f"ViT {WIDTH}x{DEPTH} ({HEADS} heads), {SIZE} px / {PATCH} px patches, batch {BATCH}, bf16 autocast, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for name in a.recipes:
        ours, objective = m3i_side(name)
        mine, theirs = pairs(ours, PeerStep(name, objective), a.pairs)
        ratios = [t / m for m, t in zip(mine, theirs)]
        q = statistics.quantiles(ratios, n=4)
        print(f"{name:<11} m3i {a.pairs * BATCH / sum(mine):6.1f} img/s, peer {a.pairs * BATCH / sum(theirs):6.1f} img/s; "
              f"m3i/peer median {statistics.median(ratios):.2f} (quartiles {q[0]:.2f}-{q[2]:.2f}, {a.pairs} pairs)",
              flush=True)


if __name__ == "__main__":
    main()
