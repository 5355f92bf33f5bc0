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
from triton.tools.tensor_descriptor import TensorDescriptor
from turbo_kernels.gemm8 import _gemm8_kernel, default_config
from turbo_kernels.int_mma import NotPipelinable, compile_pipelined, compile_plain, pipelined_int_mma, signature

def args(M, N, K, operand, ffn0, persistent):
    a, b = torch.zeros(M, K, dtype=operand), torch.zeros(N, K, dtype=operand)
    c = torch.zeros(M, N, dtype=torch.int8 if ffn0 else torch.bfloat16)
    cs = torch.ones(M, N // 128) if ffn0 else c
    return dict(a_ptr=a, b_ptr=b, c_ptr=c, as_ptr=torch.ones(M), bs_ptr=torch.ones(N),
                bias_ptr=torch.zeros(N, dtype=torch.bfloat16), cs_ptr=cs, res_ptr=c, gate_ptr=torch.ones(N),
                colsum_ptr=torch.ones(N), M=M, N=N, K=K, stride_am=K, stride_bn=K, stride_cm=N, stride_asm=1,
                stride_bsn=1, stride_csm=cs.stride(0), stride_rm=N, rows_per_gate=M, bound_coef=0.0,
                bound_bias=0.0, programs=132,
                a_desc=TensorDescriptor.from_tensor(a, [128, 128]) if persistent else None,
                b_desc=TensorDescriptor.from_tensor(b, [256, 128]) if persistent else None)

def constexprs(M, N, K, fp8, ffn0):
    # ffn0: GELU into int8 on the GELU grid, as ffn.0 runs; otherwise ffn.2's residual update
    cfg = default_config(M, N, K, False, False, integer=not fp8)
    launch = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    persistent = cfg.pop("PERSISTENT", False)
    return dict(FP8_IN=fp8, A_GROUPED=False, B_BLOCKED=False, HAS_BIAS=True, GELU=ffn0, OUT_Q=ffn0,
                FP8_OUT=False, ROW_BOUND=False, RESIDUAL=not ffn0, GATED=not ffn0, ONE_SAMPLE=not ffn0,
                A_GELU_GRID=not ffn0, OUT_GELU_GRID=ffn0, FAST_GELU=True, PERSISTENT=persistent,
                EVEN_K=K % cfg["BLOCK_K"] == 0, **cfg), launch, persistent

out = []
for M, N, K, fp8, arch, ffn0 in json.loads(sys.argv[1]):
    operand = torch.float8_e4m3fn if fp8 else torch.int8
    const, launch, persistent = constexprs(M, N, K, fp8, ffn0)
    given = args(M, N, K, operand, ffn0, persistent)
    case = {"persistent": persistent}
    try:
        kernel = compile_pipelined(_gemm8_kernel, given, const, target=GPUTarget("cuda", arch, 32), **launch)
        ptx = kernel.asm["ptx"]
        case["waits"] = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
        case["mma"] = ptx.count("wgmma.mma_async")
        case["signature"] = list(kernel.src.signature.values())
        types, aligned, consts = signature(_gemm8_kernel, given, const)
        plain = compile_plain(_gemm8_kernel, types, aligned, consts, target=GPUTarget("cuda", arch, 32),
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
    # one tile per program (the text tokens' small M) and the persistent form (ffn.2 with its residual update,
    # ffn.0, a residual update at K = 1536)
    cases = _compile([(300, 1536, 1536, False, 90, False), (4096, 1536, 8960, False, 90, False),
                      (4096, 8960, 1536, False, 90, True), (4096, 1536, 1536, False, 90, False)])
    assert [case["persistent"] for case in cases] == [False, True, True, True]
    for case in cases:
        assert case["plain_pendings_1"] == 0          # Triton's own choice for an int32 accumulator
        assert case["edited_pendings_1"] == 1         # the loop's wait now leaves one product pending
        assert case["mma"] > 0 and 1 in case["waits"] and case["waits"][-1] == 0   # all collected after the loop
        assert all("warp_group_dot_wait" in line or "#0" in line for line in case["removed"])
    persistent = cases[2]
    # the epilogue inside the flattened loop waits for the pending product before it reads it ...
    assert persistent["waits"].count(0) == 2
    # ... and the kernel compiled from the edited IR takes the host's tensor descriptors as the JIT's would
    assert [t for t in persistent["signature"] if "tensordesc" in str(t)] == ["tensordesc<i8[128, 128]>",
                                                                            "tensordesc<i8[256, 128]>"]


def test_float_accumulators_and_other_gpus_are_left_to_triton():
    fp8_hopper, int8_ada = _compile([(4096, 1536, 8960, True, 90, False), (4096, 1536, 8960, False, 89, False)])
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
    assert "%all_done_acc = ttng.warp_group_dot_wait %acc#0 {pendings = 0 : i32}" in edited
    assert "arith.sitofp %all_done_acc" in edited            # the epilogue reads the collected value
    for body in ([COPY, DOT, WAIT], [DOT, WAIT], [DOT, WAIT, DOT, WAIT, COPY]):
        with pytest.raises(NotPipelinable):
            pipelined_int_mma(LOOP.replace("{body}", "\n".join(body)))


TMA_COPY = "      ttng.async_tma_copy_global_to_local %desc[%i, %j] %buf, %bar, %true : ..."
RESET = "      %r = arith.select %last, %cst, %w#0 : i1, tensor<128x256xi32, #mma>"
EPILOGUE = """\
      scf.if %last {
        %f = arith.sitofp %w#0 : tensor<128x256xi32, #mma> to tensor<128x256xf32, #mma>
        tt.store %out, %f : ...
      } loc(#loc7)"""


def test_a_persistent_kernels_epilogue_in_the_loop_waits_for_the_pending_product():
    from turbo_kernels.int_mma import NotPipelinable, pipelined_int_mma

    edited = pipelined_int_mma(LOOP.replace("{body}", "\n".join([DOT, WAIT, TMA_COPY, RESET, EPILOGUE])))
    lines = edited.splitlines()
    wait = next(i for i, line in enumerate(lines) if "%ready_w_0 = ttng.warp_group_dot_wait %w#0 {pendings = 0" in line)
    assert "scf.if %last {" in lines[wait - 1]                   # first thing in the epilogue
    assert "arith.sitofp %ready_w_0" in lines[wait + 1]          # which then reads the collected product
    assert "%w#0" in next(line for line in lines if "arith.select" in line)   # the reset passes it on, as for fp32
    # a read of the pending product anywhere else, or in an if with an else region, is refused
    for body in ([DOT, WAIT, TMA_COPY, "      %s = arith.addi %w#0, %w#0 : tensor<128x256xi32, #mma>"],
                 [DOT, WAIT, TMA_COPY, EPILOGUE.replace("} loc(#loc7)", "} else {\n      }")]):
        with pytest.raises(NotPipelinable):
            pipelined_int_mma(LOOP.replace("{body}", "\n".join(body)))
