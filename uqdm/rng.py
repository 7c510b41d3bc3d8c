"""Seeded randomness that does not disturb the global generators."""

import hashlib
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int):
    """Run a block with a fixed seed on the CPU and the current CUDA device, then restore the RNG."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def keyed_generator(*key, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of its own, seeded by the first 63 bits of SHA-256("k₁/k₂/…") (little-endian):
    the same numbers for the same key on every machine, thread and worker process."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
