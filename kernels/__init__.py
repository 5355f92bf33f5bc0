"""turbo_kernels: Triton kernels, each beside a plain-torch reference of the same function.

Attention: `turbo_kernels.sla` (sparse-linear attention, SLA and SageSLA; block map in `block_map`, 8-bit operands
in `sagesla`). 8-bit linears and norms: `quant8`, `gemm8`, `norms`. Nothing here imports turbo_repl.
"""
