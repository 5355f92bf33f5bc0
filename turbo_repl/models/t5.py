"""The umT5 text encoder (the encoder half of umT5-XXL) that conditions the Wan DiT.

Key names are the reference's (Wan `modules/t5.py`, TurboDiffusion `rcm/utils/umt5.py`), so
`models_t5_umt5-xxl-enc-bf16.pth` loads without renaming. T5 particulars: no 1/sqrt(d) attention scaling, a
learned relative-position bias per layer (umT5) instead of position embeddings, RMSNorm without mean
subtraction, and a gated-GELU feed-forward. Dropout is inactive at inference and has no weights, so it is left out.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class T5LayerNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the weight's dtype, then scaled."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # written out, op by op as the reference does, so that bf16 rounds at the same places
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        if dim_attn % num_heads:
            raise ValueError(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B,L,dim]; bias [B or 1, heads, L, L] added to the logits (position bias, masked keys at -max)."""
        b, n = x.shape[0], self.num_heads
        q = self.q(x).view(b, -1, n, self.q.out_features // n).transpose(1, 2)
        k = self.k(x).view(b, -1, n, self.k.out_features // n).transpose(1, 2)
        v = self.v(x).view(b, -1, n, self.v.out_features // n).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) + bias                    # no 1/sqrt(d): T5 folds it into the weights
        attn = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        y = (attn @ v).transpose(1, 2).reshape(b, -1, self.o.in_features)
        return self.o(y)


class T5FeedForward(nn.Module):
    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), GELU())   # key: gate.0.weight
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5RelativeEmbedding(nn.Module):
    """Bidirectional bucketed relative-position bias: [1, heads, Lq, Lk]."""

    def __init__(self, num_buckets: int, num_heads: int, max_dist: int = 128):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_dist = max_dist
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def buckets(self, lq: int, lk: int, device) -> torch.Tensor:
        rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
        half = self.num_buckets // 2               # one half of the buckets per direction
        exact = half // 2                          # distances below this get a bucket each
        sign = (rel > 0).long() * half
        dist = rel.abs()
        # larger distances share log-spaced buckets up to max_dist (same float32 ops as the reference,
        # so that distances on a bucket boundary land in the same bucket)
        log_bucket = exact + (torch.log(dist.clamp(min=1).float() / exact)
                              / math.log(self.max_dist / exact) * (half - exact)).long()
        log_bucket = log_bucket.clamp(max=half - 1)
        return sign + torch.where(dist < exact, dist, log_bucket)

    def forward(self, lq: int, lk: int) -> torch.Tensor:
        e = self.embedding(self.buckets(lq, lk, self.embedding.weight.device))   # [Lq, Lk, heads]
        return e.permute(2, 0, 1).unsqueeze(0)


class T5Block(nn.Module):
    def __init__(self, dim, dim_attn, dim_ffn, num_heads, num_buckets, shared_pos):
        super().__init__()
        self.norm1 = T5LayerNorm(dim)
        self.attn = T5Attention(dim, dim_attn, num_heads)
        self.norm2 = T5LayerNorm(dim)
        self.ffn = T5FeedForward(dim, dim_ffn)
        self.pos_embedding = None if shared_pos else T5RelativeEmbedding(num_buckets, num_heads)

    def forward(self, x: torch.Tensor, masked_keys: torch.Tensor, shared_bias: torch.Tensor | None) -> torch.Tensor:
        pos = shared_bias if self.pos_embedding is None else self.pos_embedding(x.shape[1], x.shape[1])
        bias = pos.to(x.dtype).masked_fill(masked_keys, torch.finfo(x.dtype).min)
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nn.Module):
    """ids [B,L] int64, mask [B,L] (1 = token, 0 = padding) -> hidden states [B,L,dim] (padding rows included).

    Takes the reference constructor's arguments: `num_layers` or `encoder_layers`; `decoder_layers`,
    `dropout` and `vocab` are accepted and ignored or renamed as the reference's `_t5(encoder_only=True)` does.
    """

    def __init__(self, vocab_size: int | None = None, dim: int = 4096, dim_attn: int = 4096, dim_ffn: int = 10240,
                 num_heads: int = 64, num_layers: int | None = None, num_buckets: int = 32,
                 shared_pos: bool = False, dropout: float = 0.1, *, encoder_layers: int | None = None,
                 decoder_layers: int | None = None, vocab: int | None = None):
        super().__init__()
        vocab_size = vocab_size if vocab_size is not None else vocab
        num_layers = num_layers if num_layers is not None else encoder_layers
        if vocab_size is None or num_layers is None:
            raise ValueError("UMT5Encoder needs vocab_size and num_layers (or encoder_layers)")
        self.dim = dim
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.pos_embedding = T5RelativeEmbedding(num_buckets, num_heads) if shared_pos else None
        self.blocks = nn.ModuleList(T5Block(dim, dim_attn, dim_ffn, num_heads, num_buckets, shared_pos)
                                    for _ in range(num_layers))
        self.norm = T5LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_embedding(ids)
        b, length = ids.shape
        if mask is None:
            mask = torch.ones_like(ids)
        masked_keys = (mask == 0).view(b, 1, 1, length)
        shared = self.pos_embedding(length, length) if self.pos_embedding is not None else None
        for block in self.blocks:
            x = block(x, masked_keys, shared)
        return self.norm(x)


class TextEncoder(nn.Module):
    """Prompts -> the DiT's text context [B, text_len, dim]: the encoder's output for each prompt's tokens
    (including the end-of-sequence token), zeros after them. Move it between devices with `.to(device)`."""

    def __init__(self, encoder: UMT5Encoder, tokenizer, text_len: int):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def device(self) -> torch.device:
        return self.encoder.token_embedding.weight.device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, mask = self.tokenizer(prompts, self.text_len)
        vocab = self.encoder.token_embedding.num_embeddings
        if int(ids.max()) >= vocab:   # checked on the CPU: an out-of-range id on a GPU is a device assert
            raise ValueError(f"the tokenizer produced token id {int(ids.max())} but the text encoder knows only "
                             f"{vocab} tokens: the tokenizer and the text encoder checkpoint do not belong together")
        return self.context(ids, mask)

    @torch.no_grad()
    def context(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask [B, L] -> encoder output with the rows past each prompt's length zeroed."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.encoder(ids, mask)
        lengths = mask.gt(0).sum(dim=1, keepdim=True)                           # [B, 1]
        keep = torch.arange(out.shape[1], device=out.device)[None, :] < lengths  # [B, L]
        return out.masked_fill(~keep.unsqueeze(-1), 0.0)
