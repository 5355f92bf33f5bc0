"""SageSLA's 8-bit operands: per-block int8 Q and K, per-channel FP8 e4m3 V — Triton kernels and torch references.

* Q and K (K smoothed by subtracting its mean over the sequence, which leaves every softmax row unchanged): one
  scale per (batch, head, block of rows) = max|x| / 127 + 1e-7, values rounded half away from zero (TurboDiffusion's
  SageSLA rule). `quantize_operands` quantises all three after the statistics pass has K's and V's means.
* V (GPUs with FP8): smoothed by its mean over the sequence too — P·V of the smoothed V plus that mean is the
  same product, since each row of P sums to one — then scaled per channel by max|v - mean| / 448 into e4m3 and
  stored transposed, [B*H, D, padded L], the K-major operand layout of Hopper's FP8 tensor-core product.
* P: the softmax numerator scaled into [0, 448] and cast to e4m3 inside the attention kernel (`sla.py`). The
  kernel keeps its running row maximum on integers (log2 units), so P's rounding does not depend on the order
  in which key blocks arrive, and `sla.sla_ref(..., quantized=True)` reproduces it with the helpers below.

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
def to_e4m3(x, EXACT: tl.constexpr):
    """float32 (|x| <= 448) -> float8e4nv, round to nearest even. The GPU's cast does this; the interpreter's
    does not (EXACT rounds first, through the shared 8-bit helpers)."""
    if EXACT:
        return quantize_values(x, 1.0, True)
    else:
        return x.to(tl.float8e4nv)


@triton.jit
def _quantize_kernel(q_ptr, s_qb, s_ql, s_qh, k_ptr, s_kb, s_kl, s_kh, v_ptr, s_vb, s_vl, s_vh,
                     kmean_ptr, vmean_ptr, vscale_ptr, q8_ptr, qscale_ptr, k8_ptr, kscale_ptr, v8_ptr,
                     H, L, n_qb, n_kb, Lq, Lp,
                     D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PV_FP8: tl.constexpr,
                     EXACT: tl.constexpr):
    """Program i < n_kb: key block i (int8 k - kmean, e4m3 (v - vmean) / vscale transposed); else query block
    i - n_kb (int8 q)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_d = tl.arange(0, D)
    if blk < n_kb:
        krows = blk * BLOCK_K + tl.arange(0, BLOCK_K)
        kok = (krows < L)[:, None]
        k = tl.load(k_ptr + b * s_kb + h * s_kh + krows[:, None] * s_kl + offs_d[None, :], mask=kok, other=0.0)
        k = tl.where(kok, k.to(tl.float32) - tl.load(kmean_ptr + bh * D + offs_d)[None, :], 0.0)
        k8, kscale = int8_block(k)
        tl.store(k8_ptr + (bh.to(tl.int64) * Lp + krows[:, None]) * D + offs_d[None, :], k8)
        tl.store(kscale_ptr + bh * n_kb + blk, kscale)
        if PV_FP8:
            v = tl.load(v_ptr + b * s_vb + h * s_vh + krows[:, None] * s_vl + offs_d[None, :], mask=kok, other=0.0)
            v = (v.to(tl.float32) - tl.load(vmean_ptr + bh * D + offs_d)[None, :]) / \
                tl.load(vscale_ptr + bh * D + offs_d)[None, :]
            v = tl.where(kok, tl.minimum(tl.maximum(v, -_FP8_MAX), _FP8_MAX), 0.0)
            tl.store(v8_ptr + (bh.to(tl.int64) * D + offs_d[None, :]) * Lp + krows[:, None], to_e4m3(v, EXACT))
    else:   # (names differ from the branch above: Triton wants one type per name across both branches)
        qb = blk - n_kb
        qrows = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        qok = (qrows < L)[:, None]
        x = tl.load(q_ptr + b * s_qb + h * s_qh + qrows[:, None] * s_ql + offs_d[None, :], mask=qok, other=0.0)
        x8, qscale = int8_block(x.to(tl.float32))
        tl.store(q8_ptr + (bh.to(tl.int64) * Lq + qrows[:, None]) * D + offs_d[None, :], x8)
        tl.store(qscale_ptr + bh * n_qb + qb, qscale)


def quantize_operands(q, k, v, kmean, vmean, vscale, block_q: int, block_k: int, pv_fp8: bool, exact_casts: bool):
    """q, k, v [B, L, H, D] (last dim contiguous); kmean, vmean, vscale [B*H, D] float32 -> (q8 int8 [B*H, Lq, D],
    qscale [B*H, n_qb], k8 int8 [B*H, Lp, D], kscale [B*H, n_kb], v8 e4m3 [B*H, D, Lp] or None), Lq, Lp the
    lengths padded to whole blocks (padding rows are 0)."""
    B, L, H, D = k.shape
    n_qb, n_kb = triton.cdiv(L, block_q), triton.cdiv(L, block_k)
    Lq, Lp = n_qb * block_q, n_kb * block_k
    dev = k.device
    q8 = torch.empty(B * H, Lq, D, device=dev, dtype=torch.int8)
    k8 = torch.empty(B * H, Lp, D, device=dev, dtype=torch.int8)
    qscale = torch.empty(B * H, n_qb, device=dev, dtype=torch.float32)
    kscale = torch.empty(B * H, n_kb, device=dev, dtype=torch.float32)
    v8 = torch.empty(B * H, D, Lp, device=dev, dtype=torch.float8_e4m3fn) if pv_fp8 else None
    _quantize_kernel[(n_kb + n_qb, B * H)](
        q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2), kmean, vmean, vscale, q8, qscale, k8, kscale,
        v8 if pv_fp8 else k8, H, L, n_qb, n_kb, Lq, Lp,
        D=D, BLOCK_Q=block_q, BLOCK_K=block_k, PV_FP8=pv_fp8, EXACT=exact_casts, num_warps=4)
    return q8, qscale, k8, kscale, v8


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
