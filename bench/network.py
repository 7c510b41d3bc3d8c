"""Benchmark 1: one forward of the tiny network, as GFLOP/s against this machine's float32
matrix-multiply peak (attention's FLOPs counted by formula, `flops.py`; the share of peak from
forwards and matrix products timed alternately), and the fused attention against the paper's
explicit einsum/softmax."""

import torch

from flops import forward_flops, matmul_peak_gflops, share_of_peak
from timing import median_seconds
from uqdm.network import ScoreNetwork


@torch.inference_mode()
def run(batch: int = 8, size: int = 64) -> dict:
    torch.manual_seed(0)
    sdpa = ScoreNetwork(attention="sdpa").eval()
    einsum = ScoreNetwork(attention="einsum").eval()
    einsum.load_state_dict(sdpa.state_dict())
    z, gamma = torch.randn(batch, 3, size, size), torch.tensor(0.0)
    flops = forward_flops(sdpa, z, gamma)
    t_sdpa = median_seconds(lambda: sdpa(z, gamma))
    t_einsum = median_seconds(lambda: einsum(z, gamma))
    peak = matmul_peak_gflops()
    gflops = flops["total"] / t_sdpa / 1e9
    return {
        "batch": batch,
        "image": f"{size}x{size}",
        "gflop_per_forward": flops["total"] / 1e9,
        "attention_flop_share": flops["attention"] / flops["total"],
        "ms_per_image": 1e3 * t_sdpa / batch,
        "gflops": gflops,
        "mm_peak_gflops": peak,
        "share_of_peak": share_of_peak(lambda: sdpa(z, gamma), flops["total"]),
        "einsum_ms_per_image": 1e3 * t_einsum / batch,
        "sdpa_over_einsum": t_sdpa / t_einsum,
    }
