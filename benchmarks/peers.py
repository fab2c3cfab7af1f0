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
optimiser step. m3i's side is its trainer's own step (`m3i.train.step.TrainStep`) on a batch
staged as the loop stages it (`Objective.stage`, timed with the step).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

WIDTH, DEPTH, HEADS, SIZE, PATCH, BATCH = 192, 6, 3, 32, 4, 128
CLASSES = 10
M3I_OVERRIDES = ["backbone.name=vit_micro", f"backbone.img_size={SIZE}", f"backbone.patch_size={PATCH}",
                 f"data.image_size={SIZE}", f"data.batch_size={BATCH}", "train.precision=bf16", "train.steps=1000",
                 "train.warmup_steps=0"]


def timm_vit(num_classes: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                             num_classes=num_classes)


def synthetic_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), generator=g, dtype=torch.uint8),
            "label": torch.randint(0, CLASSES, (BATCH,), generator=g),
            "caption": [f"a photo of thing number {i}" for i in range(BATCH)]}


class M3IStep:
    def __init__(self, name: str):
        from m3i.config import load_recipe
        from m3i.objective import Objective
        from m3i.train.loop import lr_lambda
        from m3i.train.step import BadSteps, TrainStep, make_optimizer

        recipe = load_recipe(name, overrides=M3I_OVERRIDES)
        torch.manual_seed(0)
        self.obj = Objective(recipe, num_classes=CLASSES).train()
        batch = synthetic_batch()
        self.obj.prepare(type("Captions", (), {"captions": lambda _: batch["caption"]})())
        opt = make_optimizer(self.obj.param_groups(recipe.train.weight_decay), recipe.train)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe.train))
        self.step = TrainStep(self.obj, self.obj, opt, sched, recipe.train,
                              torch.autocast("cpu", dtype=torch.bfloat16), BadSteps(torch.device("cpu")))
        self.batch, self.i = batch, 0

    def __call__(self) -> float:
        out = self.step(self.obj.stage(self.batch, torch.device("cpu")), self.i)
        self.i += 1
        return float(out["loss"].detach())


class PeerStep:
    """The peer's model and loss on views from m3i's view stage; fused AdamW, clip 1.0."""

    def __init__(self, name: str, views):
        self.name, self.views = name, views
        torch.manual_seed(0)
        if name == "supervised":
            self.model = nn.ModuleDict({"vit": timm_vit(CLASSES)})
        elif name == "simclr":
            from lightly.loss import NTXentLoss
            from lightly.models.modules import SimCLRProjectionHead

            self.model = nn.ModuleDict({"vit": timm_vit(), "head": SimCLRProjectionHead(WIDTH, 512, 128)})
            self.loss = NTXentLoss(temperature=0.2)
        elif name == "mae":
            from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

            vit = timm_vit()
            self.model = nn.ModuleDict({"enc": MaskedVisionTransformerTIMM(vit=vit), "dec": MAEDecoderTIMM(
                num_patches=(SIZE // PATCH) ** 2, patch_size=PATCH, embed_dim=WIDTH, decoder_embed_dim=128,
                decoder_depth=2, decoder_num_heads=4)})
        elif name == "clip":
            from open_clip.loss import ClipLoss

            self.model = nn.ModuleDict({"vit": timm_vit(), "head": nn.Linear(WIDTH, 128), "text": nn.Linear(384, 128)})
            self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())
            self.model.register_parameter("logit_scale", self.logit_scale)
            self.text_cache = torch.randn(BATCH, 384)  # cached frozen-tower embeddings
            self.loss = ClipLoss()
        else:
            raise ValueError(f"no peer for {name!r}")
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
        self.batch = synthetic_batch()

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

    def __call__(self) -> float:
        x = self.views(self.batch["image"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = self.forward(x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return float(loss.detach())


def views_of(obj):
    """The recipe's views from m3i's view stage, drawn on the host, applied on the device."""
    def make(images: torch.Tensor) -> list[torch.Tensor]:
        x = images.float() / 255
        b, c, h, w = images.shape
        return [aug.apply(x, aug.draw(b, c, h, w))[0] for aug in obj.augment]
    return make


def one(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["supervised", "simclr", "mae", "clip"])
    p.add_argument("--pairs", type=int, default=12, help="steps per side, alternating")
    a = p.parse_args()
    print(f"ViT {WIDTH}x{DEPTH} ({HEADS} heads), {SIZE} px / {PATCH} px patches, batch {BATCH}, bf16 autocast, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for name in a.recipes:
        ours = M3IStep(name)
        peer = PeerStep(name, views_of(ours.obj))
        for step in (ours, peer):  # warm-up (allocations, optimiser state)
            step()
            step()
        mine, theirs = [], []
        for i in range(a.pairs):
            if i % 2:
                theirs.append(one(peer))
                mine.append(one(ours))
            else:
                mine.append(one(ours))
                theirs.append(one(peer))
        ratios = [t / m for m, t in zip(mine, theirs)]
        q = statistics.quantiles(ratios, n=4)
        print(f"{name:<11} m3i {a.pairs * BATCH / sum(mine):6.1f} img/s, peer {a.pairs * BATCH / sum(theirs):6.1f} img/s; "
              f"m3i/peer median {statistics.median(ratios):.2f} (quartiles {q[0]:.2f}-{q[2]:.2f}, {a.pairs} pairs)",
              flush=True)


if __name__ == "__main__":
    main()
