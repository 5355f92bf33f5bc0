"""The Wan2.1 / Wan2.2 diffusion transformer, computing what TurboDiffusion's `WanModel` computes.

One class serves Wan2.1 text-to-video (16 input channels) and Wan2.2-A14B image-to-video (36 = 16 noisy latent
+ 20 conditioning channels; no CLIP branch). Module and parameter names are the reference's, so its checkpoints
load without renaming (see checkpoint.py). The network runs in the dtype of its weights:

* float32: everything float32 — the parity mode the fixtures check.
* bfloat16: TurboDiffusion's numerics. The residual stream, the linears and attention are bf16; the time
  embedding, the time projection, the modulation arithmetic and the head are float32; norms compute in float32
  and round to bf16; each modulated input is formed in float32 and then rounded; gates are rounded to bf16
  before they scale a branch. The output velocity is float32.

The linears inside `blocks` are plain `nn.Linear` called as `module(x)`, so an 8-bit module with the same
call can replace any of them.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from turbo_repl.models.attention import AttentionOp

ROPE_THETA = 10000.0
SINUSOID_BASE = 10000.0


# --------------------------------------------------------------------------------------------- norms
# The memory-bound steps of a block. On a GPU each is one fused Triton kernel of `turbo_kernels.norms` (same
# numerics); elsewhere, or where Triton is missing, the plain torch below.

@lru_cache(maxsize=1)
def _fused_norms():
    try:
        from turbo_kernels import norms
    except ImportError:
        return None
    return norms


def _gpu_kernels(x: torch.Tensor):
    return _fused_norms() if x.is_cuda else None


def layernorm(x: torch.Tensor, weight=None, bias=None, eps: float = 1e-6, out: str | None = None):
    """LayerNorm computed in float32 (affine in float32 too), rounded to x's dtype — or, with `out` = "int8" |
    "fp8", quantised per token for an 8-bit linear in the same pass: (x_q, scale)."""
    if k := _gpu_kernels(x) or (out and _fused_norms()):
        return k.layernorm(x, weight, bias, eps, out=out)
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


def modulated_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                        out: str | None = None):
    """adaLN of norm1 / norm2: the rounded non-affine norm times (1 + scale) plus shift in float32, rounded to
    x's dtype (or quantised per token, as `layernorm`)."""
    if k := _gpu_kernels(x) or (out and _fused_norms()):
        return k.modulated_layernorm(x, shift, scale, eps, out=out)
    return (layernorm(x, eps=eps).float() * (1 + scale) + shift).to(x.dtype)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the full width in float32, times the weight in float32, rounded to x's dtype."""
    if k := _gpu_kernels(x):
        return k.rmsnorm(x, weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def rmsnorm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                 eps: float = 1e-6) -> torch.Tensor:
    """q or k [B, L, H*D] -> RMSNorm (rounded), then interleaved-pair RoPE per head in float32 -> [B, L, H, D]."""
    if k := _gpu_kernels(x):
        return k.rmsnorm_rope(x, weight, cos, sin, num_heads, eps)
    B, L, _ = x.shape
    pairs = rmsnorm(x, weight, eps).view(B, L, num_heads, -1, 2).float()
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    """Holds the q / k norm weight (`norm_q`, `norm_k`); see `rmsnorm`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    """The affine LayerNorm before cross-attention (`norm3`); see `layernorm`. norm1, norm2 and the head's norm
    have no weights and are plain `modulated_layernorm` calls."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor, out: str | None = None):
        return layernorm(x, self.weight, self.bias, self.eps, out)


