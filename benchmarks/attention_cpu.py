import torch, time, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
B,H,N,D = 64,3,66,64
def run(dtype, mask, backend):
    q,k,v = [torch.randn(B,H,N,D, dtype=dtype, requires_grad=True) for _ in range(3)]
    m = torch.rand(B,1,N,N) > 0.5 if mask else None
    if m is not None: m |= torch.eye(N, dtype=torch.bool)
    with sdpa_kernel(backend):
        for i in range(2):
            o = F.scaled_dot_product_attention(q,k,v, attn_mask=m); o.sum().backward()
        t=time.time()
        for i in range(5):
            o = F.scaled_dot_product_attention(q,k,v, attn_mask=m); o.sum().backward()
    return (time.time()-t)/5*1000
for dtype in [torch.float32, torch.bfloat16]:
  for mask in [False, True]:
    for be in [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]:
      try: print(dtype, mask, be, f"{run(dtype, mask, be):.1f} ms")
      except Exception as e: print(dtype, mask, be, "n/a", str(e)[:60])
