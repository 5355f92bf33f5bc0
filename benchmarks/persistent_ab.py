"""A/B on a GPU: the 8-bit GEMM as launched today (one tile per program, pointer loads) against persistent
programs (one per SM, the tile loop flattened into the K loop so the next tile's loads overlap this tile's
epilogue) and TMA loads, at the 1.3B block's shapes. Epilogue: per-token x per-channel scales + bias -> bf16.

    . benchmarks/gpu_env.sh && python3 benchmarks/persistent_ab.py [--tokens 32760]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from turbo_kernels.gemm8 import gemm8, gemm8_ref
from turbo_kernels.quant8 import quantize_rows, quantize_rows_ref


@triton.jit
def _coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (tile // width) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    return first_m + (tile % width) % size_m, (tile % width) // size_m


@triton.jit
def _epilogue(acc, c_ptr, as_ptr, bs_ptr, bias_ptr, pid_m, pid_n, M, N, stride_cm,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y = acc.to(tl.float32) * tl.load(as_ptr + rm, mask=rm < M, other=0.0)[:, None]
    y = y * tl.load(bs_ptr + rn, mask=rn < N, other=0.0)[None, :]
    y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], y.to(tl.bfloat16),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _persistent_tma(a_desc, b_desc, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, stride_cm,
                    PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    DOT_T: tl.constexpr = tl.float32 if FP8 else tl.int32
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = _coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=DOT_T)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=DOT_T)
        _epilogue(acc, c_ptr, as_ptr, bs_ptr, bias_ptr, pid_m, pid_n, M, N, stride_cm, BLOCK_M, BLOCK_N)


def run(a, a_s, b, b_s, bias, programs, flatten, cfg):
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    programs = min(programs or tiles, tiles)
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    common = dict(PROGRAMS=programs, FLATTEN=flatten, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"])
    ad = TensorDescriptor.from_tensor(a, [bm, bk])
    bd = TensorDescriptor.from_tensor(b, [bn, bk])
    _persistent_tma[(programs,)](ad, bd, c, a_s, b_s, bias, M, N, K, c.stride(0),
                                 FP8=a.dtype == torch.float8_e4m3fn, **common, **opts)
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32760)
    args = ap.parse_args()
    import triton.testing

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator(device="cuda").manual_seed(0)
    M = args.tokens
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  SMs {sms}")
    base = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3)
    for N, K in ((1536, 1536), (8960, 1536), (1536, 8960)):
        x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
        w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).to(torch.bfloat16)
        bias = (0.1 * torch.randn(N, device="cuda", generator=g)).to(torch.bfloat16)
        t_bf = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w, bias), return_mode="median")
        for fmt in ("fp8",):    # int8's products are not pipelined by Triton here (kernels/int_mma.py)
            (a, a_s), (b, b_s) = quantize_rows(x, fmt), quantize_rows_ref(w, fmt)
            ref = gemm8_ref(a[:2048], a_s[:2048], b, b_s, bias).float()
            flops = 2 * M * N * K
            t0 = triton.testing.do_bench(lambda: gemm8(a, a_s, b, b_s, bias), return_mode="median")
            print(f"{M}x{K}->{N} {fmt}: gemm8 today {t0:.3f} ms ({flops / t0 / 1e9:.0f} TOPS)  bf16 {t_bf:.3f} ms")
            for programs, flatten, stages in ((0, False, 3), (sms, False, 3), (sms, True, 3), (sms, True, 4)):
                for group in (8, 16):
                    cfg = {**base, "GROUP_M": group, "num_stages": stages}
                    name = f"tma {'persistent' if programs else 'tile/program'}{' flat' if flatten else ''}" \
                           f" G{group} s{stages}"
                    try:
                        c = run(a, a_s, b, b_s, bias, programs, flatten, cfg)
                        err = ((c[:2048].float() - ref).norm() / ref.norm()).item()
                        t = triton.testing.do_bench(lambda: run(a, a_s, b, b_s, bias, programs, flatten, cfg),
                                                    return_mode="median")
                        print(f"   {name:32s} {t:.3f} ms ({flops / t / 1e9:5.0f} TOPS) x today {t0 / t:.3f}"
                              f"  rel vs ref {err:.1e}", flush=True)
                    except Exception as e:
                        print(f"   {name:32s} FAILED {str(e).splitlines()[0][:150]}", flush=True)


if __name__ == "__main__":
    main()
