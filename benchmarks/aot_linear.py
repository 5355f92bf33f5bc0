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
from triton.compiler import ASTSource

from turbo_kernels.gemm8 import _gemm8_kernel

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_gemm(fp8: bool, cfg: dict, **flags):
    names = ["a_ptr", "b_ptr", "c_ptr", "as_ptr", "bs_ptr", "bias_ptr", "cs_ptr", "res_ptr", "gate_ptr",
             "colsum_ptr", "M", "N", "K", "stride_am", "stride_bn", "stride_cm", "stride_asm", "stride_bsn",
             "stride_csm", "stride_rm", "rows_per_gate"]
    op = "*fp8e4nv" if fp8 else "*i8"
    out = ("*fp8e4nv" if flags.get("FP8_OUT") else "*i8") if flags.get("OUT_Q") else "*bf16"
    names += ["bound_coef", "bound_bias"]
    types = [op, op, out, "*fp32", "*fp32", "*bf16", "*fp32", "*bf16", "*fp32", "*fp32"] + ["i32"] * 11 + ["fp32"] * 2
    sig = dict(zip(names, types))
    const = dict(FP8_IN=fp8, A_GROUPED=False, B_BLOCKED=False, HAS_BIAS=True, GELU=False, OUT_Q=False,
                 FP8_OUT=False, ROW_BOUND=False, RESIDUAL=False, GATED=False, ONE_SAMPLE=False, A_GELU_GRID=False,
                 OUT_GELU_GRID=False, FAST_GELU=True, EVEN_K=True, GROUP_M=8)
    const.update(flags)
    const.update({k: v for k, v in cfg.items() if k.startswith("BLOCK") or k in ("GROUP_M", "FAST_GELU")})
    sig.update({k: "constexpr" for k in const})
    unaligned = ("M", "stride_asm", "stride_csm", "rows_per_gate", "bound_coef", "bound_bias")
    aligned = [i for i, n in enumerate(names) if n not in unaligned]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = ASTSource(fn=_gemm8_kernel, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


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
            f"async-copies {ttgir.count('async_copy_global_to_local')}  "
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
