"""8-bit linear modules: TurboDiffusion's int8 format and numerics, FP8, pre-quantised inputs, the fused FFN, and
an int8 checkpoint made the reference's way loading strictly into int8 shells."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from turbo_kernels.gemm8 import column_sums, gemm8_ref, int8_linear_tiles_trace
from turbo_kernels.norms import layernorm_triton
from turbo_kernels.quant8 import int8_to_row_scales_ref, quantize_rows_ref
from turbo_repl.models.dit import WanDiT
from turbo_repl.models.linear import (Fp8Linear, Int8Linear, Linear8, configure_linears, convert_linears,
                                      feed_forward, int8_shells, quantize_state_dict, reference_int8_trace,
                                      use_channel_scales)


def rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def max_rel(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def linear(in_f, out_f, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f).to(dtype).requires_grad_(False)
    lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f ** 0.5)
    lin.bias.copy_(0.1 * torch.randn(out_f, generator=g))
    return lin


def test_int8_linear_is_turbodiffusions_layer(fixtures_dir):
    io = load_file(fixtures_dir / "quant_linear_gpu.safetensors")
    lin = nn.Linear(384, 200, dtype=torch.bfloat16).requires_grad_(False)
    lin.weight.copy_(io["weight"])
    lin.bias.copy_(io["bias"])
    layer = Int8Linear.from_linear(lin)
    sd = layer.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == {
        "int8_weight": (torch.int8, (200, 384)), "scale": (torch.float32, (2, 3)), "bias": (torch.bfloat16, (200,))}
    assert (layer.int8_weight != io["int8_weight"]).sum() <= 4 and max_rel(layer.scale, io["scale"]) <= 1e-6
    layer.int8_weight.copy_(io["int8_weight"])               # the forward alone, on the reference's weights
    layer.mode = "reference"
    y = layer(io["x"])
    assert y.dtype == torch.bfloat16 and max_rel(y, io["y"]) <= 1e-3


def test_reference_trace_names_every_fixture_output(fixtures_dir):
    io = load_file(fixtures_dir / "quant_linear_gpu.safetensors")
    trace = reference_int8_trace(io["x"], io["weight"], io["bias"])
    assert {k: tuple(v.shape) for k, v in trace.items()} == {
        k: tuple(io[k].shape) for k in ("int8_weight", "scale", "x_int8", "x_scale", "y_gemm", "y")}
    assert torch.equal(trace["x_int8"], io["x_int8"])
    # 2 weights differ on rounding ties (see test_int8), which can flip one bf16 rounding of y: one ulp, 2**-8
    assert max_rel(trace["y_gemm"], io["y_gemm"]) <= 2 ** -8 and rel(trace["y"], io["y"]) <= 1e-3
    same_weights = int8_linear_tiles_trace(io["x"], io["int8_weight"], io["scale"], io["bias"])
    assert max_rel(same_weights["y_gemm"], io["y_gemm"]) <= 1e-3 and max_rel(same_weights["y"], io["y"]) <= 1e-3


def test_quant_linear_fixture_float_and_8bit_paths(fixtures_dir):
    io = load_file(fixtures_dir / "quant_linear.safetensors")
    lin = nn.Linear(320, 200).requires_grad_(False)
    lin.weight.copy_(io["weight"])
    lin.bias.copy_(io["bias"])
    assert max_rel(lin(io["x"]), io["y_float"]) <= 1e-4      # the float path
    for cls, bound in ((Int8Linear, 2e-2), (Fp8Linear, 4e-2)):
        layer = cls.from_linear(lin)
        for mode in ("reference", "triton"):
            layer.mode = mode
            y = layer(io["x"])
            assert y.shape == (2, 7, 200) and rel(y, io["y_float"]) <= bound, (cls.__name__, mode)


@pytest.mark.parametrize("cls, bound", [(Int8Linear, 2e-2), (Fp8Linear, 4e-2)])
def test_fast_path_matches_its_reference_and_float32(cls, bound):
    lin = linear(256, 200, seed=1)
    x = torch.randn(3, 50, 256, generator=torch.Generator().manual_seed(2))
    layer = cls.from_linear(lin)
    layer.mode = "triton"
    y = layer(x)
    xq, xs = quantize_rows_ref(x.reshape(-1, 256), layer.fmt)
    w, ws = layer.weight_and_scale()
    assert rel(y, gemm8_ref(xq, xs, w, ws, layer.bias, out_dtype=torch.float32).view(3, 50, 200)) <= 1e-5
    assert rel(y, lin(x)) <= bound
    with pytest.raises(ValueError, match="input has 100 features, the layer takes 256"):
        layer(torch.randn(2, 100))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_prequantised_input_from_the_fused_norm(fmt):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 37, 256, generator=g) + 0.3).to(torch.bfloat16)
    shift, scale = 0.1 * torch.randn(2, 1, 256, generator=g), 0.1 * torch.randn(2, 1, 256, generator=g)
    layer = (Int8Linear if fmt == "int8" else Fp8Linear).from_linear(linear(256, 130, 4, torch.bfloat16))
    layer.mode = "triton"
    assert layer.input_format == fmt
    pair = layernorm_triton(x, shift=shift, scale=scale, out=fmt)
    y = layer(pair)
    assert y.shape == (2, 37, 130) and y.dtype == torch.bfloat16
    assert torch.equal(y, layer(layernorm_triton(x, shift=shift, scale=scale)))
    layer.mode = "reference"
    assert layer.input_format is None                        # off the GPU: the block hands over tensors


class _Blocks(nn.Module):
    def __init__(self, ffn):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"ffn": ffn})])


@pytest.mark.parametrize("fmt, bound, channels", [("int8", 2.5e-2, False), ("int8", 2e-2, True),
                                                   ("fp8", 6e-2, False)])
def test_feed_forward_fuses_gelu_and_quantisation(fmt, bound, channels):
    ffn = nn.Sequential(linear(256, 384, 5), nn.GELU(approximate="tanh"), linear(384, 256, 6))
    x = torch.randn(2, 40, 256, generator=torch.Generator().manual_seed(7))
    ref = ffn(x)
    model = convert_linears(_Blocks(copy.deepcopy(ffn)), fmt)
    if channels:   # the GPU's int8 form: ffn.2 then takes its input with one scale per token
        use_channel_scales(model)
    configure_linears(model, "triton")
    first, last = model.blocks[0]["ffn"][0], model.blocks[0]["ffn"][2]
    y = feed_forward(model.blocks[0]["ffn"], x)
    assert y.shape == ref.shape and rel(y, ref) <= bound
    # the same function in plain torch: GELU and the hidden quantisation in ffn.0's epilogue
    xq, xs = quantize_rows_ref(x.reshape(-1, 256), fmt)
    w0, s0 = first.weight_and_scale()
    w2, s2 = last.weight_and_scale()
    bound0 = first.output_bound() if fmt == "fp8" else None
    h = gemm8_ref(xq, xs, w0, s0, first.bias, gelu=True, out=fmt, out_bound=bound0, gelu_grid=channels)
    assert h[1].shape == ((80,) if fmt == "fp8" else (80, 3))   # FP8: per token; int8: per 128 channels
    grid = {}
    if channels:   # int8 GELU outputs on the grid from -0.17 up, then one scale per token
        h = int8_to_row_scales_ref(*h, gelu_grid=True)
        grid = dict(a_gelu_grid=True, b_colsum=column_sums(w2))
    assert rel(y, gemm8_ref(*h, w2, s2, last.bias, out_dtype=torch.float32, **grid).view(2, 40, 256)) <= 1e-5


def test_swap_selects_turbodiffusions_layers_and_refuses_bad_modes():
    arch = dict(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=2, num_layers=2)
    with torch.device("meta"):
        model = WanDiT(**arch, sparse_attention=True)
    int8_shells(model)
    swapped = [n for n, m in model.named_modules() if isinstance(m, Linear8)]
    assert len(swapped) == 20 and all(n.startswith("blocks.") for n in swapped)
    assert isinstance(model.blocks[0].self_attn.attn_op.local_attn.proj_l, nn.Linear)   # SLA stays float
    assert isinstance(model.head.head, nn.Linear) and isinstance(model.patch_embedding, nn.Linear)
    with pytest.raises(ValueError, match="quantisation must be one of int8, fp8"):
        convert_linears(model, "int4")
    with pytest.raises(ValueError, match="linear mode must be one of"):
        configure_linears(model, "fastest")


@torch.no_grad()
def test_tiny_int8_checkpoint_loads_strictly_and_runs(fixtures_dir):
    meta = json.loads((fixtures_dir / "dit_t2v.json").read_text())
    weights = load_file(fixtures_dir / meta["files"]["weights"]["file"])
    io = load_file(fixtures_dir / meta["files"]["io"]["file"])
    sd = quantize_state_dict(weights)
    n_blocks = meta["constructor"]["kwargs"]["num_layers"]
    assert sum(k.endswith(".int8_weight") for k in sd) == 10 * n_blocks
    assert not any(k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2 and "proj_l" not in k
                   for k, v in sd.items())
    with torch.device("meta"):
        model = WanDiT(**meta["constructor"]["kwargs"], sparse_attention=any("proj_l" in k for k in sd))
    int8_shells(model).load_state_dict(sd, strict=True, assign=True)
    lin = model.blocks[0].ffn[0]
    assert lin.int8_weight.dtype == torch.int8 and lin.scale.dtype == torch.float32
    # the module swap quantises exactly as the state-dict converter does
    float_model = WanDiT(**meta["constructor"]["kwargs"])
    float_model.load_state_dict(weights, strict=True)
    converted = convert_linears(copy.deepcopy(float_model), "int8").state_dict()
    assert converted.keys() == sd.keys() and all(torch.equal(converted[k], sd[k]) for k in sd)
    x, t, ctx = io["x_B_C_T_H_W"], io["timesteps_B_T"], io["crossattn_emb"]
    out = model(x, t, ctx)
    assert torch.isfinite(out).all()
    assert 1e-4 < rel(out, io["output"]) <= 5e-2              # really int8, and close to the reference


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_residual_update_is_fused_on_the_fast_path_and_equal_to_the_plain_one(fmt):
    from turbo_repl.models.linear import residual_update

    layer = convert_linears(_Blocks(nn.Sequential(linear(256, 192, 8))), fmt).blocks[0]["ffn"][0]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 30, 256, generator=g)
    residual = torch.randn(2, 30, 192, generator=g).to(torch.bfloat16)
    gate = torch.randn(2, 1, 192, generator=g)
    layer.mode = "triton"
    fused = residual_update(layer, x, residual, gate)
    assert layer.input_format == fmt and fused.dtype == torch.bfloat16
    y = layer(x)
    plain = residual.float() + y.float() * gate
    assert rel(fused, plain) <= 4e-3                       # one bf16 rounding apart
    assert rel(residual_update(layer, x, residual), residual.float() + y.float()) <= 4e-3
    layer.mode = "reference"                               # off the fast path: the reference's own expression
    assert torch.equal(residual_update(layer, x, residual, gate), residual + layer(x) * gate.to(torch.bfloat16))
