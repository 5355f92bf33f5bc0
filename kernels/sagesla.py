"""SageSLA's 8-bit operands: per-block int8 Q and K, per-channel FP8 e4m3 V — Triton kernels and torch references.

* Q and K (K smoothed by subtracting its mean over the sequence, which leaves every softmax row unchanged): one
  scale per (batch, head, block of rows) = max|x| / 127 + 1e-7, values rounded half away from zero (TurboDiffusion's
  SageSLA rule). Q blocks are quantised where the block map pools them (`block_map.select_blocks`), K blocks here.
* V (GPUs with FP8): smoothed by its mean over the sequence too — P·V of the smoothed V plus that mean is the
  same product, since each row of P sums to one — then scaled per channel by max|v - mean| / 448 into e4m3 and
  stored transposed, [B*H, D, padded L], the K-major operand layout of Hopper's FP8 tensor-core product.
* P: the softmax numerator scaled into [0, 448] and cast to e4m3 inside the attention kernel (`sla.py`). The
  kernel keeps its running row maximum on integers (log2 units), so P's rounding does not depend on the order
  in which key blocks arrive, and `quantized_attention_ref` below reproduces it.

Forward only. The attention kernel itself and the whole SLA call are in `sla.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant8 import quantize_values

FP8_MAX = 448.0
LOG2_FP8_MAX = 8.807354922057604   # log2(448): P̃ = exp2(s - m + LOG2_FP8_MAX) lies in [0, 448]
_FP8_MAX = tl.constexpr(FP8_MAX)


# --------------------------------------------------------------------------------------------- Triton

@triton.jit
def int8_block(x):
    """float32 tile -> (int8 tile, scale) with one scale for the whole tile."""
    scale = tl.max(tl.max(tl.abs(x), axis=1), axis=0) / 127.0 + 1e-7
    y = x / scale
    y = y + tl.where(y >= 0, 0.5, -0.5)          # the cast truncates: round half away from zero
    return y.to(tl.int8), scale


@triton.jit
def int8_rows(x, BLOCK: tl.constexpr):
    """float32 [R, D] -> (int8 [R, D], scales [R // BLOCK]): one scale per BLOCK consecutive rows."""
    R: tl.constexpr = x.shape[0]
    D: tl.constexpr = x.shape[1]
    x3 = tl.reshape(x, [R // BLOCK, BLOCK, D])
    scale = tl.max(tl.max(tl.abs(x3), axis=2), axis=1) / 127.0 + 1e-7
    y = x3 / scale[:, None, None]
    y = y + tl.where(y >= 0, 0.5, -0.5)
    return tl.reshape(y.to(tl.int8), [R, D]), scale


@triton.jit
def to_e4m3(x, EXACT: tl.constexpr):
    """float32 (|x| <= 448) -> float8e4nv, round to nearest even. The GPU's cast does this; the interpreter's
    does not (EXACT rounds first, through the shared 8-bit helpers)."""
    if EXACT:
        return quantize_values(x, 1.0, True)
    else:
        return x.to(tl.float8e4nv)


@triton.jit
def _quantize_kv_kernel(k_ptr, s_kb, s_kl, s_kh, v_ptr, s_vb, s_vl, s_vh,
                        kmean_ptr, vmean_ptr, vscale_ptr, k8_ptr, kscale_ptr, v8_ptr,
                        H, L, n_kb, Lp,
                        D: tl.constexpr, BLOCK_K: tl.constexpr, PV_FP8: tl.constexpr, EXACT: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = blk * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    ok = (rows < L)[:, None]
    k = tl.load(k_ptr + b.to(tl.int64) * s_kb + h * s_kh + rows[:, None] * s_kl + offs_d[None, :], mask=ok, other=0.0)
    k = tl.where(ok, k.to(tl.float32) - tl.load(kmean_ptr + bh * D + offs_d)[None, :], 0.0)
    k8, scale = int8_block(k)
    tl.store(k8_ptr + (bh.to(tl.int64) * Lp + rows[:, None]) * D + offs_d[None, :], k8)
    tl.store(kscale_ptr + bh * n_kb + blk, scale)
    if PV_FP8:
        v = tl.load(v_ptr + b.to(tl.int64) * s_vb + h * s_vh + rows[:, None] * s_vl + offs_d[None, :], mask=ok, other=0.0)
        v = (v.to(tl.float32) - tl.load(vmean_ptr + bh * D + offs_d)[None, :]) / tl.load(vscale_ptr + bh * D + offs_d)[None, :]
        v = tl.where(ok, tl.minimum(tl.maximum(v, -_FP8_MAX), _FP8_MAX), 0.0)
        tl.store(v8_ptr + (bh.to(tl.int64) * D + offs_d[None, :]) * Lp + rows[:, None], to_e4m3(v, EXACT))


def quantize_keys_values(k, v, kmean, vmean, vscale, block_k: int, pv_fp8: bool, exact_casts: bool):
    """k, v [B, L, H, D] (last dim contiguous); kmean, vmean, vscale [B*H, D] float32 ->
    (k8 int8 [B*H, Lp, D], kscale float32 [B*H, n_kb], v8 float8 [B*H, D, Lp] or None), Lp = n_kb * block_k."""
    B, L, H, D = k.shape
    n_kb = triton.cdiv(L, block_k)
    Lp = n_kb * block_k
    k8 = torch.empty(B * H, Lp, D, device=k.device, dtype=torch.int8)
    kscale = torch.empty(B * H, n_kb, device=k.device, dtype=torch.float32)
    v8 = torch.empty(B * H, D, Lp, device=k.device, dtype=torch.float8_e4m3fn) if pv_fp8 else None
    _quantize_kv_kernel[(n_kb, B * H)](
        k, k.stride(0), k.stride(1), k.stride(2), v, v.stride(0), v.stride(1), v.stride(2),
        kmean, vmean, vscale, k8, kscale, v8 if pv_fp8 else k8,
        H, L, n_kb, Lp, D=D, BLOCK_K=block_k, PV_FP8=pv_fp8, EXACT=exact_casts, num_warps=4)
    return k8, kscale, v8


# --------------------------------------------------------------------------------------------- torch references

def int8_blocks_ref(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., L, D] float -> (int8 [..., nb * block, D] (padded rows 0), scale float32 [..., nb])."""
    L, D = x.shape[-2:]
    nb = -(-L // block)
    xp = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block - L)).unflatten(-2, (nb, block))
    scale = xp.abs().amax(dim=(-2, -1)) / 127.0 + 1e-7
    y = xp / scale[..., None, None]
    q = torch.trunc(y + torch.where(y >= 0, 0.5, -0.5)).to(torch.int8)
    return q.flatten(-3, -2), scale


def round_fp8_ref(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest e4m3 value (ties to even), returned as float32."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def v_fp8_ref(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v [..., L, D] -> (e4m3 values of (v - mean) / scale as float32, scale [..., D], mean [..., D])."""
    vf = v.float()
    mean = vf.mean(dim=-2)
    amax = torch.maximum(vf.amax(dim=-2) - mean, mean - vf.amin(dim=-2))
    scale = amax.clamp_min(1e-12) / FP8_MAX
    return round_fp8_ref((vf - mean[..., None, :]) / scale[..., None, :]), scale, mean
