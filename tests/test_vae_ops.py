"""The VAE's fused elementwise passes (RMS norm + SiLU; bias + residual add): the Triton kernels (Triton's interpreter
on CPU) against the plain-torch references, and the references against their definitions, on fresh random inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from turbo_kernels._runtime import interpreting
from turbo_kernels.vae_ops import add_bias_ref, add_bias_triton, rms_norm_silu_ref, rms_norm_silu_triton

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="CPU Triton tests need TRITON_INTERPRET=1")
CL = torch.channels_last_3d


def rel_l2(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def inputs(c, seed, shape=(2, 3, 5, 7)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape[0], c, *shape[1:], generator=g) * 3 + torch.randn(1, c, 1, 1, 1, generator=g)
    gamma = 1 + 0.2 * torch.randn(c, 1, 1, 1, generator=g)
    bias = torch.randn(c, generator=g)
    return x, gamma, bias


def definition(x, gamma, bias, silu):
    """The reference network's RMS_norm (F.normalize over channels, times sqrt(C) and gamma), in float64."""
    x, gamma = x.double(), gamma.double()
    if bias is not None:
        x = x + bias.double().view(1, -1, 1, 1, 1)
    y = F.normalize(x, dim=1) * math.sqrt(x.shape[1]) * gamma
    return F.silu(y) if silu else y


@pytest.mark.parametrize("c", [4, 12, 96])
@pytest.mark.parametrize("with_bias, silu", [(True, True), (False, False)])
def test_reference_is_the_definition(c, with_bias, silu):
    x, gamma, bias = inputs(c, seed=c)
    bias = bias if with_bias else None
    for layout in (torch.contiguous_format, CL):
        out = rms_norm_silu_ref(x.contiguous(memory_format=layout), gamma, bias, silu=silu)
        assert rel_l2(out, definition(x, gamma, bias, silu)) < 1e-6


@needs_interpreter
@pytest.mark.parametrize("c", [3, 16, 96])
@pytest.mark.parametrize("with_bias, silu", [(True, True), (False, True), (True, False)])
def test_kernel_writes_into_a_slice_of_the_conv_buffer(c, with_bias, silu):
    """As the causal conv uses it: the frames after the remembered ones, in a channels-last buffer."""
    x, gamma, bias = inputs(c, seed=100 + c)
    bias = bias if with_bias else None
    buf = torch.full((2, c, 5, 5, 7), float("nan")).contiguous(memory_format=CL)
    rms_norm_silu_triton(x.contiguous(memory_format=CL), gamma, bias, silu=silu, out=buf[:, :, 2:])
    assert torch.isnan(buf[:, :, :2]).all()                   # the remembered frames are left alone
    assert rel_l2(buf[:, :, 2:], rms_norm_silu_ref(x.double(), gamma.double(), bias, silu=silu)) < 1e-6


@needs_interpreter
def test_kernel_takes_any_layout_and_returns_channels_last():
    x, gamma, bias = inputs(8, seed=7)
    out = rms_norm_silu_triton(x[:, :, :, 1:, ::2], gamma, bias)   # strided, not channels-last
    assert out.is_contiguous(memory_format=CL)
    assert rel_l2(out, definition(x[:, :, :, 1:, ::2], gamma, bias, True)) < 1e-6


@needs_interpreter
def test_kernel_in_bfloat16_rounds_once():
    x, gamma, bias = inputs(24, seed=8)
    x, bias = x.bfloat16(), bias.bfloat16()
    out = rms_norm_silu_triton(x.contiguous(memory_format=CL), gamma, bias)
    assert out.dtype == torch.bfloat16
    ref = definition(x, gamma, bias, True)
    # one rounding to bf16 (8 significant bits): at most 2^-8 relative per element
    assert ((out.double() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-30).all()
    assert rel_l2(out, ref) < 3e-3


@needs_interpreter
@pytest.mark.parametrize("c, dtype", [(16, torch.float32), (12, torch.bfloat16)])
def test_bias_and_residual_add_in_place(c, dtype):
    x, _, bias = inputs(c, seed=200 + c)
    h = x.to(dtype).contiguous(memory_format=CL)
    residual = torch.randn_like(x).to(dtype)                      # another layout: the kernel adapts it
    want = h.double() + bias.to(dtype).double().view(1, -1, 1, 1, 1) + residual.double()
    assert rel_l2(add_bias_ref(h.clone(), bias.to(dtype), residual), want) < (2e-3 if dtype == torch.bfloat16 else 1e-7)
    out = add_bias_triton(h, bias.to(dtype), residual)
    assert out.data_ptr() == h.data_ptr()                          # in place
    assert rel_l2(out, want) < (2e-3 if dtype == torch.bfloat16 else 1e-7)
    assert torch.equal(add_bias_triton(x.clone(), bias), x + bias.view(1, -1, 1, 1, 1))  # float32 without residual


def test_bad_sizes_are_refused():
    x, gamma, bias = inputs(8, seed=9)
    with pytest.raises(ValueError, match="gamma/bias must have 8 values"):
        rms_norm_silu_ref(x, gamma[:4], bias)
    with pytest.raises(ValueError, match="out has shape"):
        rms_norm_silu_ref(x, gamma, bias, out=torch.empty(1))
    with pytest.raises(ValueError, match="bias must have 8 values"):
        add_bias_ref(x, bias[:3])
