"""Fused norms (Triton kernels in the interpreter) against their torch references, float64, and the DiT's own
plain-torch norm + RoPE."""

import pytest
import torch
import torch.nn.functional as F

from turbo_kernels.norms import layernorm_ref, layernorm_triton, rmsnorm_rope_ref, rmsnorm_rope_triton
from turbo_kernels.quant8 import quantize_rows


def rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def inputs(dtype, L=37, D=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, L, D, generator=g) * 2 + 0.5).to(dtype)
    mod = dict(shift=0.1 * torch.randn(2, 1, D, generator=g), scale=0.1 * torch.randn(2, 1, D, generator=g))
    affine = dict(weight=1 + 0.1 * torch.randn(D, generator=g), bias=0.1 * torch.randn(D, generator=g))
    return x, mod, affine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["plain", "affine", "modulated", "per-token modulation"])
def test_layernorm_matches_reference_and_float64(dtype, kind):
    x, mod, affine = inputs(dtype)
    if kind == "per-token modulation":
        mod = {k: v.expand(2, 37, 320) + 0.01 * torch.arange(37.0)[:, None] for k, v in mod.items()}
    kw = {"plain": {}, "affine": affine, "modulated": mod, "per-token modulation": mod}[kind]
    y = layernorm_triton(x, eps=1e-6, **kw)
    yr = layernorm_ref(x, eps=1e-6, **kw)
    assert y.dtype == dtype and y.shape == x.shape
    if dtype == torch.float32:
        assert rel(y, yr) <= 1e-6
    else:  # statistics summed in another order may move a value across a bf16 rounding boundary
        assert (y != yr).float().mean() <= 2e-3 and rel(y, yr) <= 3e-4
    x64 = x.double()
    ref = F.layer_norm(x64, (320,), *(affine[k].double() for k in ("weight", "bias")) if kind == "affine" else
                       (None, None), eps=1e-6)
    if "modulat" in kind:
        ref = ref * (1 + mod["scale"].double()) + mod["shift"].double()
    assert rel(y, ref) <= (1e-6 if dtype == torch.float32 else 6e-3)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("kind", ["affine", "modulated"])
def test_layernorm_quantised_output_equals_separate_quantisation(fmt, kind):
    x, mod, affine = inputs(torch.bfloat16, seed=1)
    kw = affine if kind == "affine" else mod
    q, s = layernorm_triton(x, eps=1e-6, out=fmt, **kw)
    q2, s2 = quantize_rows(layernorm_triton(x, eps=1e-6, **kw), fmt)
    assert q.dtype == q2.dtype and s.shape == (2, 37)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    qr, sr = layernorm_ref(x, eps=1e-6, out=fmt, **kw)
    assert rel(q.float() * s[..., None], qr.float() * sr[..., None]) <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_rope_matches_reference_and_the_dit(dtype):
    from turbo_repl.models import dit

    g = torch.Generator().manual_seed(2)
    heads, head_dim, grid = 2, 24, (2, 3, 4)
    L = 24
    x = (3 * torch.randn(2, L, heads * head_dim, generator=g)).to(dtype)
    w = 1 + 0.1 * torch.randn(heads * head_dim, generator=g)
    cos, sin = dit.rope_tables(head_dim, grid, "cpu")      # [L, 1, head_dim/2], the DiT's own tables
    y = rmsnorm_rope_triton(x, w, cos, sin, heads)
    yr = rmsnorm_rope_ref(x, w, cos, sin, heads)
    assert y.shape == (2, L, heads, head_dim) and y.dtype == dtype
    assert rel(y, yr) <= (1e-6 if dtype == torch.float32 else 1e-3)
    assert rel(yr, dit.rmsnorm_rope(x, w, cos, sin, heads)) <= 1e-6
    # float64: RMSNorm, then rotate pairs (2i, 2i+1) by the tables' angle
    n = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    p = n.view(2, L, heads, -1, 2)
    c, s = cos.double(), sin.double()                     # [L, 1, D/2] against [B, L, H, D/2]
    ref = torch.stack((p[..., 0] * c - p[..., 1] * s, p[..., 0] * s + p[..., 1] * c), -1).flatten(-2)
    assert rel(y, ref) <= (1e-6 if dtype == torch.float32 else 6e-3)


def test_bad_rope_tables_are_refused():
    x = torch.randn(1, 5, 8)
    with pytest.raises(ValueError, match="RoPE tables must be"):
        rmsnorm_rope_triton(x, torch.ones(8), torch.ones(4, 2), torch.ones(4, 2), 2)
