"""8-bit linear layers for the DiT blocks, and the module swap that puts them in.

* `Int8Linear` is TurboDiffusion's layer, buffer for buffer: `int8_weight` int8 [out, in], `scale` float32
  [ceil(out/128), ceil(in/128)] (one per 128x128 weight tile), `bias` [out] — so a `-quant.pth` checkpoint
  loads into it strictly. `from_linear` quantises a float Linear the same way. On a GPU the engine re-quantises
  the weights to one scale per output channel (`use_channel_scales`): tile scales force a rescale per 128-wide
  K step, which keeps the GEMM at bf16 speed; per channel it keeps one integer accumulator over all of K.
* `Fp8Linear` holds e4m3 weights with one scale per output channel, made once at load from a bf16 checkpoint.

Forward modes (`configure_linears(model, mode)`):

* `reference` — plain torch. For `Int8Linear` on a plain tensor this is TurboDiffusion's arithmetic exactly:
  activations quantised in 128x128 tiles over [tokens, channels], int32 tile products times both tile scales
  summed in float32, output in x's dtype, plus bias.
* `fast` (default) — on a GPU, Triton kernels: activations quantised per token (one scale per row: scale =
  amax/127 for int8, amax/448 for e4m3), then the W8A8 GEMM with the bias fused. Per token, because the norm
  that produces an activation holds its whole row and can emit it already quantised (no extra pass), and with
  per-channel weights the GEMM keeps one accumulator over all of K. Error against float32 on Gaussian data:
  int8 1.2-1.3e-2 (TurboDiffusion's tiles: 1.3e-2; tiles re-quantised per channel: 1.5e-2), FP8 3.7e-2 (e4m3's
  3 mantissa bits). Off the GPU `fast` is `reference`.
* `triton` — the kernels wherever they run (the Triton interpreter on a CPU): for tests.

In `fast` mode on a GPU a layer's `input_format` is "int8" or "fp8": the block may then hand it the pair
(x_q [..., in], x_scale [...]) that a fused norm produced (`turbo_kernels.norms.layernorm(..., out=fmt)`)
instead of a tensor. `feed_forward` runs Linear -> GELU -> Linear with the GELU and the quantisation of the
hidden activations fused into the first GEMM.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from turbo_kernels.gemm8 import (column_sums, gemm8, gemm8_ref, int8_linear_tiles_ref, int8_linear_tiles_trace,
                                 output_bound)
from turbo_kernels.quant8 import (TILE, expand_tiles, int8_to_row_scales, quantize_rows, quantize_rows_ref,
                                  quantize_tiles_ref)

QUANT_MODES = ("int8", "fp8")
FORWARD_MODES = ("reference", "fast", "triton")

Quantized = tuple[torch.Tensor, torch.Tensor]


class GeluGrid(NamedTuple):
    """int8 GELU outputs on the grid from -GELU_FLOOR up (x ~= scale * (q + 128) - GELU_FLOOR): twice as fine as
    a symmetric grid, since GELU never goes below -0.17. Made by ffn.0's epilogue for ffn.2 (see gemm8)."""
    q: torch.Tensor
    scale: torch.Tensor


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Linear8(nn.Module):
    """What Int8Linear and Fp8Linear share: the forward over a tensor or a pre-quantised pair."""

    fmt: str                                     # "int8" | "fp8"

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mode = "fast"

    def weight_and_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def uses_triton(self) -> bool:
        return self.mode == "triton" or (self.mode == "fast" and self.weight_and_scale()[0].is_cuda)

    @property
    def input_format(self) -> str | None:
        """The 8-bit format this layer takes pre-quantised (per token), or None if it wants a tensor."""
        return self.fmt if self.uses_triton() else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"

    def forward(self, x: torch.Tensor | Quantized, *, gelu: bool = False, out: str | None = None,
                residual: torch.Tensor | None = None, gate: torch.Tensor | None = None, gelu_grid: bool = False):
        """x [..., in] or (x_q [..., in], x_scale [...] per token or [..., ceil(in/128)] per 128 channels).

        Returns [..., out] in x's dtype (the bias's dtype for a pair); `gelu` applies GELU (tanh form) after
        the bias; `out="int8"|"fp8"` returns the result quantised instead, as the next layer's input: int8 per
        (token, 128 channels), FP8 per token (scale from a bound, see turbo_kernels.gemm8.output_bound).
        `residual` [..., out] (and `gate` [samples, 1, out]) returns residual + gate * result instead, in the
        residual's dtype: the DiT block's residual update, fused into the GEMM on the fast path. `gelu_grid`
        (with gelu and out="int8") returns a `GeluGrid`; a `GeluGrid` input needs per-channel weights."""
        weight, w_scale = self.weight_and_scale()
        if isinstance(x, tuple):
            x_q, x_scale = x
            lead, out_dtype = x_q.shape[:-1], (self.bias.dtype if self.bias is not None else torch.bfloat16)
            grouped = x_scale.dim() == x_q.dim()            # [..., groups] rather than [...]
            x_q = x_q.reshape(-1, self.in_features)
            x_scale = x_scale.reshape(x_q.shape[0], -1) if grouped else x_scale.reshape(-1)
        else:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"input has {x.shape[-1]} features, the layer takes {self.in_features}")
            lead, out_dtype = x.shape[:-1], x.dtype
            x2 = x.reshape(-1, self.in_features)
            if not self.uses_triton() and self.fmt == "int8" and w_scale.dim() == 2:   # TurboDiffusion's own
                y = int8_linear_tiles_ref(x2, weight, w_scale, self.bias)
                if gelu:
                    y = F.gelu(y, approximate="tanh")
                if residual is not None:
                    y = y.view(residual.shape).float() * (gate.float() if gate is not None else 1.0)
                    return (residual.float() + y).to(residual.dtype)
                return _split(quantize_rows_ref(y, out, group=TILE), lead) if out else y.view(*lead, -1)
            x_q, x_scale = (quantize_rows if self.uses_triton() else quantize_rows_ref)(x2, self.fmt)
        extra = {}
        if isinstance(x, GeluGrid):
            extra.update(a_gelu_grid=True, b_colsum=self.column_sums())
        if gelu_grid:
            extra["gelu_grid"] = True
        if residual is not None:
            extra["residual"] = residual.reshape(-1, self.out_features)
            if gate is not None:
                extra["gate"] = gate.reshape(-1, self.out_features)
        y = self.matmul(x_q, x_scale, weight, w_scale, out_dtype, gelu, out, **extra)
        if not out:
            return y.view(*lead, self.out_features)
        return GeluGrid(*_split(y, lead)) if gelu_grid else _split(y, lead)

    def matmul(self, x_q, x_scale, weight, w_scale, out_dtype, gelu, out, **extra):
        gemm = gemm8 if self.uses_triton() else gemm8_ref
        # an FP8 output from per-token inputs takes per-token scales from a bound (see gemm8); else per 128
        bound = self.output_bound() if out == "fp8" and x_scale.dim() == 1 else None
        return gemm(x_q, x_scale, weight, w_scale, self.bias, out_dtype=out_dtype, gelu=gelu, out=out,
                    out_bound=bound, **extra)

    def column_sums(self) -> torch.Tensor:
        """The weight's integer sums over K per output channel (for inputs on the GELU grid), computed once."""
        cached = getattr(self, "_colsum", None)
        weight = self.weight_and_scale()[0]
        if cached is None or cached.device != weight.device:
            self._colsum = column_sums(weight)
        return self._colsum

    def output_bound(self) -> tuple[float, float]:
        if getattr(self, "_bound", None) is None:   # weights are fixed once loaded: computed once
            weight, w_scale = self.weight_and_scale()
            self._bound = output_bound(weight, w_scale, self.bias, self.fmt)
        return self._bound


