"""Deterministic weights for the built-in `tiny` models: untrained, so their videos are noise.

Every parameter and buffer is filled from one seeded generator in state-dict order, with a scale that keeps
activations finite through the network. The same seed always gives the same weights on every machine.
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
    g = torch.Generator().manual_seed(seed)
    for name, t in module.state_dict(keep_vars=True).items():
        if not t.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("bias",) or t.dim() == 1 and ("norm" in name or leaf in ("gamma", "weight")):
            # norm gains near 1, biases near 0
            base = 1.0 if leaf != "bias" else 0.0
            values = base + 0.02 * torch.randn(t.shape, generator=g)
        elif t.dim() >= 2:
            fan_in = t[0].numel() if t.dim() > 2 or leaf != "modulation" else t.shape[-1]
            values = torch.randn(t.shape, generator=g) / math.sqrt(max(fan_in, 1))
        else:
            values = 0.02 * torch.randn(t.shape, generator=g)
        if "gamma" in leaf:
            values = 1.0 + 0.02 * torch.randn(t.shape, generator=g)
        t.copy_(values.to(t.dtype))
    return module
