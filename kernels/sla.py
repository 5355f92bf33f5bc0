"""Sparse-linear attention (SLA) and its 8-bit form SageSLA, for q, k, v laid out [B, L, H, D].

    out = softmax(q kᵀ / sqrt(D)) v  over the key blocks the block map selects      (o_s, the sparse branch)
        + proj_l( φ(q) (φ(k)ᵀ v) / (1e-5 + φ(q) · Σ_L φ(k)) ),  φ = softmax over D   (the linear branch, all keys)

`sparse_linear_attention` runs it through Triton or through the plain-torch reference `sla_ref`, which is what CPU
runs use and what the kernels are tested against.

Triton path (`prepare`, then `attend`):
1. `_stats_kernel`: one pass over q, k, v — the block sums of q and k (block map), and per chunk of rows the
   partials of φ(k)ᵀv, Σφ(k), Σk (linear branch, K's mean) and for SageSLA Σv, max v, max -v — reduced by
   `_reduce_stats_kernel` (deterministic: no atomics). proj_l is folded into the linear branch: M = (φ(k)ᵀv)·Wᵀ.
2. `block_map.select_blocks`: scores and the top-k LUT.
3. SageSLA only: `sagesla.quantize_operands` (int8 q and k, e4m3 v).
4. `_linear_kernel` writes the linear branch, (φ(q)/den)·M + b, into `out`; `_attention_kernel` (one program per
   (query block, batch·head)) loops over the LUT, G key blocks per step (G·block_k keys gathered per product),
   online softmax in base 2 with the running maximum kept on integers; the ragged last key block and LUT padding
   are masked in the last step only; it adds its result to `out`. Everything reads and writes [B, L, H, D] in
   place — no layout copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import available_backends, has_fp8, interpreting, resolve_impl, sm_count
from .block_map import block_lut_ref, check_block_sizes, key_block_count, lut_to_mask, select_blocks
from .sagesla import FP8_MAX, LOG2_FP8_MAX, int8_blocks_ref, quantize_operands, round_fp8_ref, to_e4m3, v_fp8_ref

__all__ = ["sparse_linear_attention", "block_map", "block_lut", "available_backends", "sla_ref"]

LOG2E = 1.4426950408889634
LINEAR_EPS = 1e-5
_LOG2_FP8_MAX = tl.constexpr(LOG2_FP8_MAX)
_FP8_MAX = tl.constexpr(FP8_MAX)
_LINEAR_EPS = tl.constexpr(LINEAR_EPS)


# --------------------------------------------------------------------------------------------- Triton kernels

@triton.jit
def _stats_kernel(q_ptr, s_qb, s_ql, s_qh, k_ptr, s_kb, s_kl, s_kh, v_ptr, s_vb, s_vl, s_vh,
                  qsum_ptr, ksum_ptr, part_ptr, vext_ptr, H, L, n_qb, n_kb, steps_per_chunk, n_chunks,
                  D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr,
                  LINEAR: tl.constexpr, V_STATS: tl.constexpr):
    """One chunk of rows of one (batch, head), R rows (whole query and key blocks) per step: block sums of q and
    k, and the chunk's partials of φ(k)ᵀv, Σφ(k), Σk, and (SageSLA) Σv, max v, max -v."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    NQ: tl.constexpr = R // BLOCK_Q
    NK: tl.constexpr = R // BLOCK_K
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, R)
    ktot = tl.zeros([D], dtype=tl.float32)
    zphi = tl.zeros([D], dtype=tl.float32)
    vsum = tl.zeros([D], dtype=tl.float32)
    vmax = tl.full([D], float("-inf"), dtype=tl.float32)
    vneg = tl.full([D], float("-inf"), dtype=tl.float32)
    kv = tl.zeros([D, D], dtype=tl.float32)
    for j in range(steps_per_chunk):
        step = c * steps_per_chunk + j
        rows = step * R + offs_r
        ok = (rows < L)[:, None]
        x = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_ql + offs_d[None, :], mask=ok, other=0.0)
        x = x.to(tl.float32)
        qb = step * NQ + tl.arange(0, NQ)
        qsum = tl.sum(tl.reshape(x, [NQ, BLOCK_Q, D]), axis=1)
        tl.store(qsum_ptr + (bh * n_qb + qb)[:, None] * D + offs_d[None, :], qsum, mask=(qb < n_qb)[:, None])

        kx = tl.load(k_ptr + b * s_kb + h * s_kh + rows[:, None] * s_kl + offs_d[None, :], mask=ok, other=0.0)
        kx = kx.to(tl.float32)
        kb = step * NK + tl.arange(0, NK)
        ksum = tl.sum(tl.reshape(kx, [NK, BLOCK_K, D]), axis=1)
        tl.store(ksum_ptr + (bh * n_kb + kb)[:, None] * D + offs_d[None, :], ksum, mask=(kb < n_kb)[:, None])
        ktot += tl.sum(ksum, axis=0)
        if LINEAR or V_STATS:
            vx = tl.load(v_ptr + b * s_vb + h * s_vh + rows[:, None] * s_vl + offs_d[None, :], mask=ok, other=0.0)
        if LINEAR:
            e = tl.exp(kx - tl.max(kx, axis=1)[:, None])
            phi = tl.where(ok, e / tl.sum(e, axis=1)[:, None], 0.0)
            zphi += tl.sum(phi, axis=0)
            kv = tl.dot(tl.trans(phi.to(vx.dtype)), vx, kv)
        if V_STATS:
            vf = vx.to(tl.float32)
            vsum += tl.sum(vf, axis=0)
            vmax = tl.maximum(vmax, tl.max(tl.where(ok, vf, float("-inf")), axis=0))
            vneg = tl.maximum(vneg, tl.max(tl.where(ok, -vf, float("-inf")), axis=0))
    part = part_ptr + (bh * n_chunks + c).to(tl.int64) * (D * D + 3 * D)
    tl.store(part + offs_d[:, None] * D + offs_d[None, :], kv)
    tl.store(part + D * D + offs_d, zphi)
    tl.store(part + D * D + D + offs_d, ktot)
    tl.store(part + D * D + 2 * D + offs_d, vsum)
    if V_STATS:
        vext = vext_ptr + (bh * n_chunks + c) * 2 * D
        tl.store(vext + offs_d, vmax)
        tl.store(vext + D + offs_d, vneg)


