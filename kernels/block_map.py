"""SLA's block map: which key blocks each query block attends to exactly.

score = mean_pool(q, block_q rows) · mean_pool(k - mean_L(k), block_k rows)ᵀ per (batch, head) — a partial last
block is pooled over the rows it has — and every query block keeps its `key_block_count(topk, n_kb)` best key
blocks. The selection is a LUT [B, H, n_qb, count] of key-block indices in ascending order (ties: lower index
first). Ascending matters to the attention kernel: the ragged last key block, when chosen, is always the last entry.

`select_blocks` is the Triton kernel: per group of 16 query blocks it scores their pooled q against all pooled
keys with one product and picks each row's top `count` by finding the count-th largest score bit by bit — no
sort. The block sums it starts from come from the statistics pass in `sla.py`, which reads q, k and v once for
the block map and the linear branch together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl



def key_block_count(topk: float, n_key_blocks: int) -> int:
    """Key blocks kept per query block: TurboDiffusion's `int(topk * n_kb)` (floor), at most n_kb, and — where
    TurboDiffusion's floor gives 0 and its kernel returns NaN — at least 1, so short sequences attend to their
    best key block instead of nothing."""
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"topk is the fraction of key blocks each query block attends to: it must be in (0, 1], "
                         f"not {topk}")
    return max(1, min(n_key_blocks, int(topk * n_key_blocks)))


def check_block_sizes(block_q: int, block_k: int) -> None:
    for name, n in (("block_q", block_q), ("block_k", block_k)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (e.g. 64 or 128), not {n}")


def lut_to_mask(lut: torch.Tensor, n_key_blocks: int) -> torch.Tensor:
    """LUT [..., count] -> 0/1 int8 map [..., n_key_blocks] (TurboDiffusion's `sparse_map`)."""
    mask = torch.zeros(*lut.shape[:-1], n_key_blocks, dtype=torch.int8, device=lut.device)
    return mask.scatter_(-1, lut.long(), 1)


# --------------------------------------------------------------------------------------------- torch reference

def mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., L, D] -> [..., ceil(L / block), D]: the mean of each block's rows (a partial block: of its own rows)."""
    L = x.shape[-2]
    nb = -(-L // block)
    sums = F.pad(x, (0, 0, 0, nb * block - L)).unflatten(-2, (nb, block)).sum(-2)
    rows = (L - torch.arange(nb, device=x.device) * block).clamp(max=block)
    return sums / rows[:, None].to(x.dtype)


def block_lut_ref(q: torch.Tensor, k: torch.Tensor, topk: float, block_q: int = 128, block_k: int = 64) -> torch.Tensor:
    """q, k [B, L, H, D] -> LUT int64 [B, H, n_qb, count], ascending. Computed in float32."""
    qh = q.float().transpose(1, 2)
    kh = k.float().transpose(1, 2)
    kh = kh - kh.mean(dim=2, keepdim=True)
    score = mean_pool(qh, block_q) @ mean_pool(kh, block_k).transpose(-1, -2)
    count = key_block_count(topk, score.shape[-1])
    return score.topk(count, dim=-1).indices.sort(dim=-1).values


# --------------------------------------------------------------------------------------------- Triton

@triton.jit
def _select_kernel(qsum_ptr, ksum_ptr, kmean_ptr, score_ptr, lut_ptr, L, n_qb, n_kb, count, count_pad,
                   D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, QG: tl.constexpr,
                   KC: tl.constexpr, NKB: tl.constexpr, ROWS: tl.constexpr, PAD: tl.constexpr,
                   PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    offs_d = tl.arange(0, D)
    qrow = pid * QG + tl.arange(0, QG)
    qok = qrow < n_qb
    n = tl.maximum(tl.minimum(L - qrow * BLOCK_Q, BLOCK_Q), 1).to(tl.float32)
    pooled = tl.load(qsum_ptr + (bh * n_qb + qrow)[:, None] * D + offs_d[None, :], mask=qok[:, None], other=0.0)
    pooled = pooled / n[:, None]

    # 1. scores of this program's QG query blocks against every pooled (smoothed) key block
    kmean = tl.load(kmean_ptr + bh * D + offs_d)
    for c in range(0, n_kb, KC):
        kidx = c + tl.arange(0, KC)
        kok = kidx < n_kb
        sums = tl.load(ksum_ptr + (bh * n_kb + kidx)[:, None] * D + offs_d[None, :], mask=kok[:, None], other=0.0)
        nk = tl.maximum(tl.minimum(L - kidx * BLOCK_K, BLOCK_K), 1).to(tl.float32)
        sc = tl.dot(pooled, tl.trans(sums / nk[:, None] - kmean[None, :]), input_precision=PRECISION)
        tl.store(score_ptr + (bh * n_qb + qrow)[:, None] * n_kb + kidx[None, :], sc, mask=qok[:, None] & kok[None, :])
    tl.debug_barrier()

    # 2. per row, the `count` largest: the threshold bit by bit on order-preserving unsigned keys, then compaction
    cols = tl.arange(0, NKB)
    for r0 in range(0, QG, ROWS):
        qr = pid * QG + r0 + tl.arange(0, ROWS)
        rok = qr < n_qb
        sc = tl.load(score_ptr + (bh * n_qb + qr)[:, None] * n_kb + cols[None, :],
                     mask=rok[:, None] & (cols < n_kb)[None, :], other=float("-inf"))
        bits = sc.to(tl.int32, bitcast=True)
        ub = sc.to(tl.uint32, bitcast=True)
        key = tl.where(bits < 0, ~ub, ub | 0x80000000)
        t = tl.zeros([ROWS], dtype=tl.uint32)          # largest t with count(key >= t) >= count
        one = tl.full([ROWS], 1, dtype=tl.uint32)
        for i in range(32):
            cand = t | (one << (31 - i))
            enough = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1) >= count
            t = tl.where(enough, cand, t)
        above = key > t[:, None]
        tie = key == t[:, None]
        need = count - tl.sum(above.to(tl.int32), axis=1)
        sel = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=1) <= need[:, None]))
        pos = tl.cumsum(sel.to(tl.int32), axis=1) - 1
        lut_rows = lut_ptr + (bh * n_qb + qr)[:, None] * count_pad
        tl.store(lut_rows + pos, tl.broadcast_to(cols[None, :], [ROWS, NKB]), mask=sel & rok[:, None])
        pad = count + tl.arange(0, PAD)
        tl.store(lut_rows + pad[None, :], tl.full([ROWS, PAD], -1, tl.int32),
                 mask=rok[:, None] & (pad < count_pad)[None, :])


