"""int8: per-token quantisation and the W8A8 GEMM (Triton kernels, run by the interpreter) against their torch
references and float32; TurboDiffusion's 128x128-tile numerics against its own GPU outputs (quant_linear_gpu)."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from turbo_kernels.gemm8 import gemm8, gemm8_ref, int8_linear_tiles_ref
from turbo_kernels.quant8 import expand_tiles, quantize_rows, quantize_rows_ref, quantize_tiles_ref

# small tiles keep the interpreter quick; the GPU uses default_config
SMALL = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=2, num_warps=4, num_stages=2)


def rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def max_rel(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("group", [None, 128])
def test_quantize_rows_matches_reference(group):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 70, 320, generator=g) * 4 * torch.rand(3, 70, 1, generator=g)).to(torch.bfloat16)
    x[0, 0] = 0                                            # an all-zero token
    q, s = quantize_rows(x, "int8", group)
    qr, sr = quantize_rows_ref(x, "int8", group)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    assert s.shape == ((3, 70) if group is None else (3, 70, 3))
    assert q[1:].abs().amax(-1).eq(127).all()              # each token's amax lands on 127
    deq = q.float() * (s[..., None] if group is None else s.repeat_interleave(128, -1)[..., :320])
    step = s.amax(-1, keepdim=True) if group else s[..., None]
    assert ((deq - x.float()).abs() <= step * (0.5 + 1e-5)).all()   # within half a step everywhere


def test_int8_rounding_is_half_to_even_on_exact_ties():
    """The kernels round with an add of 1.5 * 2**23 instead of the GPU's conversions: ties go to the even
    integer, as torch.round does, on both signs and at the ends of the range."""
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 125.5, 126.5, -126.5, -124.5, 3.49999, -3.50001])
    x = torch.cat([torch.tensor([127.0]), ties]).repeat(2, 1)          # amax 127: the scale is exactly 1
    q, s = quantize_rows(x, "int8")
    assert torch.equal(s, torch.ones(2))
    assert q[0, 1:].tolist() == torch.round(ties).tolist() == [0, 2, 2, 0, -2, -2, 126, 126, -126, -124, 3, -4]


def test_tile_quantisation_matches_turbodiffusion(fixtures_dir):
    io = load_file(fixtures_dir / "quant_linear_gpu.safetensors")
    q, s = quantize_tiles_ref(io["weight"])
    diff = (q.int() - io["int8_weight"].int()).abs()
    assert diff.max() <= 1 and (diff > 0).sum() <= 4       # only rounding ties may differ
    assert max_rel(s, io["scale"]) <= 1e-6
    xq, xs = quantize_tiles_ref(io["x"].reshape(-1, 384))
    assert torch.equal(xq, io["x_int8"])
    assert max_rel(xs, io["x_scale"]) <= 1e-6


def test_int8_linear_matches_turbodiffusion(fixtures_dir):
    io = load_file(fixtures_dir / "quant_linear_gpu.safetensors")
    y_gemm = gemm8_ref(io["x_int8"], expand_tiles(io["x_scale"], 300), io["int8_weight"], io["scale"])
    assert max_rel(y_gemm, io["y_gemm"]) <= 1e-3
    y = int8_linear_tiles_ref(io["x"], io["int8_weight"], io["scale"], io["bias"])
    assert y.dtype == torch.bfloat16 and y.shape == io["y"].shape
    assert max_rel(y, io["y"]) <= 1e-3
    assert rel(y, io["y_float"]) <= 2e-2


@pytest.mark.parametrize("a_group, b_blocked, K", [(None, False, 320), (None, True, 256), (128, False, 256),
                                                    (128, True, 384)])
def test_gemm_matches_reference_and_float32(a_group, b_blocked, K):
    g = torch.Generator().manual_seed(2)
    M, N = 150, 200                                        # ragged against the 64 x 128 tiles
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = 0.1 * torch.randn(N, generator=g)
    xq, xs = quantize_rows_ref(x, "int8", a_group)
    wq, ws = quantize_tiles_ref(w) if b_blocked else quantize_rows_ref(w, "int8")
    y = gemm8(xq, xs, wq, ws, b, out_dtype=torch.float32, config=SMALL)
    assert rel(y, gemm8_ref(xq, xs, wq, ws, b, out_dtype=torch.float32)) <= 1e-6
    assert rel(y, x @ w.T + b) <= 2e-2


def test_gemm_gelu_int8_epilogue():
    g = torch.Generator().manual_seed(3)
    M, N, K = 130, 256, 256
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = 0.1 * torch.randn(N, generator=g)
    xq, xs = quantize_rows_ref(x, "int8")
    wq, ws = quantize_tiles_ref(w)
    q, s = gemm8(xq, xs, wq, ws, b, gelu=True, out="int8", config=SMALL)
    qr, sr = gemm8_ref(xq, xs, wq, ws, b, gelu=True, out="int8")
    assert s.shape == (M, 2)                               # one scale per (token, 128 channels)
    assert (q.int() - qr.int()).abs().max() <= 1 and max_rel(s, sr) <= 1e-6
    deq = q.float() * s.repeat_interleave(128, -1)
    assert rel(deq, F.gelu(x @ w.T + b, approximate="tanh")) <= 2e-2


@pytest.mark.parametrize("fmt, gated, samples", [("int8", True, 2), ("fp8", True, 2), ("int8", False, 2),
                                                  ("fp8", True, 1)])
def test_gemm_residual_epilogue(fmt, gated, samples):
    """The block's residual update in the epilogue: x + gate * (a @ w.T + b), a gate per sample and channel."""
    g = torch.Generator().manual_seed(4)
    L, N, K = 150 // samples, 200, 256                     # 150 rows, ragged against the tiles
    x = torch.randn(samples * L, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = 0.1 * torch.randn(N, generator=g)
    residual = torch.randn(samples * L, N, generator=g).to(torch.bfloat16)
    gate = torch.randn(samples, N, generator=g) if gated else None
    xq, xs = quantize_rows_ref(x, fmt)
    wq, ws = quantize_rows_ref(w, fmt)
    y = gemm8(xq, xs, wq, ws, b, residual=residual, gate=gate, config=SMALL)
    assert y.dtype == torch.bfloat16 and y.shape == residual.shape
    assert rel(y, gemm8_ref(xq, xs, wq, ws, b, residual=residual, gate=gate)) <= 4e-3   # bf16 rounding of one sum
    exact = x @ w.T + b
    expected = residual.float() + (exact * gate.repeat_interleave(L, 0) if gated else exact)
    assert rel(y, expected) <= (2e-2 if fmt == "int8" else 4e-2)
    with pytest.raises(ValueError, match="gate"):
        gemm8(xq, xs, wq, ws, b, residual=residual, gate=torch.ones(7, N), config=SMALL)


def test_gemm_rejects_mismatched_operands():
    a = torch.zeros(4, 128, dtype=torch.int8)
    with pytest.raises(ValueError, match="inner sizes differ"):
        gemm8(a, torch.ones(4), torch.zeros(8, 256, dtype=torch.int8), torch.ones(8))
    with pytest.raises(ValueError, match="weight scale has shape"):
        gemm8(a, torch.ones(4), torch.zeros(8, 128, dtype=torch.int8), torch.ones(3))


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_channel_scales_keep_the_layer_within_the_error_bound(mode):
    """The GPU's form of a TurboDiffusion layer: its tile-scaled weight re-quantised per output channel."""
    from turbo_repl.models.linear import Int8Linear, use_channel_scales

    g = torch.Generator().manual_seed(11)
    lin = torch.nn.Linear(384, 200).requires_grad_(False)
    lin.weight.copy_(torch.randn(200, 384, generator=g) / 384 ** 0.5)
    x = torch.randn(2, 70, 384, generator=g)
    model = torch.nn.Sequential(Int8Linear.from_linear(lin))
    layer = model[0]
    tiles_out = layer(x)
    use_channel_scales(model)
    assert layer.scale.shape == (200,) and layer.int8_weight.dtype == torch.int8
    layer.mode = mode
    out = layer(x)
    assert rel(out, lin(x)) <= 2e-2
    assert rel(out, tiles_out) <= 2e-2
    # the new weight is the old one re-rounded: within one new step of the tile-scaled values
    weight = layer.int8_weight.float() * layer.scale[:, None]
    assert (weight - lin.weight).abs().max() <= layer.scale.max() * 1.01 + 1e-6
    before = layer.int8_weight.clone()
    use_channel_scales(model)     # a second call changes nothing
    assert torch.equal(layer.int8_weight, before)


@pytest.mark.parametrize("M,K,chunk", [(37, 384, 4), (5, 300, 1), (64, 128, 4), (20, 1100, 4)])
def test_group_scales_to_row_scales(M, K, chunk):
    from turbo_kernels.quant8 import int8_to_row_scales, int8_to_row_scales_ref

    g = torch.Generator().manual_seed(M + K)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4
    x[:, :128] *= 5                                   # groups of different ranges within a row
    q, s = quantize_rows_ref(x, "int8", 128)
    q_row, s_row = int8_to_row_scales(q, s, chunk=chunk)
    ref_q, ref_s = int8_to_row_scales_ref(q, s)
    assert torch.equal(q_row, ref_q) and torch.equal(s_row, ref_s)
    assert s_row.shape == (M,) and torch.allclose(s_row, s.amax(1))
    # a second rounding: within half a row step of the grouped values, and close to a direct per-row rounding
    grouped = q.float() * s.repeat_interleave(128, 1)[:, :K]
    assert ((q_row.float() * s_row[:, None] - grouped).abs() <= s_row[:, None] * 0.5 + 1e-7).all()
    direct_q, direct_s = quantize_rows_ref(x, "int8")
    assert rel(q_row.float() * s_row[:, None], x) <= 1.5 * rel(direct_q.float() * direct_s[:, None], x)


def test_float_weights_go_straight_to_channel_scales_with_one_rounding():
    from turbo_repl.models.linear import Int8Linear

    g = torch.Generator().manual_seed(12)
    lin = torch.nn.Linear(384, 200).requires_grad_(False)
    lin.weight.copy_(torch.randn(200, 384, generator=g) / 384 ** 0.5)
    direct = Int8Linear.from_linear(lin, channel_scales=True)
    via_tiles = Int8Linear.from_linear(lin)
    via_tiles.use_channel_scales()
    assert direct.scale.shape == via_tiles.scale.shape == (200,)
    err = lambda layer: rel(layer.int8_weight.float() * layer.scale[:, None], lin.weight)  # noqa: E731
    assert err(direct) < err(via_tiles)
    assert torch.equal(direct.int8_weight, quantize_rows_ref(lin.weight, "int8")[0])


def test_gelu_grid_epilogue_and_input():
    """ffn.0 -> ffn.2 on the GELU grid: the epilogue stores GELU outputs from -0.17 upwards, the next GEMM
    corrects for the offset with the weights' column sums; each step equals its reference, and the grid's
    error is about half the symmetric one's."""
    from turbo_kernels.gemm8 import column_sums, gelu_grid_values
    from turbo_kernels.quant8 import int8_to_row_scales, int8_to_row_scales_ref

    g = torch.Generator().manual_seed(13)
    M, K, H = 150, 256, 384
    x = torch.randn(M, K, generator=g)
    w0 = torch.randn(H, K, generator=g) / K ** 0.5
    w2 = torch.randn(K, H, generator=g) / H ** 0.5
    b0, b2 = 0.1 * torch.randn(H, generator=g), 0.1 * torch.randn(K, generator=g)
    xq, xs = quantize_rows_ref(x, "int8")
    (w0q, w0s), (w2q, w2s) = quantize_rows_ref(w0, "int8"), quantize_rows_ref(w2, "int8")
    hidden = F.gelu(x @ w0.T + b0, approximate="tanh")

    q, s = gemm8(xq, xs, w0q, w0s, b0, gelu=True, out="int8", gelu_grid=True, config=SMALL)
    qr, sr = gemm8_ref(xq, xs, w0q, w0s, b0, gelu=True, out="int8", gelu_grid=True)
    assert (q.int() - qr.int()).abs().max() <= 1 and max_rel(s, sr) <= 1e-6
    # the rounding of the output itself, against the same GEMM + GELU unrounded: about half the symmetric one's
    exact = gemm8_ref(xq, xs, w0q, w0s, b0, gelu=True, out_dtype=torch.float32)
    sym_q, sym_s = gemm8(xq, xs, w0q, w0s, b0, gelu=True, out="int8", config=SMALL)
    assert rel(gelu_grid_values(q, s), exact) < 0.6 * rel(sym_q.float() * sym_s.repeat_interleave(128, -1), exact)
    assert rel(gelu_grid_values(q, s), hidden) <= 2e-2

    (qt, st), (qtr, str_) = int8_to_row_scales(q, s, gelu_grid=True), int8_to_row_scales_ref(qr, sr, gelu_grid=True)
    assert (qt.int() - qtr.int()).abs().max() <= 1 and st.shape == (M,)
    sym_qt, sym_st = int8_to_row_scales(sym_q, sym_s)
    assert rel(gelu_grid_values(qt, st), exact) < 0.6 * rel(sym_qt.float() * sym_st[:, None], exact)

    colsum = column_sums(w2q)
    y = gemm8(qt, st, w2q, w2s, b2, out_dtype=torch.float32, a_gelu_grid=True, b_colsum=colsum, config=SMALL)
    y_ref = gemm8_ref(qt, st, w2q, w2s, b2, out_dtype=torch.float32, a_gelu_grid=True, b_colsum=colsum)
    assert rel(y, y_ref) <= 1e-5
    dense = gelu_grid_values(qt, st) @ (w2q.float() * w2s[:, None]).T + b2      # what the grid values mean
    assert rel(y, dense) <= 1e-5
    assert rel(y, hidden @ w2.T + b2) <= 2e-2
