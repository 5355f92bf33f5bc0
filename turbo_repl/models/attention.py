"""The attention inside Wan self-attention, chosen at run time: dense, SLA or SageSLA.

TurboDiffusion checkpoints keep this module at `blocks.N.self_attn.attn_op.local_attn`; its only parameters
are SLA's `proj_l` (a Linear(head_dim, head_dim) shared by the heads). A checkpoint without `proj_l` is a dense
one and can only run `original` attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_MODES = ("original", "sla", "sagesla")


class LocalAttention(nn.Module):
    """q, k, v [B, L, H, D] -> [B, L, H, D]. `mode`, `topk` and the block sizes may change between calls."""

    def __init__(self, head_dim: int, sparse: bool):
        super().__init__()
        self.proj_l = nn.Linear(head_dim, head_dim) if sparse else None
        self.mode = "sla" if sparse else "original"
        self.topk = 0.1
        self.block_q, self.block_k = 128, 64

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.mode == "original":
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)
        if self.proj_l is None:
            raise RuntimeError("this checkpoint has no SLA proj_l weights; use `:set attention original`")
        from turbo_kernels.sla import sparse_linear_attention

        return sparse_linear_attention(
            q, k, v, self.proj_l.weight, self.proj_l.bias, topk=self.topk,
            block_q=self.block_q, block_k=self.block_k, quantized=(self.mode == "sagesla"),
        )


class AttentionOp(nn.Module):
    """Named as TurboDiffusion names it (`attn_op.local_attn`), so its checkpoints load without renaming."""

    def __init__(self, head_dim: int, sparse: bool):
        super().__init__()
        self.local_attn = LocalAttention(head_dim, sparse)

    def forward(self, q, k, v):
        return self.local_attn(q, k, v)


def configure_attention(model: nn.Module, mode: str, topk: float) -> None:
    """Set every self-attention of `model` to `mode` ('original' | 'sla' | 'sagesla') and `topk`."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, not '{mode}'")
    for m in model.modules():
        if isinstance(m, LocalAttention):
            if mode != "original" and m.proj_l is None:
                raise ValueError(f"attention '{mode}' needs an SLA checkpoint (with proj_l); this one is dense: "
                                 "use `:set attention original`")
            m.mode, m.topk = mode, topk