def select_blocks(query_sums: torch.Tensor, key_sums: torch.Tensor, key_mean: torch.Tensor, L: int, count: int,
                  count_pad: int, block_q: int, block_k: int) -> torch.Tensor:
    """query_sums [B*H, n_qb, D], key_sums [B*H, n_kb, D] (float32 sums of each block's rows), key_mean [B*H, D]
    -> LUT int32 [B*H, n_qb, count_pad]: ascending, padded with -1."""
    BH, n_qb, D = query_sums.shape
    n_kb = key_sums.shape[1]
    nkb_p2 = max(16, triton.next_power_of_2(n_kb))
    qg = 16                                  # query blocks per program: the M of the score product
    lut = torch.empty(BH, n_qb, count_pad, device=query_sums.device, dtype=torch.int32)
    score = torch.empty(BH, n_qb, n_kb, device=query_sums.device, dtype=torch.float32)
    _select_kernel[(triton.cdiv(n_qb, qg), BH)](
        query_sums, key_sums, key_mean, score, lut, L, n_qb, n_kb, count, count_pad,
        D=D, BLOCK_Q=block_q, BLOCK_K=block_k, QG=qg, KC=min(64, nkb_p2), NKB=nkb_p2,
        ROWS=max(1, min(qg, 8192 // nkb_p2)), PAD=triton.next_power_of_2(count_pad - count + 1),
        PRECISION="tf32x3", num_warps=8, num_stages=1)
    return lut
