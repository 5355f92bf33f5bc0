"""W8A8 GEMM: y = (a * a_scale) @ (b * b_scale).T + bias, with int8 or FP8 (e4m3) operands, on tensor cores.

a [M, K] holds 8-bit activations, b [N, K] 8-bit weights (a Linear's [out, in] layout, K contiguous in both:
the layout 8-bit tensor-core instructions want). Scales come in two granularities each:

| operand | coarse (one per ...)     | grouped (one per ...)                        |
|---------|--------------------------|----------------------------------------------|
| a       | token: a_scale [M]       | token and 128 columns: a_scale [M, ceil(K/128)] |
| b       | output channel: [N]      | 128x128 block: b_scale [ceil(N/128), ceil(K/128)] (TurboDiffusion) |

Coarse x coarse keeps one integer (int8) or float32 (fp8) accumulator over all of K and scales once in the
epilogue: the fastest form. If either side is grouped, each 128-wide K step's product is scaled and added to a
float32 accumulator (the form of TurboDiffusion's GEMM).

The epilogue adds the bias, optionally applies GELU (tanh form), and writes either a float tensor or, for the
FFN, the next GEMM's 8-bit input with no extra pass over memory: one scale per (token, 128 columns), or, for FP8,
one per token taken from a bound on the row's values known before the GEMM (`output_bound`), which keeps the next
GEMM on a single accumulator.

On the video tokens with coarse scales the kernel runs persistent: one program per SM walks the output tiles,
loading with TMA, its tile loop flattened into the K loop so that the next tile's first loads are in flight while
this tile's epilogue runs (int8 keeps its products pipelined there too, kernels/int_mma.py). Elsewhere one program
computes one tile.

`gemm8` is the launcher, `gemm8_ref` the plain-torch reference of the same function, and
`int8_linear_tiles_ref` TurboDiffusion's int8 linear exactly (128x128 activation tiles).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:   # Triton before 3.3: no host-side TMA descriptors; every GEMM runs one tile per program
    TensorDescriptor = None

from .quant8 import (_INTERPRETED, DTYPES, FORMATS, QMAX, TILE, cast_rne, check_format, expand_tiles,
                     quantize_rows_ref, quantize_tiles_ref, quantize_values, rne_int, round_to_format)

GELU_C = 0.7978845608028654     # sqrt(2 / pi)
# GELU (tanh form) never goes below -0.16997: int8 GELU outputs are stored on a grid from -GELU_FLOOR upwards,
# x ~= s * (q + 128) - GELU_FLOOR, twice as fine as a symmetric grid over [-max, max] (`gelu_grid` below)
GELU_FLOOR = tl.constexpr(0.17)


@triton.jit
def _gelu_tanh(y, FAST: tl.constexpr):
    # 0.5 * y * (1 + tanh(u)), u = sqrt(2/pi) * (y + 0.044715 y^3). FAST: the GPU's tanh.approx (relative error
    # ~2**-11, under bf16's rounding); otherwise the same as y * sigmoid(2u), exactly as gelu_tanh_ref.
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    if FAST and not _INTERPRETED:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=tl.float32, is_pure=True,
                                      pack=1)
        return 0.5 * y * (1.0 + t)
    else:
        return y / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))     # (capped: exp overflows past ~88)


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped launch order: GROUP_M row tiles share each column tile of b while it is in L2
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (tile // width) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    return first_m + (tile % width) % size_m, (tile % width) // size_m


@triton.jit
def _gemm8_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, cs_ptr, res_ptr, gate_ptr, colsum_ptr,
                  M, N, K, stride_am, stride_bn, stride_cm, stride_asm, stride_bsn, stride_csm, stride_rm,
                  rows_per_gate, bound_coef, bound_bias, programs, a_desc, b_desc,
                  FP8_IN: tl.constexpr, A_GROUPED: tl.constexpr, B_BLOCKED: tl.constexpr,
                  HAS_BIAS: tl.constexpr, GELU: tl.constexpr, OUT_Q: tl.constexpr, FP8_OUT: tl.constexpr,
                  ROW_BOUND: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr, ONE_SAMPLE: tl.constexpr,
                  A_GELU_GRID: tl.constexpr, OUT_GELU_GRID: tl.constexpr, FAST_GELU: tl.constexpr,
                  PERSISTENT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    PER_K: tl.constexpr = A_GROUPED or B_BLOCKED
    DOT_T: tl.constexpr = tl.float32 if FP8_IN else tl.int32
    ACC_T: tl.constexpr = tl.float32 if PER_K else DOT_T
    if PERSISTENT:
        # one program per SM walks the tiles; the tile loop is flattened into the K loop, so the next tile's
        # first TMA loads are in flight during this tile's epilogue (coarse scales only)
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), programs, flatten=True):
            pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_T)
            for k in range(0, tl.cdiv(K, BLOCK_K)):
                a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
                b = b_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
                acc = tl.dot(a, b.T, acc, out_dtype=DOT_T)
            _epilogue(acc, pid_m, pid_n, c_ptr, as_ptr, bs_ptr, bias_ptr, cs_ptr, res_ptr, gate_ptr, colsum_ptr,
                      M, N, stride_cm, stride_asm, stride_bsn, stride_csm, stride_rm, rows_per_gate, bound_coef,
                      bound_bias, A_GROUPED, B_BLOCKED, HAS_BIAS, GELU, OUT_Q, FP8_OUT, ROW_BOUND, RESIDUAL, GATED,
                      ONE_SAMPLE, A_GELU_GRID, OUT_GELU_GRID, FAST_GELU, BLOCK_M, BLOCK_N, RESIDUAL)
    else:
        pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        am = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)   # rows past M re-read valid rows
        bn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + am[:, None].to(tl.int64) * stride_am + rk[None, :]
        b_ptrs = b_ptr + bn[:, None].to(tl.int64) * stride_bn + rk[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_T)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=rk[None, :] < K - k * BLOCK_K, other=0.0)
                b = tl.load(b_ptrs, mask=rk[None, :] < K - k * BLOCK_K, other=0.0)
            if PER_K:  # BLOCK_K == 128: step k is scale group k
                part = tl.dot(a, tl.trans(b), out_dtype=DOT_T).to(tl.float32)
                if A_GROUPED:
                    part = part * tl.load(as_ptr + am * stride_asm + k)[:, None]
                if B_BLOCKED:
                    part = part * tl.load(bs_ptr + (bn // 128) * stride_bsn + k)[None, :]
                acc += part
            else:
                acc = tl.dot(a, tl.trans(b), acc, out_dtype=DOT_T)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        _epilogue(acc, pid_m, pid_n, c_ptr, as_ptr, bs_ptr, bias_ptr, cs_ptr, res_ptr, gate_ptr, colsum_ptr,
                  M, N, stride_cm, stride_asm, stride_bsn, stride_csm, stride_rm, rows_per_gate, bound_coef,
                  bound_bias, A_GROUPED, B_BLOCKED, HAS_BIAS, GELU, OUT_Q, FP8_OUT, ROW_BOUND, RESIDUAL, GATED,
                  ONE_SAMPLE, A_GELU_GRID, OUT_GELU_GRID, FAST_GELU, BLOCK_M, BLOCK_N, False)


@triton.jit
def _epilogue(acc, pid_m, pid_n, c_ptr, as_ptr, bs_ptr, bias_ptr, cs_ptr, res_ptr, gate_ptr, colsum_ptr,
              M, N, stride_cm, stride_asm, stride_bsn, stride_csm, stride_rm, rows_per_gate, bound_coef, bound_bias,
              A_GROUPED: tl.constexpr, B_BLOCKED: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
              OUT_Q: tl.constexpr, FP8_OUT: tl.constexpr, ROW_BOUND: tl.constexpr, RESIDUAL: tl.constexpr,
              GATED: tl.constexpr, ONE_SAMPLE: tl.constexpr, A_GELU_GRID: tl.constexpr, OUT_GELU_GRID: tl.constexpr,
              FAST_GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALVES: tl.constexpr):
    # HALVES: the tile's two column halves one after the other (fewer registers live: in a persistent kernel the
    # residual update spills otherwise; the int8 GELU output's 32-byte spill cost less than halves did, run 11)
    if HALVES:
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        for half in tl.static_range(2):
            _epilogue_part(left if half == 0 else right, pid_m * BLOCK_M, pid_n * BLOCK_N + half * (BLOCK_N // 2),
                           c_ptr, as_ptr, bs_ptr, bias_ptr, cs_ptr, res_ptr, gate_ptr, colsum_ptr, M, N, stride_cm,
                           stride_asm, stride_bsn, stride_csm, stride_rm, rows_per_gate, bound_coef, bound_bias,
                           A_GROUPED, B_BLOCKED, HAS_BIAS, GELU, OUT_Q, FP8_OUT, ROW_BOUND, RESIDUAL, GATED,
                           ONE_SAMPLE, A_GELU_GRID, OUT_GELU_GRID, FAST_GELU, BLOCK_M, BLOCK_N // 2)
    else:
        _epilogue_part(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, c_ptr, as_ptr, bs_ptr, bias_ptr, cs_ptr, res_ptr,
                       gate_ptr, colsum_ptr, M, N, stride_cm, stride_asm, stride_bsn, stride_csm, stride_rm,
                       rows_per_gate, bound_coef, bound_bias, A_GROUPED, B_BLOCKED, HAS_BIAS, GELU, OUT_Q, FP8_OUT,
                       ROW_BOUND, RESIDUAL, GATED, ONE_SAMPLE, A_GELU_GRID, OUT_GELU_GRID, FAST_GELU, BLOCK_M,
                       BLOCK_N)


@triton.jit
def _epilogue_part(acc, m0, n0, c_ptr, as_ptr, bs_ptr, bias_ptr, cs_ptr, res_ptr, gate_ptr, colsum_ptr,
                   M, N, stride_cm, stride_asm, stride_bsn, stride_csm, stride_rm, rows_per_gate, bound_coef,
                   bound_bias, A_GROUPED: tl.constexpr, B_BLOCKED: tl.constexpr, HAS_BIAS: tl.constexpr,
                   GELU: tl.constexpr, OUT_Q: tl.constexpr, FP8_OUT: tl.constexpr, ROW_BOUND: tl.constexpr,
                   RESIDUAL: tl.constexpr, GATED: tl.constexpr, ONE_SAMPLE: tl.constexpr, A_GELU_GRID: tl.constexpr,
                   OUT_GELU_GRID: tl.constexpr, FAST_GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] block of the output from row m0, column n0."""
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    am = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
    bn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    y = acc.to(tl.float32)
    if A_GELU_GRID:   # a = s_a (q + 128) - GELU_FLOOR: add the weights' column sums' share
        colsum = tl.load(colsum_ptr + bn)
        y = y + 128.0 * colsum[None, :]
    if not A_GROUPED:
        y = y * tl.load(as_ptr + am)[:, None]
    if not B_BLOCKED:
        y = y * tl.load(bs_ptr + bn)[None, :]
    if A_GELU_GRID:
        y = y - (colsum * tl.load(bs_ptr + bn) * GELU_FLOOR)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + bn).to(tl.float32)[None, :]
    if GELU:
        y = _gelu_tanh(y, FAST_GELU)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if RESIDUAL:   # the block's residual update: x + gate * y, gate per (sample, channel)
        if GATED and ONE_SAMPLE:   # one gate row for every row: a vector load, no gather
            y = y * tl.load(gate_ptr + bn)[None, :]
        elif GATED:
            y = y * tl.load(gate_ptr + (am // rows_per_gate)[:, None] * N + bn[None, :])
        y = y + tl.load(res_ptr + rm[:, None].to(tl.int64) * stride_rm + rn[None, :], mask=mask,
                        other=0.0).to(tl.float32)
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    if OUT_Q:
        QMAX: tl.constexpr = 448.0 if FP8_OUT else 127.0
        if ROW_BOUND:  # one scale per row, from a bound on the row's values known before the GEMM
            bound = tl.maximum(bound_coef * tl.load(as_ptr + am) + bound_bias, 0.2)
            tl.store(c_ptrs, quantize_values(y, (QMAX / bound)[:, None], FP8_OUT), mask=mask)
            # the first column tile stores the row scales (a mask rather than an `if`: Triton 3.6 cannot flatten
            # a persistent tile loop around a nested if)
            tl.store(cs_ptr + rm, bound / QMAX, mask=rm < tl.where(n0 == 0, M, 0))
        else:          # one scale per (row, 128 columns)
            G: tl.constexpr = BLOCK_N // 128
            if OUT_GELU_GRID:   # GELU >= -GELU_FLOOR: the whole int8 range over [-GELU_FLOOR, max]
                y = tl.where(rn[None, :] < N, tl.maximum(y + GELU_FLOOR, 0.0), 0.0)
                y3 = tl.reshape(y, (BLOCK_M, G, 128))
                amax = tl.maximum(tl.max(y3, axis=2), 1e-8)
                q = tl.minimum(rne_int(y3 * (255.0 / amax)[:, :, None]) - 128, 127).to(tl.int8)
                step = amax / 255.0
            else:
                y = tl.where(rn[None, :] < N, y, 0.0)
                y3 = tl.reshape(y, (BLOCK_M, G, 128))
                amax = tl.maximum(tl.max(tl.abs(y3), axis=2), 1e-8)
                q = quantize_values(y3, (QMAX / amax)[:, :, None], FP8_OUT)
                step = amax / QMAX
            tl.store(c_ptrs, tl.reshape(q, (BLOCK_M, BLOCK_N)), mask=mask)
            g = n0 // 128 + tl.arange(0, G)
            tl.store(cs_ptr + rm[:, None].to(tl.int64) * stride_csm + g[None, :], step,
                     mask=(rm[:, None] < M) & (g[None, :] < tl.cdiv(N, 128)))
    else:
        tl.store(c_ptrs, cast_rne(y, c_ptr.dtype.element_ty), mask=mask)


def default_config(M: int, N: int, K: int, a_grouped: bool, b_blocked: bool, integer: bool = False) -> dict:
    """Tile shapes measured best on an H100 (benchmarks/notes-linear.md)."""
    if M <= 1024:  # the 512 text tokens of cross-attention k / v
        if a_grouped or b_blocked:
            return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    if a_grouped and not b_blocked:
        return dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    if a_grouped or b_blocked:  # float32 accumulator + the step's product in registers: 128x128 per 8 warps
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
    if PERSISTENT_GEMMS:
        # persistent programs hide the next tile's pipeline fill behind this tile's epilogue: 1.3B block 1.35x ->
        # 1.51x bf16 (int8), 1.53x -> 1.61x (FP8); 14B 1.59x -> 1.76x / 1.64x -> 1.67x (benchmarks/BENCHMARKS.md)
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4 if integer else 3,
                    PERSISTENT=True)
    # wider row groups where a side is narrow (1.3B: K or N = 1536): 1-5% faster there, 6-11% slower at 5120
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=16 if min(N, K) <= 2048 else 8, num_warps=8,
                num_stages=3)


