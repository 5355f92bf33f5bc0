"""The Wan VAE's elementwise passes over channels-last video: RMS norm (+ SiLU), and bias + residual add.

`rms_norm_silu(x, gamma, bias)`: y = normalize(x + bias over the channel dim) * sqrt(C) * gamma, then SiLU if
asked; `normalize` is F.normalize's x / max(||x||_2, eps). The VAE's norms always feed SiLU and then a causal
convolution, so the kernel writes straight into a slice of that convolution's input buffer (`out`), and `bias`
lets the previous convolution leave its bias add to this pass. Computed in float32, rounded once to `out`'s dtype
(the reference network rounds after every step in bf16; this is closer to its float32 result).

`add_bias(h, bias, residual)`: h + bias (per channel) + residual, in place in h where its layout allows: a
convolution left its bias to this pass (cuDNN adds a bias in a pass of its own), so the residual add costs one
pass for both.

The Triton kernels want each pixel's channels contiguous (channels-last: `x.stride(1) == 1`), which makes the
reduction a row sum; the plain-torch references take any layout and are what runs on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .quant8 import cast_rne

EPS = 1e-12   # F.normalize's default


@triton.jit
def _pixel_tile(P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's BLOCK_P pixels x all channels: (batch, pixel rows [BLOCK_P, 1] as int64, channel columns,
    which columns exist, which elements exist)."""
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows < P)[:, None] & col_ok[None, :]
    return tl.program_id(1).to(tl.int64), rows.to(tl.int64)[:, None], cols, col_ok, ok


