"""Attention forward+backward on the CPU, by kernel and dtype, at the token counts of the CPU demo.

    python benchmarks/attention_cpu.py

Prints milliseconds per call; it is how the ViT's CPU attention path was chosen."""
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {  # (batch, heads, tokens, head dim), masked
    "encoder, mix input (64 canvases x 66 tokens)": ((64, 3, 66, 64), True),
    "encoder, full view (128 x 65 tokens)": ((128, 3, 65, 64), False),
    "dense decoder (128 x 96 tokens)": ((128, 4, 96, 32), False),
}


def bench(shape, masked, dtype, backend, reps=5):
    q, k, v = [torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3)]
    m = None
    if masked:
        m = torch.rand(shape[0], 1, shape[2], shape[2]) > 0.5
        m |= torch.eye(shape[2], dtype=torch.bool)
    with sdpa_kernel(backend):
        for i in range(reps + 2):
            if i == 2:
                t = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, attn_mask=m).sum().backward()
    return (time.perf_counter() - t) / reps * 1000


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, (shape, masked) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            row = [f"{be.name.lower()} {bench(shape, masked, dtype, be):6.1f} ms"
                   for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)]
            print(f"{name:<48} {str(dtype).removeprefix('torch.'):<9} " + "  ".join(row))
