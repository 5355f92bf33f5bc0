"""Fused norms of a DiT block: LayerNorm (+ affine) (+ adaLN modulation) (+ 8-bit quantisation), and the q/k
RMSNorm + interleaved rotary embedding.

Numerics follow the reference network in bf16 (TurboDiffusion's fast norms):

* `layernorm`: statistics and affine in float32, rounded to x's dtype. With `shift`/`scale` (adaLN): that
  rounded norm times (1 + scale) plus shift in float32, rounded to x's dtype again. With `out="int8"|"fp8"`
  the rounded result is quantised per token in the same kernel, so the 8-bit input of the next linear costs no
  extra pass over memory — and equals `quantize_rows(layernorm(x, ...), out)` exactly.
* `rmsnorm_rope`: x * rsqrt(mean(x^2) + eps) * weight over the full width in float32, rounded to x's dtype
  (the norm's output), then each head's interleaved pairs (x[2i], x[2i+1]) rotated by the angle whose cos / sin
  are given per position, in float32, rounded to x's dtype.

Each op has its Triton launcher (`*_triton`), its plain-torch reference (`*_ref`) and a public name that runs
the kernel on a GPU and the reference elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .quant8 import DTYPES, QMAX, cast_rne, check_format, quantize_rows_ref, quantize_values


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


# --------------------------------------------------------------------------------------------- LayerNorm

@triton.jit
def _layernorm_kernel(x_ptr, y_ptr, s_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr,
                      D, L, stride_x, stride_y, stride_mb, stride_ml, eps,
                      AFFINE: tl.constexpr, MODULATE: tl.constexpr, OUT_Q: tl.constexpr, FP8: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    y = xc * rstd
    if AFFINE:
        y = y * tl.load(w_ptr + cols, mask=ok, other=0.0) + tl.load(b_ptr + cols, mask=ok, other=0.0)
    if MODULATE:  # the reference's norm hands its result over in x's dtype; the modulation is float32
        y = cast_rne(y, x_ptr.dtype.element_ty).to(tl.float32)
        m = (row // L).to(tl.int64) * stride_mb + (row % L).to(tl.int64) * stride_ml + cols
        y = y * (1.0 + tl.load(scale_ptr + m, mask=ok, other=0.0)) + tl.load(shift_ptr + m, mask=ok, other=0.0)
    y = cast_rne(y, x_ptr.dtype.element_ty)
    if OUT_Q:
        QMAX: tl.constexpr = 448.0 if FP8 else 127.0
        yf = y.to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(yf), axis=0), 1e-8)
        tl.store(y_ptr + row.to(tl.int64) * stride_y + cols, quantize_values(yf, QMAX / amax, FP8), mask=ok)
        tl.store(s_ptr + row, amax / QMAX)
    else:
        tl.store(y_ptr + row.to(tl.int64) * stride_y + cols, y, mask=ok)


def _modulation(m: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """shift/scale broadcastable to x [B, L, D] -> (float32 tensor, stride over B, stride over L)."""
    B, L, D = x.shape
    m = m.float()
    if m.dim() > 3 or m.shape[-1] != D:
        raise ValueError(f"modulation of shape {tuple(m.shape)} does not broadcast to {tuple(x.shape)}")
    m = torch.broadcast_to(m, x.shape)
    if m.stride(-1) != 1:
        m = m.contiguous()
    return m, m.stride(0), m.stride(1)


def layernorm_triton(x, weight=None, bias=None, eps=1e-6, *, shift=None, scale=None, out=None):
    if out is not None:
        check_format(out)
    if (shift is None) != (scale is None):
        raise ValueError("give both shift and scale, or neither")
    if x.dim() not in (2, 3):
        raise ValueError(f"layernorm takes x [L, D] or [B, L, D], got shape {tuple(x.shape)}")
    D = x.shape[-1]
    x3 = (x if x.dim() == 3 else x[None]).contiguous()
    x2 = x3.view(-1, D)
    R = x2.shape[0]
    y = torch.empty((R, D), dtype=DTYPES[out] if out else x.dtype, device=x.device)
    s = torch.empty((R,), dtype=torch.float32, device=x.device)
    if shift is not None:
        shift, smb, sml = _modulation(shift, x3)
        scale, cmb, cml = _modulation(scale, x3)
        if (smb, sml) != (cmb, cml):   # one set of strides serves both: make them alike
            shift, scale = shift.contiguous(), scale.contiguous()
            smb, sml = shift.stride(0), shift.stride(1)
    else:
        smb = sml = 0
    w = weight.float().contiguous() if weight is not None else x2
    b = bias.float().contiguous() if bias is not None else x2
    if weight is not None and bias is None:
        b = torch.zeros_like(w)
    block = triton.next_power_of_2(D)
    if R:
        _layernorm_kernel[(R,)](
            x2, y, s, w, b, shift if shift is not None else x2, scale if scale is not None else x2,
            D, x3.shape[1], x2.stride(0), y.stride(0), smb, sml, eps,
            AFFINE=weight is not None, MODULATE=shift is not None, OUT_Q=out is not None, FP8=out == "fp8",
            BLOCK_D=block, num_warps=_warps(block))
    y = y.view(x.shape)
    return (y, s.view(x.shape[:-1])) if out else y


def layernorm_ref(x, weight=None, bias=None, eps=1e-6, *, shift=None, scale=None, out=None):
    w = weight.float() if weight is not None else None
    b = (bias.float() if bias is not None else torch.zeros_like(w)) if weight is not None else None
    y = F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)
    if shift is not None:
        y = (y.float() * (1 + scale.float()) + shift.float()).to(x.dtype)
    return quantize_rows_ref(y, out) if out else y


def layernorm(x, weight=None, bias=None, eps=1e-6, *, shift=None, scale=None, out=None):
    """LayerNorm over the last dim (affine if `weight` is given), optionally modulated (adaLN: `shift`,
    `scale` broadcastable to x [B, L, D]), returned in x's dtype or, with `out` = "int8" | "fp8", as
    (q [B, L, D], per-token scale float32 [B, L])."""
    fn = layernorm_triton if x.is_cuda else layernorm_ref
    return fn(x, weight, bias, eps, shift=shift, scale=scale, out=out)


def modulated_layernorm(x, shift, scale, eps=1e-6, out=None):
    """norm1 / norm2 of a Wan block: non-affine LayerNorm, then x * (1 + scale) + shift (see `layernorm`)."""
    return layernorm(x, eps=eps, shift=shift, scale=scale, out=out)


# --------------------------------------------------------------------------------------------- RMSNorm + RoPE

@triton.jit
def _rmsnorm_rope_kernel(x_ptr, y_ptr, w_ptr, cos_ptr, sin_ptr, D, L, stride_x, stride_y, stride_c, eps,
                         HALF_HEAD: tl.constexpr, ROPE: tl.constexpr, BLOCK_P: tl.constexpr):
    row = tl.program_id(0)
    p = tl.arange(0, BLOCK_P)            # pair index: elements 2p and 2p + 1
    ok = p < D // 2
    xr = x_ptr + row.to(tl.int64) * stride_x
    x0 = tl.load(xr + 2 * p, mask=ok, other=0.0).to(tl.float32)
    x1 = tl.load(xr + 2 * p + 1, mask=ok, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt((tl.sum(x0 * x0, axis=0) + tl.sum(x1 * x1, axis=0)) / D + eps)
    y0 = cast_rne(x0 * r * tl.load(w_ptr + 2 * p, mask=ok, other=0.0), x_ptr.dtype.element_ty).to(tl.float32)
    y1 = cast_rne(x1 * r * tl.load(w_ptr + 2 * p + 1, mask=ok, other=0.0), x_ptr.dtype.element_ty).to(tl.float32)
    if ROPE:
        t = (row % L).to(tl.int64) * stride_c + p % HALF_HEAD
        c = tl.load(cos_ptr + t, mask=ok, other=1.0)
        s = tl.load(sin_ptr + t, mask=ok, other=0.0)
        y0, y1 = y0 * c - y1 * s, y0 * s + y1 * c
    yr = y_ptr + row.to(tl.int64) * stride_y
    tl.store(yr + 2 * p, cast_rne(y0, y_ptr.dtype.element_ty), mask=ok)
    tl.store(yr + 2 * p + 1, cast_rne(y1, y_ptr.dtype.element_ty), mask=ok)


def _tables(cos: torch.Tensor, sin: torch.Tensor, L: int, half: int):
    cos, sin = cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])
    if cos.shape != (L, half) or sin.shape != (L, half):
        raise ValueError(f"RoPE tables must be [L={L}, head_dim/2={half}] (or [L, 1, head_dim/2]), "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    return cos.float().contiguous(), sin.float().contiguous()


def rmsnorm_rope_triton(x, weight, cos=None, sin=None, num_heads=1, eps=1e-6):
    B, L, D = x.shape
    if D % (2 * num_heads):
        raise ValueError(f"width {D} does not split into {num_heads} heads of an even size")
    half = D // num_heads // 2
    x2 = x.reshape(B * L, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((B * L, D), dtype=x.dtype, device=x.device)
    rope = cos is not None
    if rope:
        cos, sin = _tables(cos, sin, L, half)
    block = triton.next_power_of_2(max(D // 2, 1))
    if B * L:
        _rmsnorm_rope_kernel[(B * L,)](
            x2, y, weight.float().contiguous(), cos if rope else x2, sin if rope else x2, D, L,
            x2.stride(0), y.stride(0), cos.stride(0) if rope else 0, eps,
            HALF_HEAD=half, ROPE=rope, BLOCK_P=block, num_warps=_warps(block))
    return y.view(B, L, num_heads, 2 * half)


def rmsnorm_rope_ref(x, weight, cos=None, sin=None, num_heads=1, eps=1e-6):
    B, L, D = x.shape
    y = F.rms_norm(x.float(), (D,), weight.float(), eps).to(x.dtype).view(B, L, num_heads, -1)
    if cos is None:
        return y
    cos, sin = _tables(cos, sin, L, y.shape[-1] // 2)
    pairs = y.float().unflatten(-1, (-1, 2))
    y0, y1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack((y0 * cos - y1 * sin, y0 * sin + y1 * cos), dim=-1).flatten(-2).to(x.dtype)


def rmsnorm_rope(x, weight, cos, sin, num_heads, eps=1e-6):
    """q or k [B, L, H*D] -> RMSNorm over the full width, then RoPE per head -> [B, L, H, D].
    cos, sin: float32 [L, D/2] (or [L, 1, D/2]) for each token's position."""
    fn = rmsnorm_rope_triton if x.is_cuda else rmsnorm_rope_ref
    return fn(x, weight, cos, sin, num_heads, eps)


def rmsnorm(x, weight, eps=1e-6):
    """RMSNorm over the last dim in float32, times weight, rounded to x's dtype (cross-attention q/k norms)."""
    x3 = x.reshape(-1, 1, x.shape[-1])
    fn = rmsnorm_rope_triton if x.is_cuda else rmsnorm_rope_ref
    return fn(x3, weight, None, None, 1, eps).view(x.shape)


__all__ = ["layernorm", "modulated_layernorm", "rmsnorm", "rmsnorm_rope", "layernorm_triton", "layernorm_ref",
           "rmsnorm_rope_triton", "rmsnorm_rope_ref", "QMAX"]