@triton.jit
def _reduce_stats_kernel(part_ptr, vext_ptr, kv_ptr, z_ptr, kmean_ptr, vmean_ptr, vscale_ptr, n_chunks, L,
                      D: tl.constexpr, RB: tl.constexpr, V_STATS: tl.constexpr):
    """Reduce the statistics pass's per-chunk partials: rows [r*RB, r*RB+RB) of KV, and (r == 0) the vectors."""
    bh = tl.program_id(0)
    r = tl.program_id(1)
    offs_d = tl.arange(0, D)
    rows = r * RB + tl.arange(0, RB)
    PW: tl.constexpr = D * D + 3 * D
    acc = tl.zeros([RB, D], dtype=tl.float32)
    for c in range(n_chunks):
        acc += tl.load(part_ptr + (bh * n_chunks + c).to(tl.int64) * PW + rows[:, None] * D + offs_d[None, :])
    tl.store(kv_ptr + (bh * D + rows[:, None]) * D + offs_d[None, :], acc.to(kv_ptr.dtype.element_ty))
    if r == 0:
        zphi = tl.zeros([D], dtype=tl.float32)
        ktot = tl.zeros([D], dtype=tl.float32)
        vsum = tl.zeros([D], dtype=tl.float32)
        vmax = tl.full([D], float("-inf"), dtype=tl.float32)
        vneg = tl.full([D], float("-inf"), dtype=tl.float32)
        for c in range(n_chunks):
            part = part_ptr + (bh * n_chunks + c).to(tl.int64) * PW + D * D
            zphi += tl.load(part + offs_d)
            ktot += tl.load(part + D + offs_d)
            vsum += tl.load(part + 2 * D + offs_d)
            if V_STATS:
                vmax = tl.maximum(vmax, tl.load(vext_ptr + (bh * n_chunks + c) * 2 * D + offs_d))
                vneg = tl.maximum(vneg, tl.load(vext_ptr + (bh * n_chunks + c) * 2 * D + D + offs_d))
        tl.store(z_ptr + bh * D + offs_d, zphi)
        tl.store(kmean_ptr + bh * D + offs_d, ktot / L)
        if V_STATS:
            vmean = vsum / L
            tl.store(vmean_ptr + bh * D + offs_d, vmean)
            tl.store(vscale_ptr + bh * D + offs_d, tl.maximum(tl.maximum(vmax - vmean, vneg + vmean), 1e-12) / _FP8_MAX)