def fp32_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear of the float32 regions (time embedding, projection, head), whatever its weights' dtype."""
    return F.linear(x.float(), linear.weight.float(), linear.bias.float())


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps (0..1000) -> [B, dim] float32: [cos, sin] of t * 10000^(-i/half), in float64."""
    half = dim // 2
    freqs = torch.pow(SINUSOID_BASE, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_tables(head_dim: int, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, 1, head_dim/2] (float32) of the 3-D RoPE over a (T, H, W) patch grid, token order t-h-w.

    The head dim is split into time / height / width parts of d - 4(d//6), 2(d//6), 2(d//6) channels; a part of
    n channels rotates its pairs at 1 / 10000^(2j/n), by the integer grid position (computed in float32).
    """
    d_hw = 2 * (head_dim // 6)
    d_t = head_dim - 2 * d_hw

    def angles(n_pos: int, n_ch: int) -> torch.Tensor:
        freqs = 1.0 / ROPE_THETA ** (torch.arange(0, n_ch, 2, dtype=torch.float32)[: n_ch // 2] / n_ch)
        return torch.outer(torch.arange(n_pos, dtype=torch.float32), freqs)

    T, H, W = grid
    at, ah, aw = angles(T, d_t), angles(H, d_hw), angles(W, d_hw)
    table = torch.cat([
        at[:, None, None].expand(T, H, W, -1),
        ah[None, :, None].expand(T, H, W, -1),
        aw[None, None, :].expand(T, H, W, -1),
    ], dim=-1).reshape(T * H * W, 1, head_dim // 2)
    return table.cos().to(device), table.sin().to(device)


# --------------------------------------------------------------------------------------------- attention

class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float, sparse: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.attn_op = AttentionOp(self.head_dim, sparse)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], residual=None, gate=None) -> torch.Tensor:
        """x [B, L, dim], or the (x_q, scale) pair a fused norm made for 8-bit q/k/v; with `residual` (and
        `gate`), the block's update residual + output * gate."""
        B, L = _tokens(x).shape[:2]
        q = rmsnorm_rope(self.q(x), self.norm_q.weight, *rope, self.num_heads, self.norm_q.eps)
        k = rmsnorm_rope(self.k(x), self.norm_k.weight, *rope, self.num_heads, self.norm_k.eps)
        v = self.v(x).view(B, L, self.num_heads, self.head_dim)
        return residual_update(self.o, self.attn_op(q, k, v).reshape(B, L, -1), residual, gate)


class CrossAttention(nn.Module):
    """Dense attention of the video tokens to the text tokens; no RoPE, no mask (padding is attended to)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, context: torch.Tensor, residual=None) -> torch.Tensor:
        B, L = _tokens(x).shape[:2]
        q = self.norm_q(self.q(x)).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.norm_k(self.k(context)).view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(context).view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return residual_update(self.o, out.transpose(1, 2).reshape(B, L, -1), residual)


# --------------------------------------------------------------------------------------------- blocks

FFN_CHUNK_BYTES = 1 << 30   # hidden FFN activations larger than this are computed a slice of tokens at a time


def residual_update(linear: nn.Module, x, residual, gate=None):
    """residual + linear(x) * gate, fused into the GEMM on the 8-bit fast path (see models.linear)."""
    from turbo_repl.models.linear import residual_update as update   # (imports Triton: only when a block runs)

    return update(linear, x, residual, gate)


def _tokens(x) -> torch.Tensor:
    """The [B, L, dim] tensor of a linear's input, plain or quantised (x_q, scale)."""
    return x[0] if isinstance(x, tuple) else x


def _input_format(linear) -> str | None:
    """"int8" / "fp8" when `linear` takes its input quantised per token from the norm before it."""
    return getattr(linear, "input_format", None)


class WanBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float, sparse: bool):
        super().__init__()
        self.eps = eps
        self.self_attn = SelfAttention(dim, num_heads, eps, sparse)
        self.norm3 = LayerNorm(dim, eps)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def forward(self, x, e0, context, rope):
        """x [B, L, dim]; e0 [B, 6, dim] float32 time projection; context [B, L_text, dim]."""
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e0).chunk(6, dim=1)
        # With 8-bit linears on the GPU each norm emits its output already quantised (no extra pass).
        h = modulated_layernorm(x, shift_sa, scale_sa, self.eps, _input_format(self.self_attn.q))
        # The residual updates x + y * gate run in the epilogues of the 8-bit GEMMs that produce y.
        x = self.self_attn(h, rope, residual=x, gate=gate_sa)
        x = self.cross_attn(self.norm3(x, _input_format(self.cross_attn.q)), context, residual=x)
        h = modulated_layernorm(x, shift_ff, scale_ff, self.eps, _input_format(self.ffn[0]))
        return self.feed_forward(h, x, gate_ff)

    def feed_forward(self, h, residual, gate) -> torch.Tensor:
        """residual + FFN(h) * gate, over slices of tokens when the FFN's hidden activations would be large (14B
        at 720p: 2 GB each for the hidden layer and its GELU in bf16): the same result with a fraction of the
        peak memory."""
        from turbo_repl.models.linear import feed_forward

        B, L = _tokens(h).shape[:2]
        rows = max(1, FFN_CHUNK_BYTES // (self.ffn[0].out_features * 2 * B))
        if L <= rows:
            return feed_forward(self.ffn, h, residual, gate)
        parts = zip(*(t.split(rows, dim=1) for t in h)) if isinstance(h, tuple) else h.split(rows, dim=1)
        return torch.cat([feed_forward(self.ffn, part, res, gate)
                          for part, res in zip(parts, residual.split(rows, dim=1))], dim=1)


class Head(nn.Module):
    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)
        return fp32_linear(self.head, layernorm(x, eps=self.eps).float() * (1 + scale) + shift)


# --------------------------------------------------------------------------------------------- network

