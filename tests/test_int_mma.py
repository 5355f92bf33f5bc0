"""The int8 wgmma pipelining edit (kernels/int_mma.py), checked on kernels compiled for sm_90 on this machine
(no GPU needed: Triton compiles ahead of time with its own ptxas). The compiles run in a child process without
the interpreter, which the rest of the tests use. Numerics are checked on a GPU by benchmarks/linear.py against
the float64 reference."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

CHILD = r'''
import json, re, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from turbo_kernels.gemm8 import _gemm8_kernel, default_config
from turbo_kernels.int_mma import (NotPipelinable, _arg_type, _divisible, compile_pipelined, compile_plain,
                                   pipelined_int_mma)

def args(M, N, K, operand):
    a, b = torch.zeros(M, K, dtype=operand), torch.zeros(N, K, dtype=operand)
    c = torch.zeros(M, N, dtype=torch.bfloat16)
    return dict(a_ptr=a, b_ptr=b, c_ptr=c, as_ptr=torch.ones(M), bs_ptr=torch.ones(N),
                bias_ptr=torch.zeros(N, dtype=torch.bfloat16), cs_ptr=c, res_ptr=c, gate_ptr=torch.ones(N),
                colsum_ptr=torch.ones(N), M=M, N=N, K=K, stride_am=K, stride_bn=K, stride_cm=N, stride_asm=1,
                stride_bsn=1, stride_csm=N, stride_rm=N, rows_per_gate=M, bound_coef=0.0, bound_bias=0.0)

def constexprs(M, N, K, fp8):
    cfg = default_config(M, N, K, False, False)
    launch = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    return dict(FP8_IN=fp8, A_GROUPED=False, B_BLOCKED=False, HAS_BIAS=True, GELU=False, OUT_Q=False,
                FP8_OUT=False, ROW_BOUND=False, RESIDUAL=True, GATED=True, ONE_SAMPLE=True, A_GELU_GRID=True,
                OUT_GELU_GRID=False, FAST_GELU=True, EVEN_K=K % cfg["BLOCK_K"] == 0, **cfg), launch

out = []
for M, N, K, fp8, arch in json.loads(sys.argv[1]):
    operand = torch.float8_e4m3fn if fp8 else torch.int8
    const, launch = constexprs(M, N, K, fp8)
    case = {}
    try:
        kernel = compile_pipelined(_gemm8_kernel, args(M, N, K, operand), const, target=GPUTarget("cuda", arch, 32),
                                   **launch)
        ptx = kernel.asm["ptx"]
        case["waits"] = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
        case["mma"] = ptx.count("wgmma.mma_async")
        given = args(M, N, K, operand)
        types = {k: _arg_type(v) for k, v in given.items()}
        aligned = tuple(i for i, v in enumerate(given.values()) if _divisible(v))
        plain = compile_plain(_gemm8_kernel, types, aligned, const, target=GPUTarget("cuda", arch, 32),
                              **launch).asm["ttgir"]
        edited = pipelined_int_mma(plain)
        case["plain_pendings_1"] = plain.count("pendings = 1")
        case["edited_pendings_1"] = edited.count("pendings = 1")
        case["removed"] = sorted(set(plain.splitlines()) - set(edited.splitlines()))
    except NotPipelinable as e:
        case["not_pipelinable"] = str(e)
    out.append(case)
print(json.dumps(out))
'''


def _compile(cases):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_int8_gemm_keeps_one_product_in_flight_and_only_the_waits_change():
    shapes = [(4096, 1536, 1536), (4096, 8960, 1536), (300, 1536, 8960)]
    for case in _compile([(M, N, K, False, 90) for M, N, K in shapes]):
        assert case["plain_pendings_1"] == 0          # Triton's own choice for an int32 accumulator
        assert case["edited_pendings_1"] == 1         # the loop's wait now leaves one product pending
        assert case["mma"] > 0 and 1 in case["waits"] and case["waits"][-1] == 0   # all collected after the loop
        assert all("warp_group_dot_wait" in line or "#0" in line for line in case["removed"])


def test_float_accumulators_and_other_gpus_are_left_to_triton():
    fp8_hopper, int8_ada = _compile([(4096, 1536, 1536, True, 90), (4096, 1536, 1536, False, 89)])
    assert "int32" in fp8_hopper["not_pipelinable"]   # FP8 accumulates in float32: Triton pipelines it itself
    assert "sm_90" in int8_ada["not_pipelinable"]


LOOP = """\
    %acc:2 = scf.for %k = %c0 to %n step %c1 iter_args(%a = %cst, %p = %ptrs) -> (tensor<128x256xi32, #mma>, i32)  : i32 {
{body}
      scf.yield %w#0, %p2 : tensor<128x256xi32, #mma>, i32
    }
    %y = arith.sitofp %acc#0 : tensor<128x256xi32, #mma> to tensor<128x256xf32, #mma>"""
DOT = "      %d = ttng.warp_group_dot %x, %b, %a {isAsync = true} : ... -> tensor<128x256xi32, #mma>"
WAIT = "      %w:3 = ttng.warp_group_dot_wait %d, %x, %b {pendings = 0 : i32} : tensor<128x256xi32, #mma>, ..."
COPY = "      %c = ttg.async_copy_global_to_local %ptr, %buf : ..."


def test_the_edit_is_refused_when_a_stage_could_be_refilled_under_a_pending_product():
    from turbo_kernels.int_mma import NotPipelinable, pipelined_int_mma

    edited = pipelined_int_mma(LOOP.replace("{body}", "\n".join([DOT, WAIT, COPY])))
    assert "pendings = 1" in edited
    assert "%acc_all_done = ttng.warp_group_dot_wait %acc#0 {pendings = 0 : i32}" in edited
    assert "arith.sitofp %acc_all_done" in edited            # the epilogue reads the collected value
    for body in ([COPY, DOT, WAIT], [DOT, WAIT], [DOT, WAIT, DOT, WAIT, COPY]):
        with pytest.raises(NotPipelinable):
            pipelined_int_mma(LOOP.replace("{body}", "\n".join(body)))
