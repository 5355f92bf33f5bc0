"""8-bit quantisation of activations and weights: int8 or FP8 (e4m3), symmetric, one scale per group.

Two layouts:

* **Per token** (the fast path's activations): one scale per row, or per (row, 128 columns) group.
  `scale = amax / QMAX` (127 for int8, 448 for e4m3), `q = round_half_even(x / scale)`. Triton kernel
  `quantize_rows` beside its torch reference `quantize_rows_ref`; they agree bit for bit.
* **128x128 tiles** (TurboDiffusion's `-quant.pth` weights, and its activations): one scale per 128x128 tile of
  the 2-D matrix, `scale = amax / 128`, `q = round_half_even(x * 128 / amax)` saturated to [-128, 127] — so +amax
  becomes 127 (the reference divides by 128, not 127). `quantize_tiles_ref`, plain torch: weights are
  quantised once at load, and the reference-exact forward is a parity path.

The jit helpers `round_half_even`, `rne_int`, `cast_rne` and `quantize_values` are shared by the norm and GEMM kernels that
emit 8-bit outputs, so every producer rounds the same way.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

FORMATS = ("int8", "fp8")
QMAX = {"int8": 127.0, "fp8": 448.0}
DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
TILE = 128            # TurboDiffusion's tile, and our per-token-group width
AMAX_FLOOR = 1e-8     # an all-zero group gets scale 1e-8 / QMAX instead of 0

# The Triton interpreter (CPU tests) rounds float32 -> bfloat16 by truncation and float32 -> fp8 without
# round-to-nearest-even; the GPU's conversions round to nearest even. Under the interpreter the kernels round
# explicitly first, so that both compute the same function; on a GPU they use the hardware conversion.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"8-bit format must be one of {', '.join(FORMATS)}, not '{fmt}'")
    return fmt


# --------------------------------------------------------------------------------------------- Triton

@triton.jit
def round_half_even(v):
    """Round to the nearest integer, ties to even (torch.round). Exact for |v| < 2**22."""
    if _INTERPRETED:  # the interpreter has no libdevice
        f = tl.floor(v + 0.5)
        odd = f != 2.0 * tl.floor(f * 0.5)
        return tl.where((f - v == 0.5) & odd, f - 1.0, f)
    else:
        return libdevice.rint(v)


@triton.jit
def rne_int(v):
    """float32 -> int32, rounded to the nearest integer, ties to even; exact for |v| < 2**22. One float add and
    one integer subtract: adding 1.5 * 2**23 rounds v to an integer (the add rounds to nearest even) that then
    sits in the low mantissa bits. The GPU's float-to-integer conversions and its rounding instruction run at a
    quarter of the rate of adds or less, which made the int8 epilogues cost more than FP8's."""
    return (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def cast_rne(v, dtype: tl.constexpr):
    """float32 -> dtype, rounding to nearest even (see _INTERPRETED)."""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _e4m3_grid(v):
    """Round float32 v (|v| <= 448) to the nearest e4m3 value, ties to even, still as float32: the cast to
    float8 that follows is then exact, also in the interpreter (see _INTERPRETED)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000        # keep 3 mantissa bits, RNE
    normal = bits.to(tl.float32, bitcast=True)
    a = round_half_even(tl.abs(v) * 512.0) * (1.0 / 512.0)         # below 2**-6 the step is 2**-9
    subnormal = tl.where(v < 0, -a, a)                               # keeps the sign of zero, as torch does
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)


@triton.jit
def quantize_values(v, inv_scale, FP8: tl.constexpr):
    """float32 values times inv_scale (= QMAX / amax) -> int8 or float8e4nv."""
    v = v * inv_scale
    if FP8:
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        if _INTERPRETED:
            v = _e4m3_grid(v)
        return v.to(tl.float8e4nv)
    else:
        return rne_int(tl.minimum(tl.maximum(v, -128.0), 127.0)).to(tl.int8)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, stride_q, stride_s,
                          FP8: tl.constexpr, GROUPED: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    QMAX: tl.constexpr = 448.0 if FP8 else 127.0
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows[:, None] < M
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x
    q_rows = q_ptr + rows[:, None].to(tl.int64) * stride_q
    if GROUPED:  # BLOCK_K == group width: one pass, one scale per (row, group)
        for g in range(0, tl.cdiv(K, BLOCK_K)):
            c = g * BLOCK_K + cols[None, :]
            ok = row_ok & (c < K)
            x = tl.load(x_rows + c, mask=ok, other=0.0).to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-8)
            tl.store(q_rows + c, quantize_values(x, (QMAX / amax)[:, None], FP8), mask=ok)
            tl.store(s_ptr + rows.to(tl.int64) * stride_s + g, amax / QMAX, mask=rows < M)
    else:        # two passes over the row: amax, then quantise (the second read comes from cache)
        amax = tl.full((BLOCK_M,), 1e-8, tl.float32)
        for k in range(0, K, BLOCK_K):
            c = k + cols[None, :]
            x = tl.load(x_rows + c, mask=row_ok & (c < K), other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        inv = (QMAX / amax)[:, None]
        for k in range(0, K, BLOCK_K):
            c = k + cols[None, :]
            ok = row_ok & (c < K)
            x = tl.load(x_rows + c, mask=ok, other=0.0).to(tl.float32)
            tl.store(q_rows + c, quantize_values(x, inv, FP8), mask=ok)
        tl.store(s_ptr + rows.to(tl.int64) * stride_s, amax / QMAX, mask=rows < M)


def quantize_rows(x: torch.Tensor, fmt: str, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K] int8 | float8_e4m3fn, scale float32 [...] or [..., ceil(K/group)]).

    `group=None`: one scale per token (row); `group=128`: one per 128 consecutive columns of a token."""
    check_format(fmt)
    if group not in (None, TILE):
        raise ValueError(f"quantisation group must be None (per token) or {TILE}, not {group}")
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    q = torch.empty((M, K), dtype=DTYPES[fmt], device=x.device)
    groups = triton.cdiv(K, TILE) if group else 1
    s = torch.empty((M, groups), dtype=torch.float32, device=x.device)
    if group:
        block_m, block_k, warps = 16, TILE, 4
    else:
        block_m = 1 if K >= 1024 else 8
        block_k = min(triton.next_power_of_2(K), 4096)
        warps = 8 if block_k >= 4096 else 4
    if M:
        _quantize_rows_kernel[(triton.cdiv(M, block_m),)](
            x2, q, s, M, K, x2.stride(0), q.stride(0), s.stride(0),
            FP8=(fmt == "fp8"), GROUPED=bool(group), BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps)
    lead = x.shape[:-1]
    return q.view(*lead, K), (s.view(*lead, groups) if group else s.view(lead))


@triton.jit
def _int8_to_row_scales_kernel(q_ptr, s_ptr, out_ptr, out_s_ptr, M, K, G, stride_q, stride_s, stride_out,
                               GRID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
                               CHUNK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    g = tl.arange(0, BLOCK_G)
    s_rows = s_ptr + rows[:, None].to(tl.int64) * stride_s
    scales = tl.load(s_rows + g[None, :], mask=row_ok[:, None] & (g[None, :] < G), other=0.0)
    row_scale = tl.maximum(tl.max(scales, axis=1), 1e-30)
    chunk = tl.arange(0, CHUNK)
    cols = chunk[None, :, None] * 128 + tl.arange(0, 128)[None, None, :]
    for k in range(0, G, CHUNK):   # CHUNK groups of 128 columns at a time
        group_ok = row_ok[:, None] & (k + chunk[None, :] < G)
        ratio = tl.load(s_rows + k + chunk[None, :], mask=group_ok, other=0.0) / row_scale[:, None]
        c = k * 128 + cols
        ok = group_ok[:, :, None] & (c < K)
        q = tl.load(q_ptr + rows[:, None, None].to(tl.int64) * stride_q + c, mask=ok, other=0).to(tl.float32)
        if GRID:   # values s * (q + 128) - offset: the offset stays, the steps change
            q = tl.minimum(rne_int((q + 128.0) * ratio[:, :, None]) - 128, 127).to(tl.int8)
        else:
            q = quantize_values(q, ratio[:, :, None], False)
        tl.store(out_ptr + rows[:, None, None].to(tl.int64) * stride_out + c, q, mask=ok)
    tl.store(out_s_ptr + rows, row_scale, mask=row_ok)


def int8_to_row_scales(q: torch.Tensor, group_scale: torch.Tensor, gelu_grid: bool = False, chunk: int = 8
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values with one scale per (row, 128 columns) -> the same values re-rounded to one scale per row
    (the largest of the row's): (q_row [M, K], scale [M]). For a GEMM that then keeps one integer accumulator
    over all of K; costs one pass over the int8 values and a second rounding (at most half a step of the row
    scale per value). `gelu_grid`: the values are s * (q + 128) - offset (turbo_kernels.gemm8's GELU grid).
    `chunk`: the groups of 128 columns a program handles per step (on an H100 at 1.3B: 1 group 0.300 ms, 4
    0.282 ms, 8 0.254 ms)."""
    M, K = q.shape
    G = group_scale.shape[1]
    if group_scale.shape != (M, triton.cdiv(K, TILE)):
        raise ValueError(f"group scales have shape {tuple(group_scale.shape)}; expected [{M}, {triton.cdiv(K, TILE)}]")
    q, group_scale = q.contiguous(), group_scale.float().contiguous()
    out = torch.empty_like(q)
    scale = torch.empty(M, dtype=torch.float32, device=q.device)
    if M:
        block_m = 16
        _int8_to_row_scales_kernel[(triton.cdiv(M, block_m),)](
            q, group_scale, out, scale, M, K, G, q.stride(0), group_scale.stride(0), out.stride(0),
            GRID=gelu_grid, BLOCK_M=block_m, BLOCK_G=triton.next_power_of_2(G), CHUNK=chunk, num_warps=4)
    return out, scale


# --------------------------------------------------------------------------------------------- references

def int8_to_row_scales_ref(q: torch.Tensor, group_scale: torch.Tensor, gelu_grid: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `int8_to_row_scales`: the same float32 arithmetic."""
    scale = group_scale.float().amax(dim=1).clamp_min(1e-30)
    ratio = (group_scale.float() / scale[:, None]).repeat_interleave(TILE, dim=1)[:, : q.shape[1]]
    if gelu_grid:
        return (torch.round((q.float() + 128.0) * ratio) - 128.0).clamp_max(127.0).to(torch.int8), scale
    return round_to_format(q.float() * ratio, "int8"), scale


def round_to_format(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """float32 values already divided by their scale -> int8 (round half even, saturate) or e4m3."""
    if fmt == "int8":
        return torch.round(v).clamp_(-128, 127).to(torch.int8)
    return v.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def quantize_rows_ref(x: torch.Tensor, fmt: str, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `quantize_rows`: the same function, the same float32 arithmetic."""
    check_format(fmt)
    K = x.shape[-1]
    xf = x.float()
    if group:
        groups = -(-K // group)
        padded = torch.nn.functional.pad(xf, (0, groups * group - K)).unflatten(-1, (groups, group))
        amax = padded.abs().amax(-1).clamp_min(AMAX_FLOOR)                       # [..., groups]
        inv = (amax.new_tensor(QMAX[fmt]) / amax).repeat_interleave(group, -1)[..., :K]
    else:
        amax = xf.abs().amax(-1).clamp_min(AMAX_FLOOR)                           # [...]
        inv = (amax.new_tensor(QMAX[fmt]) / amax)[..., None]
    # (a python number divided by a tensor is computed as a reciprocal times the number: not what the kernel
    # does, hence the tensor numerator above)
    return round_to_format(xf * inv, fmt), amax / QMAX[fmt]


def quantize_tiles_ref(x: torch.Tensor, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """TurboDiffusion's quantisation of a 2-D matrix [R, C] in tile x tile blocks.

    Returns (int8 [R, C], scale float32 [ceil(R/tile), ceil(C/tile)]); x ~= q * scale[tile of x]. Partial
    tiles at the edges take their amax over the values they hold."""
    if x.dim() != 2:
        raise ValueError(f"tile quantisation takes a 2-D matrix, got shape {tuple(x.shape)}")
    R, C = x.shape
    rt, ct = -(-R // tile), -(-C // tile)
    padded = torch.nn.functional.pad(x.float(), (0, ct * tile - C, 0, rt * tile - R))
    blocks = padded.view(rt, tile, ct, tile)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR)                  # [rt, ct]
    q = torch.round(blocks * 128.0 / amax[:, None, :, None]).clamp_(-128, 127).to(torch.int8)
    return q.view(rt * tile, ct * tile)[:R, :C].contiguous(), amax / 128.0


def expand_tiles(scale: torch.Tensor, rows: int, tile: int = TILE) -> torch.Tensor:
    """Tile scales [ceil(R/tile), G] -> one row per matrix row [R, G] (rows of a tile share its scale)."""
    return scale.repeat_interleave(tile, dim=0)[:rows]
