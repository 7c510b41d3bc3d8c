"""FLOPs of a network forward, and this machine's matrix-multiply peak to hold them against.

`FlopCounterMode` has no formula for PyTorch's fused CPU attention kernel (it counts it as zero),
while the explicit einsum form is counted in full. So attention is counted here by formula, the
same for every kernel, and what the counter saw inside the attention modules is set aside:
per attention over N = H·W pixels with `heads` heads of width d, q·kᵀ and weights·v are each
2·B·heads·N²·d FLOPs, 4·B·N²·C in all (C = heads·d channels); the softmax is not counted.
"""

import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode

from timing import median_seconds, seconds
from uqdm.network import Attention


def attention_flops(qkv_shape: torch.Size, n_heads: int) -> int:
    """2·2·B·heads·N²·d for q·kᵀ and weights·v of one attention over a (B, 3·C, H, W) qkv map."""
    b, c3, h, w = qkv_shape
    n, d = h * w, c3 // 3 // n_heads
    return 2 * 2 * b * n_heads * n**2 * d


def forward_flops(net: torch.nn.Module, *inputs) -> dict:
    """FLOPs of `net(*inputs)`: `other` (convolutions, linear layers: what FlopCounterMode counts
    outside attention), `attention` (by formula) and `total`."""
    attentions = {name: m for name, m in net.named_modules() if isinstance(m, Attention)}
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.append((inp[0].shape, mod.n_heads)))
             for m in attentions.values()]
    try:
        with FlopCounterMode(display=False) as counter:
            net(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    per_module = counter.get_flop_counts()
    root = type(net).__name__
    seen_in_attention = sum(sum(per_module.get(f"{root}.{name}", {}).values()) for name in attentions)
    other = counter.get_total_flops() - seen_in_attention
    attention = sum(attention_flops(shape, heads) for shape, heads in shapes)
    return {"other": other, "attention": attention, "total": other + attention}


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """2·n³ / t for a `torch.mm` of two n×n matrices of `dtype`: the machine's practical peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: torch.mm(a, b), repeats=5) / 1e9


def share_of_peak(fn, flops: int, dtype: torch.dtype = torch.float32, n: int = 2048, rounds: int = 5) -> float:
    """Median over `rounds` of (flops / t_fn) / (2·n³ / t_mm), `fn()` and one n×n `torch.mm` timed
    back to back each round, so that a machine busy with other work slows both alike."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    fn(), torch.mm(a, b)  # warm-up
    ratios = [(flops / seconds(fn)) / (2 * n**3 / seconds(lambda: torch.mm(a, b))) for _ in range(rounds)]
    return statistics.median(ratios)