class WanDiT(nn.Module):
    """Wan DiT; constructor arguments are the reference `WanModel`'s (unused ones are accepted and checked)."""

    def __init__(self, patch_size=(1, 2, 2), in_dim: int = 16, dim: int = 1536, ffn_dim: int = 8960,
                 freq_dim: int = 256, text_dim: int = 4096, out_dim: int = 16, num_heads: int = 12,
                 num_layers: int = 30, eps: float = 1e-6, *, sparse_attention: bool = False,
                 model_type: str | None = None, text_len: int | None = None, qk_norm: bool = True,
                 cross_attn_norm: bool = True, window_size=(-1, -1)):
        super().__init__()
        if not qk_norm or not cross_attn_norm or tuple(window_size) != (-1, -1):
            raise ValueError("only Wan's configuration is supported: qk_norm and cross_attn_norm on, global "
                             f"attention (got qk_norm={qk_norm}, cross_attn_norm={cross_attn_norm}, "
                             f"window_size={window_size})")
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} must split into {num_heads} heads of an even size")
        del model_type, text_len   # the task follows from in_dim; the text length from the context given
        self.patch_size = tuple(patch_size)
        self.in_dim, self.dim, self.out_dim, self.freq_dim = in_dim, dim, out_dim, freq_dim
        self.head_dim = dim // num_heads
        patch = math.prod(self.patch_size)

        self.patch_embedding = nn.Linear(in_dim * patch, dim)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(dim, ffn_dim, num_heads, eps, sparse_attention)
                                    for _ in range(num_layers))
        self.head = Head(dim, out_dim * patch, eps)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}   # not state: no keys

    def rope(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (*grid, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(self.head_dim, grid, device)
        return self._rope_cache[key]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, 16, T, H, W] noisy latent, timesteps [B, 1] or [B] (rectified-flow t × 1000, used as given),
        context [B, L_text, text_dim], y [B, 20, T, H, W] (image-to-video only) -> velocity [B, 16, T, H, W].
        """
        dtype = self.patch_embedding.weight.dtype
        if y is not None:
            x = torch.cat([x, y], dim=1)
        B, C, T, H, W = x.shape
        kt, kh, kw = self.patch_size
        if C != self.in_dim:
            need = "the 20 conditioning channels y" if C + 20 == self.in_dim else f"{self.in_dim} channels"
            raise ValueError(f"this DiT takes {self.in_dim} input channels, got {C}: pass {need}")
        if T % kt or H % kh or W % kw:
            raise ValueError(f"latent T×H×W {T}×{H}×{W} is not divisible by the patch {self.patch_size}")
        grid = (T // kt, H // kh, W // kw)

        # patchify: each token is (c, kt, kh, kw) channel-major
        tokens = (x.to(dtype).view(B, C, grid[0], kt, grid[1], kh, grid[2], kw)
                  .permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, math.prod(grid), C * kt * kh * kw))
        h = self.patch_embedding(tokens)

        t = timesteps.reshape(-1).expand(B)
        e = fp32_linear(self.time_embedding[2],
                        F.silu(fp32_linear(self.time_embedding[0], timestep_sinusoid(t, self.freq_dim))))
        e0 = fp32_linear(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.dim))
        ctx = self.text_embedding(context.to(dtype))

        rope = self.rope(grid, h.device)
        for block in self.blocks:
            h = block(h, e0, ctx, rope)
        out = self.head(h, e)   # float32 [B, L, kt*kh*kw*16]

        # unpatchify: each token's output is (kt, kh, kw, c) channel-minor
        return (out.view(B, *grid, kt, kh, kw, self.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
                .reshape(B, self.out_dim, T, H, W))

    def place(self, device, dtype: torch.dtype | None) -> "WanDiT":
        """Move to `device` with floating tensors in `dtype` (None: as stored). Norm weights stay float32
        (norms compute in float32, as TurboDiffusion's fast norms store them); 8-bit weights and their scales
        keep their dtypes."""
        for module in self.modules():
            tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            for name, t in tensors:
                new = t.to(device, _placed_dtype(module, name, t, dtype))
                if new.device.type == "cpu" and new.data_ptr() % 64:
                    # memory-mapped safetensors data is only 8-byte aligned, and CPU GEMMs round differently
                    # on unaligned operands: copy, so results do not depend on the file format
                    new = new.clone()
                setattr(module, name, nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new)
        return self.eval().requires_grad_(False)


_EIGHT_BIT = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)


def _placed_dtype(module: nn.Module, name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    # an 8-bit linear (int8 / fp8 weight buffers) keeps its weights and scales as they are; only its bias moves
    eight_bit = any(b.dtype in _EIGHT_BIT for b in module.buffers(recurse=False))
    if not t.is_floating_point() or t.dtype in _EIGHT_BIT or (eight_bit and name != "bias"):
        return t.dtype
    if isinstance(module, (RMSNorm, LayerNorm)):
        return torch.float32
    return dtype or t.dtype
