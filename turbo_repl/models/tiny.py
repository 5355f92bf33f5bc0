"""Deterministic weights for the built-in `tiny` models (untrained, so their videos are noise), and random weights
for benchmarking the real architectures without a checkpoint.

Every parameter and buffer is filled from one seeded generator in state-dict order, with a scale that keeps
activations finite through the network. The generator lives on the module's device: a module initialised on the
CPU gets the same weights on every machine (the tiny models), one on a GPU is filled without a host round trip
(benchmarks of 14B networks).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn


def seed_for(name: str) -> int:
    """A stable seed per component name (zlib's crc32 does not change between Python runs, unlike hash())."""
    return zlib.crc32(name.encode())


@torch.no_grad()
def deterministic_init(module: nn.Module, seed: int) -> nn.Module:
    tensors = [(n, t) for n, t in module.state_dict(keep_vars=True).items() if t.is_floating_point()]
    if not tensors:
        return module
    device = tensors[0][1].device
    g = torch.Generator(device).manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, device=device)

    for name, t in tensors:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            values = 0.02 * randn(t.shape)
        elif leaf == "gamma" or (t.dim() == 1 and "norm" in name):
            values = 1.0 + 0.02 * randn(t.shape)      # norm gains near 1
        elif t.dim() >= 2:
            fan_in = t.shape[-1] if leaf == "modulation" else t[0].numel()
            values = randn(t.shape) / math.sqrt(max(fan_in, 1))
        else:
            values = 0.02 * randn(t.shape)
        t.copy_(values.to(t.dtype))
    return module