@triton.jit
def _gather_blocks(lut_row, ks_row, it, BLOCK_K: tl.constexpr, G: tl.constexpr, QUANT: tl.constexpr):
    """Step `it`'s G LUT entries, from G scalar loads, as per-column vectors: key-block index, key row, key scale."""
    BLOCK_N: tl.constexpr = G * BLOCK_K
    offs_n = tl.arange(0, BLOCK_N)
    kb = tl.full([BLOCK_N], 0, tl.int32)
    ks = tl.full([BLOCK_N], 1.0, tl.float32)
    for g in tl.static_range(G):
        kb_g = tl.load(lut_row + it * G + g)
        kb = tl.where(offs_n // BLOCK_K == g, kb_g, kb)
        if QUANT:
            ks = tl.where(offs_n // BLOCK_K == g, tl.load(ks_row + tl.maximum(kb_g, 0)), ks)
    rows = kb * BLOCK_K + offs_n % BLOCK_K
    return kb, tl.max_contiguous(tl.multiple_of(rows, BLOCK_K), BLOCK_K), ks


@triton.jit
def _attend(acc, l_i, m_i, q, q_scale, k_base, s_kl, v_base, s_vl, s_vd, ks_row, lut_row, L, lo, hi,
            BLOCK_K: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
            QUANT: tl.constexpr, PV_FP8: tl.constexpr, MASKED: tl.constexpr, EXACT: tl.constexpr):
    offs_d = tl.arange(0, D)
    for it in range(lo, hi):
        kb, rows, ks = _gather_blocks(lut_row, ks_row, it, BLOCK_K, G, QUANT)
        if MASKED:
            col_ok = (kb >= 0) & (rows < L)
            k = tl.load(k_base + rows[:, None] * s_kl + offs_d[None, :], mask=col_ok[:, None], other=0)
        else:
            k = tl.load(k_base + rows[:, None] * s_kl + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k))
        if QUANT:
            # int32 -> float32 exactly, |qk| <= 256 * 127 * 127 < 2**22: 1.5 * 2**23 + qk has qk in its low bits
            qk = (qk + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
            qk = qk * (q_scale * ks)[None, :]
        if MASKED:
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
        # running maximum kept on integers: rescaling by exact powers of two, P rounded independently of block order
        if QUANT:
            m_new = tl.maximum(m_i, tl.ceil(tl.max(qk, axis=1)))
            if PV_FP8:
                p = tl.exp2(qk - (m_new - _LOG2_FP8_MAX)[:, None])
            else:
                p = tl.exp2(qk - m_new[:, None])
        else:   # scaled inside exp2, one FMA per score (the scale is positive: the maximum stays where it is)
            m_new = tl.maximum(m_i, tl.ceil(tl.max(qk, axis=1) * q_scale))
            p = tl.exp2(qk * q_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if PV_FP8:
            if MASKED:
                vt = tl.load(v_base + offs_d[:, None] * s_vd + rows[None, :] * s_vl, mask=col_ok[None, :], other=0.0)
            else:
                vt = tl.load(v_base + offs_d[:, None] * s_vd + rows[None, :] * s_vl)
            acc = tl.dot(to_e4m3(p, EXACT), tl.trans(vt), acc)
        else:
            if MASKED:
                v = tl.load(v_base + rows[:, None] * s_vl + offs_d[None, :] * s_vd, mask=col_ok[:, None], other=0.0)
            else:
                v = tl.load(v_base + rows[:, None] * s_vl + offs_d[None, :] * s_vd)
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _linear_kernel(qf_ptr, s_fb, s_fl, s_fh, m_ptr, z_ptr, bias_ptr, o_ptr, s_ob, s_ol, s_oh, H, L,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The linear branch into `out`: proj_l(φ(q)·KV / (1e-5 + φ(q)·z)) = (φ(q) / den)·M + b, M = KV·Wᵀ.
    Its own small kernel (many programs per SM) rather than the attention kernel's epilogue, where it ran
    serially after the loop with one program per SM."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = (offs_m < L)[:, None]
    x = tl.load(qf_ptr + b * s_fb + h * s_fh + offs_m[:, None] * s_fl + offs_d[None, :], mask=row_ok, other=0.0)
    x = x.to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    phi = e / tl.sum(e, axis=1)[:, None]
    den = tl.sum(phi * tl.load(z_ptr + bh * D + offs_d)[None, :], axis=1) + _LINEAR_EPS
    mat = tl.load(m_ptr + (bh * D + offs_d[:, None]) * D + offs_d[None, :])
    lin = tl.dot((phi / den[:, None]).to(mat.dtype), mat)
    if HAS_BIAS:
        lin += tl.load(bias_ptr + offs_d).to(tl.float32)[None, :]
    tl.store(o_ptr + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :], lin.to(o_ptr.dtype.element_ty),
             mask=row_ok)


@triton.jit
def _attention_kernel(q_ptr, s_qb, s_ql, s_qh, k_ptr, s_kb, s_kl, s_kh, v_ptr, s_vb, s_vl, s_vh, s_vd,
                      qscale_ptr, kscale_ptr, vscale_ptr, vmean_ptr, lut_ptr,
                      o_ptr, s_ob, s_ol, s_oh, H, L, n_qb, n_kb, count_pad, qk_scale,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, G: tl.constexpr,
                      QUANT: tl.constexpr, PV_FP8: tl.constexpr, ADD_OUT: tl.constexpr, EXACT: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = (offs_m < L)[:, None]
    q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :], mask=row_ok, other=0)
    q_scale = qk_scale
    if QUANT:
        q_scale = tl.load(qscale_ptr + bh * n_qb + qb) * qk_scale
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    ks_row = kscale_ptr + bh * n_kb
    lut_row = lut_ptr + (bh * n_qb + qb) * count_pad
    n_steps = count_pad // G

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_scale, k_base, s_kl, v_base, s_vl, s_vd, ks_row, lut_row, L,
                            0, n_steps - 1, BLOCK_K, G, D, QUANT, PV_FP8, False, EXACT)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_scale, k_base, s_kl, v_base, s_vl, s_vd, ks_row, lut_row, L,
                            n_steps - 1, n_steps, BLOCK_K, G, D, QUANT, PV_FP8, True, EXACT)
    o = acc / l_i[:, None]
    if PV_FP8:
        o = o * tl.load(vscale_ptr + bh * D + offs_d)[None, :] + tl.load(vmean_ptr + bh * D + offs_d)[None, :]
    o_ptrs = o_ptr + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :]
    if ADD_OUT:   # the linear branch, written there by _linear_kernel
        o += tl.load(o_ptrs, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=row_ok)