@triton.jit
def _rms_norm_silu_kernel(x_ptr, y_ptr, g_ptr, b_ptr, P, C, sxb, sxp, syb, syp, scale, eps,
                          HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    batch, r64, cols, col_ok, ok = _pixel_tile(P, C, BLOCK_P, BLOCK_C)
    x = tl.load(x_ptr + batch * sxb + r64 * sxp + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = tl.where(ok, x + tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :], 0.0)
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)
    y = x * inv[:, None] * (tl.load(g_ptr + cols, mask=col_ok, other=0.0) * scale)[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + batch * syb + r64 * syp + cols[None, :], cast_rne(y, y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _add_bias_kernel(h_ptr, r_ptr, b_ptr, P, C, shb, shp, srb, srp,
                     HAS_RES: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    batch, r64, cols, col_ok, ok = _pixel_tile(P, C, BLOCK_P, BLOCK_C)
    h_at = h_ptr + batch * shb + r64 * shp + cols[None, :]
    h = tl.load(h_at, mask=ok, other=0.0).to(tl.float32) + tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_RES:
        h += tl.load(r_ptr + batch * srb + r64 * srp + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(h_at, cast_rne(h, h_ptr.dtype.element_ty), mask=ok)


def _pixel_rows(t: torch.Tensor) -> tuple[int, int] | None:
    """(batch stride, pixel stride) if t [B, C, *S] has contiguous channels and its pixels flatten to one
    evenly strided dim, else None."""
    if t.stride(1) != 1 and t.shape[1] > 1:
        return None
    dims = [(n, s) for n, s in zip(t.shape[2:], t.stride()[2:]) if n > 1]
    if not dims:
        return t.stride(0), t.shape[1]
    for (_, outer), (n, inner) in zip(dims, dims[1:]):
        if outer != n * inner:
            return None
    return t.stride(0), dims[-1][1]


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last_3d if t.dim() == 5 else torch.channels_last)


def _blocks(C: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(C)
    return max(1, min(128, 4096 // block_c)), block_c


def _check(x, gamma, bias, out):
    C = x.shape[1]
    if gamma.numel() != C or (bias is not None and bias.numel() != C):
        raise ValueError(f"gamma/bias must have {C} values (the channel dim of x {tuple(x.shape)})")
    if out is not None and out.shape != x.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, x {tuple(x.shape)}")


def rms_norm_silu_triton(x, gamma, bias=None, *, silu=True, eps=EPS, out=None):
    _check(x, gamma, bias, out)
    if _pixel_rows(x) is None:
        x = _channels_last(x)
    if out is None:
        out = torch.empty_like(x)
    if (ys := _pixel_rows(out)) is None:
        raise ValueError("out must have contiguous channels (channels-last) and flattenable pixels")
    B, C = x.shape[:2]
    P = x[0, 0].numel()
    if out.numel() == 0:
        return out
    block_p, block_c = _blocks(C)
    sxb, sxp = _pixel_rows(x)
    g = gamma.reshape(C).float().contiguous()
    b = bias.reshape(C).float().contiguous() if bias is not None else g
    _rms_norm_silu_kernel[(triton.cdiv(P, block_p), B)](
        x, out, g, b, P, C, sxb, sxp, ys[0], ys[1], C ** 0.5, eps,
        HAS_BIAS=bias is not None, SILU=silu, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return out


def rms_norm_silu_ref(x, gamma, bias=None, *, silu=True, eps=EPS, out=None):
    _check(x, gamma, bias, out)
    C = x.shape[1]
    shape = (1, C) + (1,) * (x.dim() - 2)
    xf = x.float()
    if bias is not None:
        xf = xf + bias.float().reshape(shape)
    # rsqrt(max(sum x^2, eps^2)) == 1 / max(||x||, eps); a plain sum is fast in any layout (vector_norm over a
    # strided dim is not)
    y = xf * xf.square().sum(1, keepdim=True).clamp_min_(eps * eps).rsqrt_()
    y.mul_(gamma.float().reshape(shape) * C ** 0.5)
    if silu:
        F.silu(y, inplace=True)
    return y.to(x.dtype) if out is None else out.copy_(y)


def rms_norm_silu(x, gamma, bias=None, *, silu=True, eps=EPS, out=None):
    """x [B, C, *S] -> normalize(x + bias, dim=1) * sqrt(C) * gamma [C] (then SiLU), in x's dtype, or written
    into `out` (same shape, any dtype). The Triton kernel on a GPU, the plain-torch reference elsewhere."""
    fn = rms_norm_silu_triton if x.is_cuda else rms_norm_silu_ref
    return fn(x, gamma, bias, silu=silu, eps=eps, out=out)


def _check_add(h, bias, residual):
    if bias.numel() != h.shape[1] or (residual is not None and residual.shape != h.shape):
        raise ValueError(f"bias must have {h.shape[1]} values and residual the shape {tuple(h.shape)}")


def add_bias_triton(h, bias, residual=None):
    _check_add(h, bias, residual)
    C = h.shape[1]
    if _pixel_rows(h) is None:
        h = _channels_last(h)
    if residual is not None and _pixel_rows(residual) is None:
        residual = _channels_last(residual)
    if h.numel() == 0:
        return h
    block_p, block_c = _blocks(C)
    shb, shp = _pixel_rows(h)
    srb, srp = _pixel_rows(residual) if residual is not None else (0, 0)
    P = h[0, 0].numel()
    _add_bias_kernel[(triton.cdiv(P, block_p), h.shape[0])](
        h, residual if residual is not None else h, bias.reshape(C).float().contiguous(), P, C, shb, shp, srb, srp,
        HAS_RES=residual is not None, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return h


def add_bias_ref(h, bias, residual=None):
    _check_add(h, bias, residual)
    y = h.float() + bias.float().reshape((1, h.shape[1]) + (1,) * (h.dim() - 2))
    if residual is not None:
        y += residual.float()
    return h.copy_(y)


def add_bias(h, bias, residual=None):
    """h [B, C, *S] + bias [C] (+ residual, h's shape), computed in float32, rounded once to h's dtype and
    stored in h (or, where h's layout does not suit the kernel, a channels-last copy): use the returned tensor."""
    fn = add_bias_triton if h.is_cuda else add_bias_ref
    return fn(h, bias, residual)