def _scale_kind(scale: torch.Tensor, rows: int, K: int, what: str, grouped_rows: int) -> bool:
    """True if grouped along K, False if one scale per row; raises on any other shape."""
    if scale.dim() == 1 and scale.shape[0] == rows:
        return False
    if scale.dim() == 2 and tuple(scale.shape) == (grouped_rows, triton.cdiv(K, TILE)):
        return True
    raise ValueError(f"{what} scale has shape {tuple(scale.shape)}; expected [{rows}] or "
                     f"[{grouped_rows}, {triton.cdiv(K, TILE)}]")


def gemm8(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
          bias: torch.Tensor | None = None, *, out_dtype: torch.dtype = torch.bfloat16, gelu: bool = False,
          out: str | None = None, out_bound: tuple[float, float] | None = None, residual: torch.Tensor | None = None,
          gate: torch.Tensor | None = None, gelu_grid: bool = False, a_gelu_grid: bool = False,
          b_colsum: torch.Tensor | None = None, config: dict | None = None):
    """a [M, K], b [N, K] (both int8 or both float8_e4m3fn) -> y [M, N] `out_dtype`, or, with `out` = "int8" |
    "fp8", the pair (y_q [M, N], y_scale): quantised per (token, 128 columns), y_scale [M, ceil(N/128)] — or,
    given `out_bound` = (coef, bias_amax) from `output_bound`, per token with y_scale [M] = max(coef *
    a_scale + bias_amax, 0.2) / QMAX, a bound on the row's outputs known before the GEMM (meant for FP8, whose
    precision is relative: a loose scale costs it nothing; and a_scale must be per token).

    `residual` [M, N] (and `gate` [S, N], S dividing M: row m belongs to sample m // (M / S)) returns the
    residual update residual + gate * y in residual's dtype, computed in float32 and rounded once.

    `gelu_grid` (with gelu and out="int8", grouped) stores the GELU output on the grid from -GELU_FLOOR up:
    y ~= y_scale * (y_q + 128) - GELU_FLOOR. `a_gelu_grid` says a holds such values (per-token scales), and then
    `b_colsum` [N] must hold the integer column sums of b (`column_sums(b)`)."""
    if a.dtype != b.dtype or a.dtype not in DTYPES.values():
        raise ValueError(f"gemm8 takes two int8 or two float8_e4m3fn operands, got {a.dtype} and {b.dtype}")
    M, K = a.shape
    N = b.shape[0]
    if b.shape[1] != K:
        raise ValueError(f"inner sizes differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    a_grouped = _scale_kind(a_scale, M, K, "activation", M)
    b_blocked = _scale_kind(b_scale, N, K, "weight", triton.cdiv(N, TILE))
    cfg = {"FAST_GELU": True, **(config or default_config(M, N, K, a_grouped, b_blocked, a.dtype == torch.int8))}
    if (a_grouped or b_blocked) and cfg["BLOCK_K"] != TILE:
        raise ValueError(f"grouped scales need BLOCK_K == {TILE}")
    if out is not None:
        check_format(out)
        if cfg["BLOCK_N"] % TILE:
            raise ValueError(f"an 8-bit output needs BLOCK_N a multiple of {TILE}")
    if out_bound is not None and (out is None or a_grouped):
        raise ValueError("out_bound needs an 8-bit `out` and per-token activation scales")
    if residual is not None:
        if out is not None or residual.shape != (M, N) or residual.stride(-1) != 1:
            raise ValueError(f"a residual must be a row-major [{M}, {N}] tensor, without an 8-bit `out`")
        out_dtype = residual.dtype
    if gelu_grid and not (gelu and out == "int8" and out_bound is None):
        raise ValueError("gelu_grid needs gelu=True and out='int8' (per-group scales)")
    if a_gelu_grid and (a_grouped or b_blocked or b_colsum is None or b_colsum.shape != (N,)):
        raise ValueError(f"a_gelu_grid needs per-token and per-channel scales and b_colsum [{N}]")
    if gate is not None:
        if residual is None or gate.dim() != 2 or gate.shape[1] != N or M % gate.shape[0]:
            raise ValueError(f"gate must be [samples, {N}] with samples dividing {M}, beside a residual")
        gate = gate.float().contiguous()
    a, b = a.contiguous(), b.contiguous()
    a_scale, b_scale = a_scale.float().contiguous(), b_scale.float().contiguous()
    c = torch.empty((M, N), dtype=DTYPES[out] if out else out_dtype, device=a.device)
    cs_shape = (M,) if out_bound is not None else (M, triton.cdiv(N, TILE))
    cs = torch.empty(cs_shape, dtype=torch.float32, device=a.device) if out else c
    coef, bias_amax = out_bound if out_bound is not None else (0.0, 0.0)
    if M and N:
        args = dict(a_ptr=a, b_ptr=b, c_ptr=c, as_ptr=a_scale, bs_ptr=b_scale,
                    bias_ptr=bias if bias is not None else a_scale, cs_ptr=cs,
                    res_ptr=residual if residual is not None else c, gate_ptr=gate if gate is not None else a_scale,
                    colsum_ptr=b_colsum.float().contiguous() if a_gelu_grid else a_scale,
                    M=M, N=N, K=K, stride_am=a.stride(0), stride_bn=b.stride(0), stride_cm=c.stride(0),
                    stride_asm=a_scale.stride(0), stride_bsn=b_scale.stride(0), stride_csm=cs.stride(0),
                    stride_rm=residual.stride(0) if residual is not None else c.stride(0),
                    rows_per_gate=M // gate.shape[0] if gate is not None else M,
                    bound_coef=float(coef), bound_bias=float(bias_amax))
        launch_options = {"num_warps": cfg.pop("num_warps", 4), "num_stages": cfg.pop("num_stages", 3)}
        programs = cfg.pop("PROGRAMS", None)
        persistent = cfg.pop("PERSISTENT", False) and not (a_grouped or b_blocked) and _has_tma(a) and _has_tma(b)
        constexprs = dict(FP8_IN=a.dtype == torch.float8_e4m3fn, A_GROUPED=a_grouped, B_BLOCKED=b_blocked,
                          HAS_BIAS=bias is not None, GELU=gelu, OUT_Q=out is not None, FP8_OUT=out == "fp8",
                          ROW_BOUND=out_bound is not None, RESIDUAL=residual is not None, GATED=gate is not None,
                          ONE_SAMPLE=gate is not None and gate.shape[0] == 1, A_GELU_GRID=a_gelu_grid,
                          OUT_GELU_GRID=gelu_grid, EVEN_K=K % cfg["BLOCK_K"] == 0, **cfg)
        integer_accumulator = a.dtype == torch.int8 and not (a_grouped or b_blocked)
        pipelined = integer_accumulator and a.is_cuda and PIPELINE_INT8_MMA

        def launch(persistent: bool) -> bool:
            grid, extra = _launch_form(a, b, cfg, persistent, programs)
            kw = {**constexprs, "PERSISTENT": persistent}
            if pipelined and _launch_pipelined(grid, {**args, **extra}, kw, launch_options):
                return True
            if pipelined and persistent:   # int8 runs persistent only with its products pipelined
                return False
            _gemm8_kernel[grid](**args, **extra, **kw, **launch_options)
            return True

        unpipelined_int8 = integer_accumulator and a.is_cuda and not pipelined
        if not (persistent and not unpipelined_int8 and launch(True)):
            launch(False)
    return (c, cs) if out else c


# Switches for same-run comparisons: keep int8 products in flight on Hopper (kernels/int_mma.py); persistent
# programs (default_config).
PIPELINE_INT8_MMA = True
PERSISTENT_GEMMS = True


def _has_tma(a: torch.Tensor) -> bool:
    """TMA loads: Hopper and later, or the interpreter (CPU tests); K rows 16-byte aligned."""
    if TensorDescriptor is None or a.shape[1] % 16 or a.data_ptr() % 16:
        return False
    return not a.is_cuda or _device_facts(a.device.index)[0] >= 9


@functools.lru_cache(maxsize=None)
def _device_facts(index: int | None) -> tuple[int, int]:
    """(compute capability major, SM count) of a CUDA device, asked once rather than at every launch."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    return props.major, props.multi_processor_count


def _launch_form(a, b, cfg: dict, persistent: bool, programs: int | None) -> tuple[tuple, dict]:
    """(grid, the arguments that differ): one program per tile, or one per SM walking the tiles with TMA loads."""
    tiles = triton.cdiv(a.shape[0], cfg["BLOCK_M"]) * triton.cdiv(b.shape[0], cfg["BLOCK_N"])
    if not persistent:
        return (tiles,), dict(programs=tiles, a_desc=None, b_desc=None)
    if programs is None:
        programs = _device_facts(a.device.index)[1] if a.is_cuda else 4
    programs = min(programs, tiles)
    return (programs,), dict(programs=programs,
                             a_desc=TensorDescriptor.from_tensor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]]),
                             b_desc=TensorDescriptor.from_tensor(b, [cfg["BLOCK_N"], cfg["BLOCK_K"]]))


def _launch_pipelined(grid, args, constexprs, launch_options) -> bool:
    """Launch the int32-accumulator GEMM with its products pipelined; False where that does not apply (then the
    caller launches the plain kernel)."""
    from .int_mma import NotPipelinable, launch

    try:
        launch(_gemm8_kernel, grid, args, constexprs, **launch_options)
        return True
    except NotPipelinable:
        return False


def output_bound(b: torch.Tensor, b_scale: torch.Tensor, bias: torch.Tensor | None, a_fmt: str) -> tuple[float, float]:
    """(coef, bias_amax) with |y[m, n]| <= coef * a_scale[m] + bias_amax for any activation row quantised per
    token in `a_fmt` (|a_q| <= QMAX): Cauchy-Schwarz, ||a_m|| <= sqrt(K) * QMAX * a_scale[m], times the largest
    weight row norm. GELU keeps |y| under max(|y|, 0.17), hence the 0.2 floor in the epilogue."""
    w = b.float() * (expand_tiles(b_scale, b.shape[0]).repeat_interleave(TILE, 1)[:, : b.shape[1]]
                     if b_scale.dim() == 2 else b_scale.float()[:, None])
    coef = b.shape[1] ** 0.5 * QMAX[a_fmt] * w.norm(dim=1).max().item()
    return coef, (bias.float().abs().max().item() if bias is not None else 0.0)


# --------------------------------------------------------------------------------------------- references

def gelu_tanh_ref(y: torch.Tensor) -> torch.Tensor:
    """The GELU (tanh form) of the epilogue, written the same way (equal to F.gelu(approximate='tanh'))."""
    return y / (1.0 + torch.exp((-2.0 * GELU_C * (y + 0.044715 * y * y * y)).clamp_max(80.0)))


def gemm8_ref(a, a_scale, b, b_scale, bias=None, *, out_dtype=torch.bfloat16, gelu=False, out=None,
              out_bound=None, residual=None, gate=None, gelu_grid=False, a_gelu_grid=False, b_colsum=None):
    """Plain-torch `gemm8`: the same scales, the same order of float32 operations, products exact."""
    M, K = a.shape
    N = b.shape[0]
    a_grouped = _scale_kind(a_scale, M, K, "activation", M)
    b_blocked = _scale_kind(b_scale, N, K, "weight", -(-N // TILE))
    if a_grouped or b_blocked:
        acc = torch.zeros((M, N), dtype=torch.float32, device=a.device)
        for g in range(-(-K // TILE)):
            ks = slice(g * TILE, (g + 1) * TILE)
            part = a[:, ks].float() @ b[:, ks].float().T       # int8: exact (|sum| < 2**21)
            if a_grouped:
                part = part * a_scale[:, g, None].float()
            if b_blocked:
                part = part * expand_tiles(b_scale[:, g], N)[None, :].float()
            acc += part
    else:  # one accumulator over all of K: exact in float64, rounded once (as the int32 accumulator is)
        acc = (a.double() @ b.double().T).float()
    if a_gelu_grid:
        acc = acc + 128.0 * b_colsum.float()[None, :]
    if not a_grouped:
        acc = acc * a_scale[:, None].float()
    if not b_blocked:
        acc = acc * b_scale[None, :].float()
    if a_gelu_grid:
        acc = acc - (GELU_FLOOR.value * b_colsum.float() * b_scale.float())[None, :]
    if bias is not None:
        acc = acc + bias.float()
    if gelu:
        acc = gelu_tanh_ref(acc)
    if residual is not None:
        if gate is not None:
            acc = acc * gate.float().repeat_interleave(M // gate.shape[0], dim=0)
        return (acc + residual.float()).to(residual.dtype)
    if gelu_grid:
        return quantize_gelu_grid_ref(acc)
    if out and out_bound is not None:
        bound = (out_bound[0] * a_scale.float() + out_bound[1]).clamp_min(0.2)
        return round_to_format(acc * (bound.new_tensor(QMAX[out]) / bound)[:, None], out), bound / QMAX[out]
    return quantize_rows_ref(acc, out, group=TILE) if out else acc.to(out_dtype)


def quantize_gelu_grid_ref(y: torch.Tensor, group: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU outputs y [M, N] -> int8 on the grid from -GELU_FLOOR up, one scale per (row, `group` columns):
    y ~= scale * (q + 128) - GELU_FLOOR (the epilogue's `gelu_grid`)."""
    M, N = y.shape
    groups = -(-N // group)
    v = torch.nn.functional.pad((y.float() + GELU_FLOOR.value).clamp_min(0.0), (0, groups * group - N))
    amax = v.unflatten(-1, (groups, group)).amax(-1).clamp_min(1e-8)
    inv = (amax.new_tensor(255.0) / amax).repeat_interleave(group, -1)
    q = (torch.round(v * inv) - 128.0).clamp_max(127.0).to(torch.int8)
    return q[:, :N].contiguous(), amax / 255.0


def gelu_grid_values(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 values of int8 `q` on the GELU grid; `scale` per row [M] or per (row, 128 columns)."""
    grouped = scale.dim() == q.dim()
    s = scale.float().repeat_interleave(TILE, -1)[..., : q.shape[-1]] if grouped else scale.float()[..., None]
    return s * (q.float() + 128.0) - GELU_FLOOR.value


def column_sums(b: torch.Tensor) -> torch.Tensor:
    """The integer row sums of an int8 weight [N, K] (the sums over K of each output channel), float32 [N]."""
    return b.sum(dim=1, dtype=torch.int32).float()


def int8_linear_tiles_trace(x: torch.Tensor, int8_weight: torch.Tensor, scale: torch.Tensor,
                            bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """TurboDiffusion's `Int8Linear.forward` step by step: x [..., K] quantised in 128x128 tiles over [tokens,
    channels] (`x_int8` [M, K], `x_scale`), int32 tile products times both tile scales summed in float32 and
    written in x's dtype (`y_gemm` [M, N]), then + bias (`y` [..., N])."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    x_q, x_s = quantize_tiles_ref(x2)
    y_gemm = gemm8_ref(x_q, expand_tiles(x_s, x2.shape[0]), int8_weight, scale, out_dtype=x.dtype)
    y = y_gemm + bias.to(y_gemm.dtype) if bias is not None else y_gemm
    return {"x_int8": x_q, "x_scale": x_s, "y_gemm": y_gemm, "y": y.view(*x.shape[:-1], -1)}


def int8_linear_tiles_ref(x: torch.Tensor, int8_weight: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """TurboDiffusion's int8 linear exactly (see `int8_linear_tiles_trace`)."""
    return int8_linear_tiles_trace(x, int8_weight, scale, bias)["y"]


__all__ = ["gemm8", "gemm8_ref", "output_bound", "quantize_gelu_grid_ref", "gelu_grid_values", "column_sums",
           "int8_linear_tiles_ref", "int8_linear_tiles_trace", "gelu_tanh_ref", "default_config", "FORMATS", "QMAX"]