def _split(pair: Quantized, lead) -> Quantized:
    """(q [M, N], scale [M] or [M, G]) -> (q [*lead, N], scale [*lead] or [*lead, G])."""
    q, s = pair
    return q.view(*lead, q.shape[-1]), (s.view(*lead, s.shape[-1]) if s.dim() == 2 else s.view(lead))


class Int8Linear(Linear8):
    """TurboDiffusion's int8 linear layer (its `-quant.pth` checkpoints' format)."""

    fmt = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__(in_features, out_features)
        self.register_buffer("int8_weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(_cdiv(out_features, TILE), _cdiv(in_features, TILE),
                                                  dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def weight_and_scale(self):
        return self.int8_weight, self.scale

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, channel_scales: bool = False) -> "Int8Linear":
        """Quantise `linear`'s weight in 128x128 tiles as TurboDiffusion does (the weight's own values: bf16 for
        a bf16 checkpoint; a float32 weight is quantised from its float32 values), or directly in the GPU's form,
        one scale per output channel (one rounding instead of two)."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype)
        layer.int8_weight, layer.scale = quantize_rows_ref(w, "int8") if channel_scales else quantize_tiles_ref(w)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    @torch.no_grad()
    def use_channel_scales(self) -> None:
        """Re-quantise the weight from 128x128 tile scales to one scale per output channel, in place."""
        if self.scale.dim() == 1:
            return
        tiles = expand_tiles(self.scale, self.out_features).repeat_interleave(TILE, dim=1)[:, : self.in_features]
        weight = torch.empty(self.int8_weight.shape, dtype=torch.float32, device=self.int8_weight.device)
        for rows in torch.split(torch.arange(self.out_features, device=weight.device), 4096):  # bounded temporaries
            weight[rows] = self.int8_weight[rows].float() * tiles[rows]
        self.int8_weight, self.scale = quantize_rows_ref(weight, "int8")
        self._bound = self._colsum = None   # derived from the old weight


class Fp8Linear(Linear8):
    """e4m3 weights, one float32 scale per output channel (amax/448); activations quantised per token."""

    fmt = "fp8"
    # cuBLAS (torch._scaled_mm) instead of our kernel for plain per-token inputs; ours measured faster on an
    # H100 (benchmarks/BENCHMARKS.md), so off
    use_scaled_mm = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__(in_features, out_features)
        self.register_buffer("fp8_weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                       device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def weight_and_scale(self):
        return self.fp8_weight, self.weight_scale

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype)
        layer.fp8_weight, layer.weight_scale = quantize_rows_ref(w, "fp8")
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        layer.output_bound()
        return layer

    def matmul(self, x_q, x_scale, weight, w_scale, out_dtype, gelu, out, **extra):
        if (self.use_scaled_mm and x_q.is_cuda and not gelu and out is None and x_scale.dim() == 1
                and out_dtype == torch.bfloat16 and not extra):
            bias = self.bias.to(out_dtype) if self.bias is not None else None
            return torch._scaled_mm(x_q, weight.t(), scale_a=x_scale[:, None], scale_b=w_scale[None, :],
                                    bias=bias, out_dtype=out_dtype)
        return super().matmul(x_q, x_scale, weight, w_scale, out_dtype, gelu, out, **extra)


# --------------------------------------------------------------------------------------------- the swap

def quantizable_linears(model: nn.Module):
    """(parent, attribute, linear) for every nn.Linear inside `model.blocks` whose qualified name does not
    contain `proj_l` — the layers TurboDiffusion quantises (10 per Wan block)."""
    found = []
    for name, parent in model.blocks.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear) and "proj_l" not in f"{name}.{attr}":
                found.append((parent, attr, child))
    return found


def int8_shells(model: nn.Module) -> nn.Module:
    """Swap each quantizable Linear for an empty Int8Linear on `meta`, so that a `-quant.pth` state dict loads
    into the model strictly with `assign=True`."""
    for parent, attr, lin in quantizable_linears(model):
        setattr(parent, attr, Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, "meta",
                                         lin.weight.dtype))
    return model


def convert_linears(model: nn.Module, mode: str, channel_scales: bool = False) -> nn.Module:
    """Quantise the quantizable Linears of a loaded model in place: mode "int8" (TurboDiffusion's format, or with
    `channel_scales` the GPU's per-channel form) or "fp8" (per-channel e4m3)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"quantisation must be one of {', '.join(QUANT_MODES)}, not '{mode}'")
    make = (lambda lin: Int8Linear.from_linear(lin, channel_scales)) if mode == "int8" else Fp8Linear.from_linear
    # by name, so each float weight is freed as soon as its layer is replaced (peak: the model plus one layer)
    places = [(parent, attr) for parent, attr, _ in quantizable_linears(model)]
    for parent, attr in places:
        setattr(parent, attr, make(getattr(parent, attr)))
    return model


def use_channel_scales(model: nn.Module) -> None:
    """Put every int8 layer of `model` in the per-channel form the GPU's fast path runs at full speed (see
    `Int8Linear`); layers already in it are left alone."""
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.use_channel_scales()


def configure_linears(model: nn.Module, mode: str) -> None:
    """Set the forward mode ('reference' | 'fast' | 'triton') of every 8-bit linear in `model`."""
    if mode not in FORWARD_MODES:
        raise ValueError(f"linear mode must be one of {', '.join(FORWARD_MODES)}, not '{mode}'")
    for m in model.modules():
        if isinstance(m, Linear8):
            m.mode = mode


def feed_forward(ffn: nn.Sequential, x: torch.Tensor | Quantized, residual: torch.Tensor | None = None,
                 gate: torch.Tensor | None = None) -> torch.Tensor:
    """Wan's FFN, `Sequential(Linear, GELU(tanh), Linear)`, or with `residual` the block's update residual +
    FFN(x) * gate. With 8-bit layers on the fast path the GELU and the quantisation of the hidden activations run
    in the first GEMM's epilogue, and the residual update in the second's."""
    first, last = ffn[0], ffn[2]
    if isinstance(first, Linear8) and isinstance(last, Linear8) and last.input_format is not None:
        # int8 into per-channel weights: the GELU grid, then one scale per token (one integer accumulator)
        per_token = last.input_format == "int8" and last.weight_and_scale()[1].dim() == 1
        hidden = first(x, gelu=True, out=last.input_format, gelu_grid=per_token)
        if per_token:
            hidden = _one_scale_per_token(hidden)
        return residual_update(last, hidden, residual, gate)
    hidden = first(x, gelu=True) if isinstance(first, Linear8) else ffn[1](first(x))
    return residual_update(last, hidden, residual, gate)


# The residual update in the GEMM's epilogue; a switch for same-run comparisons (benchmarks).
FUSE_RESIDUAL = True


def residual_update(linear: nn.Module, x, residual: torch.Tensor | None, gate: torch.Tensor | None = None):
    """residual + linear(x) * gate (gate [samples, 1, out], float32; none: plain residual + linear(x)), or
    linear(x) without a residual. Fused into the GEMM's epilogue when `linear` is an 8-bit layer on the fast
    path (one rounding); otherwise computed as the reference does, in the residual's dtype."""
    if residual is None:
        return linear(x)
    if FUSE_RESIDUAL and isinstance(linear, Linear8) and linear.input_format is not None:
        return linear(x, residual=residual, gate=gate)
    y = linear(x)
    return residual + (y * gate.to(residual.dtype) if gate is not None else y)


def _one_scale_per_token(hidden: GeluGrid) -> GeluGrid:
    """int8 hidden activations with a scale per (token, 128 channels) -> one scale per token, so that ffn.2 with
    per-channel weights keeps one integer accumulator over all of K (measured on an H100 at 14B 720p: 14.3 ms
    with a rescale per K step against 7.7 ms; the extra pass costs ~0.7 ms)."""
    q, s = hidden
    q2, s2 = int8_to_row_scales(q.reshape(-1, q.shape[-1]), s.reshape(-1, s.shape[-1]), gelu_grid=True)
    return GeluGrid(q2.view(q.shape), s2.view(q.shape[:-1]))


# --------------------------------------------------------------------------------------------- checkpoints

def is_quantizable_key(key: str, tensor: torch.Tensor) -> bool:
    """A `.weight` of a Linear inside the blocks (2-D), other than SLA's `proj_l`."""
    return key.startswith("blocks.") and key.endswith(".weight") and tensor.dim() == 2 and "proj_l" not in key


def quantize_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A float DiT state dict -> TurboDiffusion's `-quant.pth` layout: each quantizable `X.weight` becomes
    `X.int8_weight` + `X.scale` (128x128 tiles, as `Int8Linear.from_linear`); everything else is kept as is.

    This converts a bf16 checkpoint into an int8 one (quantise the bf16 values, as the reference's converter
    does): `torch.save(quantize_state_dict(torch.load(path)), out)`."""
    out = {}
    for key, t in sd.items():
        if is_quantizable_key(key, t):
            base = key[: -len("weight")]
            out[base + "int8_weight"], out[base + "scale"] = quantize_tiles_ref(t)
        else:
            out[key] = t
    return out


def reference_int8_trace(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A float Linear quantised and run TurboDiffusion's way, every intermediate under the name its parity
    fixture (`quant_linear_gpu`) gives it: int8_weight, scale, x_int8, x_scale, y_gemm, y."""
    int8_weight, scale = quantize_tiles_ref(weight)
    return {"int8_weight": int8_weight, "scale": scale, **int8_linear_tiles_trace(x, int8_weight, scale, bias)}
