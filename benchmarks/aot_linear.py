"""Compile the 8-bit linear kernels for sm_90 on a machine without a GPU and report, per variant, shared
memory, registers, spills and whether the main loop uses wgmma and is software-pipelined.

    python benchmarks/aot_linear.py

Pointer arguments and strides are declared 16-divisible, as Triton's JIT specialises them at run time for
aligned tensors. Reads the cubin with the cuobjdump that ships with Triton.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from turbo_kernels.gemm8 import _gemm8_kernel
from turbo_kernels.int_mma import _build, compile_plain

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_gemm(fp8: bool, cfg: dict, **flags):
    """The kernel as gemm8 launches it on sm_90: int8 with one accumulator through the pipelining edit."""
    op = "fp8e4nv" if fp8 else "i8"
    out = ("*fp8e4nv" if flags.get("FP8_OUT") else "*i8") if flags.get("OUT_Q") else "*bf16"
    types = dict(a_ptr="*" + op, b_ptr="*" + op, c_ptr=out, as_ptr="*fp32", bs_ptr="*fp32", bias_ptr="*bf16",
                 cs_ptr="*fp32", res_ptr="*bf16", gate_ptr="*fp32", colsum_ptr="*fp32")
    types.update({n: "i32" for n in ("M", "N", "K", "stride_am", "stride_bn", "stride_cm", "stride_asm",
                                     "stride_bsn", "stride_csm", "stride_rm", "rows_per_gate")})
    types.update(bound_coef="fp32", bound_bias="fp32", programs="i32")
    const = dict(FP8_IN=fp8, A_GROUPED=False, B_BLOCKED=False, HAS_BIAS=True, GELU=False, OUT_Q=False,
                 FP8_OUT=False, ROW_BOUND=False, RESIDUAL=False, GATED=False, ONE_SAMPLE=False, A_GELU_GRID=False,
                 OUT_GELU_GRID=False, FAST_GELU=True, PERSISTENT=False, EVEN_K=True, GROUP_M=8)
    const.update(flags)
    const.update({k: v for k, v in cfg.items() if k.startswith("BLOCK") or k in ("GROUP_M", "FAST_GELU")})
    if const["PERSISTENT"]:
        types["a_desc"] = f"tensordesc<{op}[{cfg['BLOCK_M']}, {cfg['BLOCK_K']}]>"
        types["b_desc"] = f"tensordesc<{op}[{cfg['BLOCK_N']}, {cfg['BLOCK_K']}]>"
    else:
        const.update(a_desc=None, b_desc=None)
    unaligned = ("M", "stride_asm", "stride_csm", "rows_per_gate", "bound_coef", "bound_bias", "programs")
    aligned = tuple(_gemm8_kernel.arg_names.index(n) for n in types if n not in unaligned)
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    target = GPUTarget("cuda", 90, 32)
    if not fp8 and not (const["A_GROUPED"] or const["B_BLOCKED"]):
        return _build(_gemm8_kernel, types, aligned, const, target=target, **options)
    return compile_plain(_gemm8_kernel, types, aligned, const, target=target, **options)


def report(k) -> str:
    ttgir = k.asm["ttgir"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    pendings = sorted(set(re.findall(r"pendings = (\d+)", ttgir)))
    return (f"smem {k.metadata.shared // 1024:3d} KiB  regs {regs.group(1) if regs else '?':>3}  "
            f"stack {stack.group(1) if stack else '?':>3}  wgmma {'warp_group_dot' in ttgir}  "
            f"async-copies {ttgir.count('async_copy_global_to_local') + ttgir.count('async_tma_copy')}  "
            f"dot-wait-pendings {pendings}")


def variants():
    """Every (variant, tile configuration) that benchmarks/linear.py --sweep may launch."""
    from linear import CANDIDATES  # benchmarks/linear.py

    flavours = {  # name: (fp8 operands, candidate list, kernel flags)
        "int8 td": (False, "per_k", dict(B_BLOCKED=True)),
        "int8 td gelu->int8": (False, "per_k", dict(B_BLOCKED=True, GELU=True, OUT_Q=True)),
        "int8 td a-grouped": (False, "per_k", dict(B_BLOCKED=True, A_GROUPED=True)),
        "int8 pc": (False, "coarse", {}),
        "int8 pc gelu->int8": (False, "coarse", dict(GELU=True, OUT_Q=True)),
        "int8 pc a-grouped": (False, "per_k", dict(A_GROUPED=True)),
        "fp8": (True, "coarse", {}),
        "fp8 gelu->fp8": (True, "coarse", dict(GELU=True, OUT_Q=True, FP8_OUT=True)),
        "fp8 gelu->fp8 bounded": (True, "coarse", dict(GELU=True, OUT_Q=True, FP8_OUT=True, ROW_BOUND=True)),
        "fp8 a-grouped": (True, "per_k", dict(A_GROUPED=True)),
        # persistent (TMA loads, the tile loop flattened): K <= 2048 at 1.3B
        "int8 pc persistent": (False, "coarse", dict(PERSISTENT=True)),
        "int8 pc gelu->int8 grid persistent": (False, "coarse", dict(GELU=True, OUT_Q=True, OUT_GELU_GRID=True,
                                                                      PERSISTENT=True)),
        "int8 pc residual persistent": (False, "coarse", dict(RESIDUAL=True, GATED=True, ONE_SAMPLE=True,
                                                               PERSISTENT=True)),
        "fp8 persistent": (True, "coarse", dict(PERSISTENT=True)),
        "fp8 gelu->fp8 bounded persistent": (True, "coarse", dict(GELU=True, OUT_Q=True, FP8_OUT=True,
                                                                   ROW_BOUND=True, PERSISTENT=True)),
        "fp8 residual persistent": (True, "coarse", dict(RESIDUAL=True, GATED=True, ONE_SAMPLE=True,
                                                          PERSISTENT=True)),
    }
    for name, (fp8, cands, flags) in flavours.items():
        for cfg in CANDIDATES[cands]:
            if flags.get("OUT_Q") and cfg["BLOCK_N"] % 128:
                continue
            tag = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"
            yield f"{name} {tag}", fp8, cfg, flags


if __name__ == "__main__":
    only = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    for name, fp8, cfg, flags in variants():
        if only and not any(o in name for o in only):
            continue
        try:
            print(f"{name:40s} {report(compile_gemm(fp8, cfg, **flags))}", flush=True)
        except Exception as e:  # a variant that does not compile is a finding, not a crash
            print(f"{name:40s} FAILED: {str(e).splitlines()[0][:200]}", flush=True)
