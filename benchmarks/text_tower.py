"""Throughput of the text towers (captions per second), printed as a small table.

    PYTHONPATH=src python benchmarks/text_tower.py                      # frozen MiniLM, fp32 and bf16
    PYTHONPATH=src python benchmarks/text_tower.py --all                # + cache hits, fine-tuned, scratch
    PYTHONPATH=src python benchmarks/text_tower.py --emoji-json /tmp/emoji/package/emoji.json

Captions are the emoji names of ``emoji-datasource-google`` when ``--emoji-json`` is given (real,
short captions), otherwise synthetic ones of about 12 tokens. The frozen figures are measured with
the cache off, so every batch runs the model; tokenisation is included in every figure.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import time

import torch

from common import sync
from m3i.encoders.text import MiniLMTower, ScratchTextTower

WORDS = ("red small old bright wooden smiling tiny blue cat dog house tree car bicycle face hand "
         "flag clock boat mountain with and on near under a the of holding two three").split()


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(10)) + f" {i}" for i in range(n)]


def emoji_captions(path: str) -> list[str]:
    with open(path) as f:
        entries = json.load(f)
    return [e["name"].lower() for e in entries if e.get("has_img_google") and e.get("name")]


def throughput(step, batches: list[list[str]], device: torch.device, bf16: bool, warmup: int = 1) -> float:
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
    with autocast:
        for b in batches[:warmup]:
            step(b)
        sync(device)
        start = time.perf_counter()
        for b in batches[warmup:]:
            step(b)
        sync(device)
        elapsed = time.perf_counter() - start
    return sum(len(b) for b in batches[warmup:]) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=6, help="timed batches (after 1 warm-up batch)")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--emoji-json", default=None, help="emoji.json of emoji-datasource-google")
    parser.add_argument("--all", action="store_true", help="also cache hits, fine-tuned MiniLM, scratch tower")
    args = parser.parse_args()
    device = torch.device(args.device)

    n = args.batch * (args.batches + 1)
    pool = emoji_captions(args.emoji_json) if args.emoji_json else synthetic_captions(n)
    captions = [pool[i % len(pool)] for i in range(n)]
    batches = [captions[i:i + args.batch] for i in range(0, n, args.batch)]

    frozen = MiniLMTower(trainable=False, max_length=args.max_length, cache=False).to(device)
    ids, mask = frozen.tokenize(batches[0], device="cpu")
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{'emoji names' if args.emoji_json else 'synthetic captions'}: "
          f"{mask.sum(1).float().mean():.1f} tokens per caption on average (padded to {ids.shape[1]})")

    rows = []
    for bf16 in (False, True):
        rows.append(("MiniLM frozen (no cache)", bf16, throughput(frozen, batches, device, bf16)))

    if args.all:
        cached = MiniLMTower(trainable=False, max_length=args.max_length, cache=True).to(device)
        cached.precompute(captions, batch_size=args.batch, progress=False)
        rows.append(("MiniLM frozen (cache hits)", False, throughput(cached, batches, device, False)))

        def train_step(tower):
            def step(b):
                tower.zero_grad(set_to_none=True)
                tower(b).float().square().mean().backward()
            return step

        tuned = MiniLMTower(trainable=True, max_length=args.max_length).to(device).train()
        scratch = ScratchTextTower(max_length=args.max_length).to(device).train()
        for bf16 in (False, True):
            rows.append(("MiniLM fine-tuned (fwd+bwd)", bf16, throughput(train_step(tuned), batches, device, bf16)))
        for bf16 in (False, True):
            rows.append(("scratch 256x4 (fwd+bwd)", bf16, throughput(train_step(scratch), batches, device, bf16)))

    print(f"{'tower':32s} {'precision':10s} {'captions/s':>11s}")
    for name, bf16, rate in rows:
        print(f"{name:32s} {'bf16' if bf16 else 'fp32':10s} {rate:11,.0f}")


if __name__ == "__main__":
    main()