# --------------------------------------------------------------------------------------------- launchers

def default_config(quantized: bool, block_q: int, block_k: int, D: int) -> dict:
    """Key blocks per step (G), warps and pipeline depth of the attention kernel — the fastest measured on an H100
    (benchmarks/notes-attention.md): 16-bit, one key block per step; 8-bit, 128 keys per step."""
    G = max(1, 128 // block_k) if quantized else 1
    elem = 1 if quantized else 2
    stages = 3 if (3 * 2 * G * block_k + block_q) * D * elem <= 200 * 1024 else 2      # shared memory: K, V, q
    return {"G": G, "num_warps": 8 if block_q >= 128 else 4, "num_stages": stages}


def statistics(q, k, v, block_q: int, block_k: int, linear: bool = True, v_stats: bool = False,
               programs_per_sm: int = 2, num_warps: int | None = None) -> dict:
    """Steps 1 and 2: one pass over q, k, v, then the reduction of its partials. Returns float32 block sums
    `qsum` [BH, n_qb, D] and `ksum` [BH, n_kb, D], `kv` [BH, D, D], `z`, `kmean`, `vmean`, `vscale` [BH, D]."""
    B, L, H, D = q.shape
    BH, dev = B * H, q.device
    n_qb, n_kb = triton.cdiv(L, block_q), triton.cdiv(L, block_k)
    R = max(block_q, block_k)
    steps = triton.cdiv(L, R)
    per_chunk = max(1, min(16, triton.cdiv(steps * BH, programs_per_sm * sm_count(dev))))
    chunks = triton.cdiv(steps, per_chunk)
    f32 = dict(device=dev, dtype=torch.float32)
    st = dict(qsum=torch.empty(BH, n_qb, D, **f32), ksum=torch.empty(BH, n_kb, D, **f32))
    part = torch.empty(BH, chunks, D * D + 3 * D, **f32)
    vext = torch.empty(BH, chunks, 2 * D, **f32) if v_stats else part
    _stats_kernel[(chunks, BH)](
        q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2), st["qsum"], st["ksum"], part, vext,
        H, L, n_qb, n_kb, per_chunk, chunks,
        D=D, BLOCK_Q=block_q, BLOCK_K=block_k, R=R, LINEAR=linear, V_STATS=v_stats,
        num_warps=num_warps or (8 if R * D >= 8192 else 4))
    st["kv"] = torch.empty(BH, D, D, **f32)
    for name in ("z", "kmean", "vmean", "vscale"):
        st[name] = torch.empty(BH, D, **f32)
    rb = 16
    _reduce_stats_kernel[(BH, D // rb)](part, vext, st["kv"], st["z"], st["kmean"], st["vmean"], st["vscale"], chunks, L,
                                     D=D, RB=rb, V_STATS=v_stats, num_warps=4)
    return st


def prepare(q, k, v, proj_w, count: int, count_pad: int, block_q: int, block_k: int, quantized: bool,
            pv_fp8: bool, linear: bool = True) -> dict:
    """Steps 1-3 (statistics, block selection, SageSLA's quantisation): the attention kernel's operands."""
    B, L, H, D = q.shape
    n_qb, n_kb = triton.cdiv(L, block_q), triton.cdiv(L, block_k)
    pv_fp8 = quantized and pv_fp8
    st = statistics(q, k, v, block_q, block_k, linear, v_stats=pv_fp8)
    ops = dict(z=st["z"], vmean=st["vmean"], vscale=st["vscale"], quantized=quantized, pv_fp8=pv_fp8,
               v=(v, v.stride(0), v.stride(1), v.stride(2), 1),
               m=torch.matmul(st["kv"], proj_w.float().t()).to(q.dtype))    # proj_l folded into KV: KV·Wᵀ
    ops["lut"] = select_blocks(st["qsum"], st["ksum"], st["kmean"], L, count, count_pad, block_q, block_k)
    if not quantized:
        ops["q"] = (q, q.stride(0), q.stride(1), q.stride(2))
        ops["k"] = (k, k.stride(0), k.stride(1), k.stride(2))
        ops["qscale"] = ops["kscale"] = st["kmean"]              # unused
        return ops
    q8, ops["qscale"], k8, ops["kscale"], v8 = quantize_operands(
        q, k, v, st["kmean"], st["vmean"], st["vscale"], block_q, block_k, pv_fp8, interpreting())
    Lq, Lp = n_qb * block_q, n_kb * block_k
    ops["q"] = (q8, H * Lq * D, D, Lq * D)
    ops["k"] = (k8, H * Lp * D, D, Lp * D)
    if pv_fp8:
        ops["v"] = (v8, H * D * Lp, 1, D * Lp, Lp)
    return ops


def attend(ops: dict, q, proj_b, block_q: int, block_k: int, config: dict, linear: bool = True):
    """Step 4: the linear branch into `out`, then the attention kernel adds the sparse branch.
    Returns (out [B, L, H, D], the compiled attention kernel)."""
    B, L, H, D = q.shape
    n_qb, n_kb = triton.cdiv(L, block_q), triton.cdiv(L, block_k)
    lut = ops["lut"]
    out = torch.empty(B, L, H, D, device=q.device, dtype=q.dtype)
    so = (out.stride(0), out.stride(1), out.stride(2))
    if linear:
        bm = 64
        _linear_kernel[(triton.cdiv(L, bm), B * H)](
            q, q.stride(0), q.stride(1), q.stride(2), ops["m"], ops["z"], proj_b if proj_b is not None else ops["z"],
            out, *so, H, L, D=D, BLOCK_M=bm, HAS_BIAS=proj_b is not None, num_warps=4)
    compiled = _attention_kernel[(n_qb, B * H)](
        *ops["q"], *ops["k"], *ops["v"], ops["qscale"], ops["kscale"], ops["vscale"], ops["vmean"], lut,
        out, *so, H, L, n_qb, n_kb, lut.shape[-1], D ** -0.5 * LOG2E,
        D=D, BLOCK_M=block_q, BLOCK_K=block_k, G=config["G"], QUANT=ops["quantized"], PV_FP8=ops["pv_fp8"],
        ADD_OUT=linear, EXACT=interpreting(), num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out, compiled


def sla_triton(q, k, v, proj_w, proj_b, count: int, block_q: int, block_k: int, quantized: bool, pv_fp8: bool,
               config: dict | None = None, linear: bool = True):
    """The Triton path. Returns (out [B, L, H, D], LUT int32 [B*H, n_qb, count_pad])."""
    cfg = config or default_config(quantized, block_q, block_k, q.shape[-1])
    count_pad = triton.cdiv(count, cfg["G"]) * cfg["G"]
    ops = prepare(q, k, v, proj_w, count, count_pad, block_q, block_k, quantized, pv_fp8, linear)
    return attend(ops, q, proj_b, block_q, block_k, cfg, linear)[0], ops["lut"]


# --------------------------------------------------------------------------------------------- torch reference

def _sparse_ref(qh, kh, vh, lut, block_q: int, block_k: int, quant: dict | None):
    """o_s [B, H, L, D] float32 from [B, H, L, D] inputs and LUT [B, H, n_qb, count]; chunked over query blocks.
    `quant`: the SageSLA operands (int8 q/k and scales, fp8 v, whether P is fp8) — see sagesla.py."""
    B, H, L, D = qh.shape
    n_qb, count = lut.shape[-2:]
    scale = D ** -0.5
    cols = (lut[..., None] * block_k + torch.arange(block_k, device=lut.device)).flatten(-2)   # [B,H,n_qb,C]
    valid = cols < L
    cols = cols.clamp(max=L - 1)
    C = cols.shape[-1]
    qp = torch.nn.functional.pad(qh, (0, 0, 0, n_qb * block_q - L)).unflatten(2, (n_qb, block_q))
    out = torch.empty(B, H, n_qb, block_q, D, device=qh.device, dtype=torch.float32)
    step = max(1, (1 << 24) // (block_q * C))
    for b in range(B):
        for h in range(H):
            for j in range(0, n_qb, step):
                sl = slice(j, j + step)
                idx, ok = cols[b, h, sl], valid[b, h, sl][:, None, :]
                if quant is None:
                    s = qp[b, h, sl] @ kh[b, h][idx].transpose(-1, -2) * scale
                    p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1)
                    out[b, h, sl] = p @ vh[b, h][idx]
                    continue
                q8 = quant["q8"][b, h].unflatten(0, (n_qb, block_q))[sl].float()
                qscale = quant["qscale"][b, h, sl] * (scale * LOG2E)
                kscale = quant["kscale"][b, h][idx // block_k]
                s = (q8 @ quant["k8"][b, h][idx].float().transpose(-1, -2)) * (qscale[:, None] * kscale)[:, None, :]
                s = s.masked_fill(~ok, float("-inf"))
                m = torch.ceil(s.amax(dim=-1, keepdim=True))
                if quant["pv_fp8"]:
                    p = torch.exp2(s - (m - LOG2_FP8_MAX))
                    o = round_fp8_ref(p) @ quant["v8"][b, h][idx] / p.sum(-1, keepdim=True)
                    out[b, h, sl] = o * quant["vscale"][b, h] + quant["vmean"][b, h]
                else:
                    p = torch.exp2(s - m)
                    out[b, h, sl] = p.to(quant["p_dtype"]).float() @ vh[b, h][idx] / p.sum(-1, keepdim=True)
    return out.flatten(2, 3)[:, :, :L]


def sla_ref(q, k, v, proj_w, proj_b, *, topk: float, block_q: int = 128, block_k: int = 64,
            quantized: bool = False, pv_fp8: bool = True, lut: torch.Tensor | None = None) -> torch.Tensor:
    """The whole SLA function in plain torch, float32, [B, L, H, D] -> float32 [B, L, H, D]. `quantized` emulates
    SageSLA's rounding (int8 q/k, fp8 P and v when `pv_fp8`, else P in q's dtype); `lut` [B, H, n_qb, count]
    overrides the block map."""
    if lut is None:
        lut = block_lut_ref(q, k, topk, block_q, block_k)
    qh, kh, vh = (t.float().transpose(1, 2) for t in (q, k, v))
    quant = None
    if quantized:
        q8, qscale = int8_blocks_ref(qh, block_q)
        k8, kscale = int8_blocks_ref(kh - kh.mean(dim=2, keepdim=True), block_k)
        quant = dict(q8=q8, qscale=qscale, k8=k8, kscale=kscale, pv_fp8=pv_fp8, p_dtype=q.dtype)
        if pv_fp8:
            quant["v8"], quant["vscale"], quant["vmean"] = v_fp8_ref(vh)
    o_s = _sparse_ref(qh, kh, vh, lut, block_q, block_k, quant)
    phi_q, phi_k = torch.softmax(qh, dim=-1), torch.softmax(kh, dim=-1)
    o_l = (phi_q @ (phi_k.transpose(-1, -2) @ vh)) / (LINEAR_EPS + phi_q @ phi_k.sum(dim=2)[..., None])
    lin = o_l @ proj_w.float().T
    if proj_b is not None:
        lin = lin + proj_b.float()
    return (o_s + lin).transpose(1, 2)


# --------------------------------------------------------------------------------------------- API

def _check_inputs(q, k, v, proj_w, proj_b):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [B, L, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    D = q.shape[-1]
    if tuple(proj_w.shape) != (D, D) or (proj_b is not None and tuple(proj_b.shape) != (D,)):
        raise ValueError(f"proj_l must be Linear({D}, {D}): weight [{D}, {D}], bias [{D}]; "
                         f"got {tuple(proj_w.shape)}, {None if proj_b is None else tuple(proj_b.shape)}")


def sparse_linear_attention(q, k, v, proj_w, proj_b, *, topk: float, block_q: int = 128, block_k: int = 64,
                            quantized: bool = False, impl: str = "auto") -> torch.Tensor:
    """SLA (or SageSLA with `quantized`) of q, k, v [B, L, H, D] -> [B, L, H, D] in q's dtype.

    topk: fraction of key blocks each query block attends to exactly (`key_block_count`). proj_w, proj_b: the
    layer's proj_l (Linear(D, D), shared by the heads). impl: 'torch' (plain-torch reference), 'triton', or
    'auto' (Triton on CUDA tensors, torch otherwise)."""
    _check_inputs(q, k, v, proj_w, proj_b)
    check_block_sizes(block_q, block_k)
    B, L, H, D = q.shape
    count = key_block_count(topk, -(-L // block_k))
    pv_fp8 = has_fp8(q.device)
    if resolve_impl(impl, q) == "torch":
        return sla_ref(q, k, v, proj_w, proj_b, topk=topk, block_q=block_q, block_k=block_k, quantized=quantized,
                       pv_fp8=pv_fp8).to(q.dtype)
    if D < 16 or D & (D - 1):
        raise ValueError(f"the Triton kernels need a power-of-two head dim >= 16, not {D}; use impl='torch'")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    proj_w = proj_w.contiguous()
    return sla_triton(q, k, v, proj_w, proj_b, count, block_q, block_k, quantized, pv_fp8)[0]


def block_lut(q, k, *, topk: float, block_q: int = 128, block_k: int = 64, impl: str = "auto") -> torch.Tensor:
    """Selected key blocks per query block: int64 [B, H, n_qb, count], ascending."""
    check_block_sizes(block_q, block_k)
    B, L, H, D = q.shape
    n_kb = -(-L // block_k)
    count = key_block_count(topk, n_kb)
    if resolve_impl(impl, q) == "torch":
        return block_lut_ref(q, k, topk, block_q, block_k)
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    st = statistics(q, k, k, block_q, block_k, linear=False)
    lut = select_blocks(st["qsum"], st["ksum"], st["kmean"], L, count, count, block_q, block_k)
    return lut.view(B, H, -1, count).long()


def block_map(q, k, *, topk: float, block_q: int = 128, block_k: int = 64, impl: str = "auto") -> torch.Tensor:
    """TurboDiffusion's block map: int8 0/1 [B, H, ceil(L / block_q), ceil(L / block_k)]."""
    lut = block_lut(q, k, topk=topk, block_q=block_q, block_k=block_k, impl=impl)
    return lut_to_mask(lut, -(-q.shape[1] // block_k))
