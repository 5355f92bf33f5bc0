"""The 8-bit GEMM's persistent form (one program walks several tiles, TMA loads, the tile loop flattened into
the K loop) computes what the one-tile-per-program form computes, bit for bit, for every epilogue it serves."""

import pytest
import torch

from turbo_kernels.gemm8 import default_config, gemm8, gemm8_ref, output_bound
from turbo_kernels.quant8 import quantize_rows_ref

TILES = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=2, num_warps=4, num_stages=2)
# 3 programs over the 3 x 3 tiles of a 150 x 300 output: each walks three tiles, the last ones ragged
PERSISTENT = dict(TILES, PERSISTENT=True, PROGRAMS=3)


def rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def operands(fmt, seed, M=150, N=300, K=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 3
    w = torch.randn(N, K, generator=g) / K ** 0.5
    bias = 0.1 * torch.randn(N, generator=g)
    return (*quantize_rows_ref(x, fmt), *quantize_rows_ref(w, fmt), bias)


EPILOGUES = {
    "float32 out": ("int8", "fp8"), "gelu, int8 per (token, 128)": ("int8",), "gelu grid": ("int8",),
    "gelu, fp8 per token from a bound": ("fp8",), "residual update (by column halves)": ("int8", "fp8"),
}


@pytest.mark.parametrize("fmt, epilogue", [(f, e) for e, fmts in EPILOGUES.items() for f in fmts])
def test_persistent_form_equals_one_tile_per_program(fmt, epilogue):
    a, a_s, b, b_s, bias = operands(fmt, seed=len(epilogue))
    g = torch.Generator().manual_seed(5)
    residual = torch.randn(a.shape[0], b.shape[0], generator=g).to(torch.bfloat16)
    gate = torch.randn(2, b.shape[0], generator=g)
    kw = {"float32 out": dict(out_dtype=torch.float32),
          "gelu, int8 per (token, 128)": dict(gelu=True, out="int8"),
          "gelu grid": dict(gelu=True, out="int8", gelu_grid=True),
          "gelu, fp8 per token from a bound": dict(gelu=True, out="fp8",
                                                   out_bound=output_bound(b, b_s, bias, "fp8")),
          "residual update (by column halves)": dict(residual=residual, gate=gate)}[epilogue]
    walked = gemm8(a, a_s, b, b_s, bias, config=PERSISTENT, **kw)
    tiled = gemm8(a, a_s, b, b_s, bias, config=TILES, **kw)
    ref = gemm8_ref(a, a_s, b, b_s, bias, **kw)
    if isinstance(walked, tuple):
        assert all(torch.equal(p.view(torch.uint8) if p.dtype == torch.float8_e4m3fn else p,
                               q.view(torch.uint8) if q.dtype == torch.float8_e4m3fn else q)
                   for p, q in zip(walked, tiled))
        assert rel(walked[1], ref[1]) <= 1e-6
    else:
        assert torch.equal(walked, tiled)
        assert rel(walked, ref) <= 1e-6


def test_default_tiles_choose_the_persistent_form_for_video_tokens_with_coarse_scales():
    for N, K in ((1536, 1536), (8960, 1536), (1536, 8960), (5120, 5120), (5120, 13824)):
        assert default_config(32760, N, K, False, False).get("PERSISTENT")
    assert not default_config(512, 1536, 1536, False, False).get("PERSISTENT")      # text tokens
    assert not default_config(32760, 1536, 1536, True, False).get("PERSISTENT")     # grouped scales
    assert not default_config(32760, 1536, 1536, False, True).get("PERSISTENT")

