"""The ten linear layers of one Wan block on a GPU: bf16 cuBLAS against our int8 and FP8 paths.

    PYTHONPATH=. python benchmarks/linear.py [--models 1.3b-480p,14b-480p,14b-720p] [--sweep] [--out DIR]
    TRITON_INTERPRET=1 python benchmarks/linear.py --smoke       # CPU: tiny shapes, checks only

Per block: self-attention q, k, v, o and cross-attention q, o on the M video tokens, cross-attention k, v on
the 512 text tokens, ffn.0 (dim -> ffn, then GELU) and ffn.2 (ffn -> dim). Pipelines timed, each end to end
(activation quantisation included):

* bf16            F.linear x10 (cuBLAS), inputs given — the anchor's measurement
* bf16+gelu       the same plus the FFN's GELU
* int8-td         TurboDiffusion-format weights (128x128 tile scales), activations quantised per token by a
                  separate pass before each GEMM, GELU + per-(token,128) quantisation fused into ffn.0
* int8-pc         the same with per-output-channel int8 weights (one integer accumulator over all of K)
* fp8             our Triton FP8 GEMM, per-channel e4m3 weights
* fp8-cublas      torch._scaled_mm (row-wise scales), our activation quantisation, GELU and the hidden
                  activations' quantisation as separate passes
and, with `fused`, the same where the three norms before q/k/v, cross-q and ffn.0 are our fused LayerNorm
(+ modulation) kernels emitting the 8-bit activations directly; its bf16 baseline runs the same norms
emitting bf16 ("bf16-norms"). Errors: relative L2 of each layer type's output against float32 on the first
rows. `--sweep` times several tile configurations per GEMM variant and shape first and uses the best.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from turbo_kernels.gemm8 import (column_sums, gelu_grid_values, gemm8, gemm8_ref, output_bound,  # noqa: E402
                                 quantize_gelu_grid_ref)
from turbo_kernels.norms import layernorm_ref, layernorm_triton, rmsnorm_rope_ref, rmsnorm_rope_triton  # noqa: E402
from turbo_kernels.quant8 import (int8_to_row_scales, int8_to_row_scales_ref, quantize_rows,  # noqa: E402
                                  quantize_rows_ref, quantize_tiles_ref)

MODELS = {  # name: (dim, ffn_dim, tokens)
    "1.3b-480p": (1536, 8960, 32760),
    "14b-480p": (5120, 13824, 32760),
    "14b-720p": (5120, 13824, 75600),
}
TEXT = 512


def C(bm, bn, bk, w, s, g=8, fast_gelu=True, persistent=False):
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=w, num_stages=s, FAST_GELU=fast_gelu)
    return {**cfg, "PERSISTENT": True} if persistent else cfg


# tile configurations tried by --sweep (every one compiles without spills for sm_90: benchmarks/aot_linear.py)
CANDIDATES = {
    "coarse": [C(128, 256, 128, 8, 3), C(128, 256, 128, 8, 3, g=16), C(128, 256, 128, 8, 4), C(256, 128, 128, 8, 3),
               C(128, 128, 128, 4, 3), C(128, 128, 128, 4, 2),       # these two: 2 CTAs per SM fit
               C(128, 256, 128, 8, 3, persistent=True), C(128, 256, 128, 8, 3, g=16, persistent=True),
               C(128, 256, 128, 8, 4, persistent=True), C(256, 128, 128, 8, 3, persistent=True)],
    "per_k": [C(128, 128, 128, 8, 3), C(128, 128, 128, 8, 4), C(64, 256, 128, 8, 3), C(64, 128, 128, 4, 3)],
}
# epilogue variants compared on the best tile of each GEMM with a GELU epilogue
EPILOGUE_VARIANTS = {"exp GELU": dict(FAST_GELU=False)}


def rel(out, ref) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item()


def deq(pair):
    q, s = pair
    s = s.float()
    return q.float() * (s.repeat_interleave(128, -1)[..., : q.shape[-1]] if s.dim() == q.dim() else s[..., None])


GRAPHS = False   # --graphs: time replays of a CUDA graph of each pipeline (no Python between kernels)


def bench(fn, smoke=False) -> float:
    """Median ms over at least ~30 calls (or 150 ms of calls), after warm-up; CUDA events."""
    if smoke:
        fn()
        return float("nan")
    import triton.testing

    fn()
    if GRAPHS:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        fn = graph.replay
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = start.elapsed_time(end)
    return triton.testing.do_bench(fn, warmup=max(25, 5 * est), rep=max(150, 30 * est), return_mode="median")


# --------------------------------------------------------------------------------------------- weights

class Layer:
    """One linear's weights in every format the pipelines need."""

    def __init__(self, n, k, device, gen):
        self.w = (torch.randn(n, k, device=device, generator=gen) / k ** 0.5).to(torch.bfloat16)
        self.b = (0.1 * torch.randn(n, device=device, generator=gen)).to(torch.bfloat16)
        self.td = quantize_tiles_ref(self.w)                 # int8, 128x128 tile scales
        self.pc = quantize_rows_ref(self.w, "int8")          # int8, per output channel
        self.f8 = quantize_rows_ref(self.w, "fp8")           # e4m3, per output channel
        self.f8t = self.f8[0].t()                            # column-major view for torch._scaled_mm
        self.f8_bound = output_bound(*self.f8, self.b, "fp8")  # per-token FP8 output scales (ffn.0)
        self.colsum = column_sums(self.pc[0])                # for inputs on the GELU grid (ffn.2, int8)

    def weights(self, kind):
        return {"int8-td": self.td, "int8-pc": self.pc, "fp8": self.f8}[kind]


def make_block(dim, ffn, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    names = {"q": (dim, dim), "k": (dim, dim), "v": (dim, dim), "o": (dim, dim), "cq": (dim, dim),
             "ck": (dim, dim), "cv": (dim, dim), "co": (dim, dim), "f0": (ffn, dim), "f2": (dim, ffn)}
    layers = {n: Layer(*shape, device, g) for n, shape in names.items()}
    return layers, g


def make_inputs(dim, ffn, M, device, g):
    bf = torch.bfloat16
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    x = (r(1, M, dim) * 2 + 0.3).to(bf)                              # residual stream
    mod = {"shift": 0.1 * r(1, 1, dim), "scale": 0.1 * r(1, 1, dim)}
    n3 = {"weight": 1 + 0.1 * r(dim), "bias": 0.1 * r(dim)}
    return dict(x=x, mod=mod, n3=n3, attn=r(M, dim).to(bf), cross=r(M, dim).to(bf), ctx=r(TEXT, dim).to(bf),
                hid=F.gelu(r(M, ffn), approximate="tanh").to(bf))


# --------------------------------------------------------------------------------------------- pipelines

class Pipelines:
    def __init__(self, layers, inp, configs, smoke):
        self.L, self.inp, self.configs, self.smoke = layers, inp, configs, smoke
        x = inp["x"]
        self.h1 = layernorm_ref(x, eps=1e-6, **inp["mod"])[0]            # modulated norm1 output, [M, dim]
        self.h3 = layernorm_ref(x, eps=1e-6, **inp["n3"])[0]
        self.h2 = self.h1

    def cfg(self, variant, M, N, K):
        return self.configs.get((variant, M, N, K))

    # ---- bf16
    def bf16(self, gelu=False, norms=False):
        L, i = self.L, self.inp
        if norms:
            h1 = layernorm_triton(i["x"], eps=1e-6, **i["mod"])[0]
            h3 = layernorm_triton(i["x"], eps=1e-6, **i["n3"])[0]
            h2 = layernorm_triton(i["x"], eps=1e-6, **i["mod"])[0]
        else:
            h1, h3, h2 = self.h1, self.h3, self.h2
        lin = lambda n, a: F.linear(a, L[n].w, L[n].b)  # noqa: E731
        outs = [lin("q", h1), lin("k", h1), lin("v", h1), lin("o", i["attn"]), lin("cq", h3),
                lin("ck", i["ctx"]), lin("cv", i["ctx"]), lin("co", i["cross"])]
        f0 = lin("f0", h2)
        hid = F.gelu(f0, approximate="tanh") if gelu else i["hid"]
        return outs, f0, lin("f2", hid)

    # ---- ours (int8-td, int8-pc, fp8)
    def ours(self, kind, norms=False):
        L, i = self.L, self.inp
        fmt = "fp8" if kind == "fp8" else "int8"
        q = lambda a: quantize_rows(a, fmt)  # noqa: E731
        if norms:
            h1 = layernorm_triton(i["x"], eps=1e-6, out=fmt, **i["mod"])
            h3 = layernorm_triton(i["x"], eps=1e-6, out=fmt, **i["n3"])
            h2 = layernorm_triton(i["x"], eps=1e-6, out=fmt, **i["mod"])
            h1, h3, h2 = [(a.view(-1, a.shape[-1]), s.view(-1)) for a, s in (h1, h3, h2)]
        else:
            h1, h3, h2 = q(self.h1), q(self.h3), q(self.h2)
        a_o, a_co, a_ctx = q(i["attn"]), q(i["cross"]), q(i["ctx"])

        def lin(n, a, **kw):
            w, ws = L[n].weights(kind)
            M, N, K = a[0].shape[0], w.shape[0], w.shape[1]
            per_k = ws.dim() == 2 or a[1].dim() == 2
            return gemm8(a[0], a[1], w, ws, L[n].b, config=self.cfg((kind, per_k, bool(kw)), M, N, K), **kw)

        outs = [lin("q", h1), lin("k", h1), lin("v", h1), lin("o", a_o), lin("cq", h3),
                lin("ck", a_ctx), lin("cv", a_ctx), lin("co", a_co)]
        bound = {"out_bound": L["f0"].f8_bound} if kind == "fp8" else {}
        if kind != "int8-pc":
            hid = lin("f0", h2, gelu=True, out=fmt, **bound)
            return outs, hid, lin("f2", hid)
        # as feed_forward does: the GELU grid, then one scale per token (ffn.2 keeps one integer accumulator)
        hid = int8_to_row_scales(*lin("f0", h2, gelu=True, out=fmt, gelu_grid=True), gelu_grid=True)
        return outs, hid, lin("f2", hid, a_gelu_grid=True, b_colsum=L["f2"].colsum)

    # ---- torch._scaled_mm
    def cublas_fp8(self, norms=False):
        L, i = self.L, self.inp
        q = lambda a: quantize_rows(a, "fp8")  # noqa: E731
        if norms:
            h1 = layernorm_triton(i["x"], eps=1e-6, out="fp8", **i["mod"])
            h3 = layernorm_triton(i["x"], eps=1e-6, out="fp8", **i["n3"])
            h2 = layernorm_triton(i["x"], eps=1e-6, out="fp8", **i["mod"])
            h1, h3, h2 = [(a.view(-1, a.shape[-1]), s.view(-1)) for a, s in (h1, h3, h2)]
        else:
            h1, h3, h2 = q(self.h1), q(self.h3), q(self.h2)

        def lin(n, a):
            return torch._scaled_mm(a[0], L[n].f8t, scale_a=a[1][:, None], scale_b=L[n].f8[1][None, :],
                                    bias=L[n].b, out_dtype=torch.bfloat16)

        outs = [lin("q", h1), lin("k", h1), lin("v", h1), lin("o", q(i["attn"])), lin("cq", h3),
                lin("ck", q(i["ctx"])), lin("cv", q(i["ctx"])), lin("co", q(i["cross"]))]
        f0 = lin("f0", h2)
        return outs, f0, lin("f2", q(F.gelu(f0, approximate="tanh")))


class ModulePipeline:
    """The block's linears through the nn.Modules the DiT uses (default tile configurations): fused norms
    emitting the 8-bit input, Int8Linear / Fp8Linear, and feed_forward (GELU + quantisation in ffn.0)."""

    def __init__(self, pl: Pipelines, cls, channel_scales=False):
        from turbo_repl.models.linear import feed_forward

        self.pl, self.feed_forward = pl, feed_forward
        self.m = {}
        for n, lay in pl.L.items():
            lin = torch.nn.Linear(lay.w.shape[1], lay.w.shape[0], device=lay.w.device, dtype=lay.w.dtype)
            lin.requires_grad_(False).weight.copy_(lay.w)
            lin.bias.copy_(lay.b)
            self.m[n] = cls.from_linear(lin)
            if channel_scales:
                self.m[n].use_channel_scales()
        self.ffn = torch.nn.Sequential(self.m["f0"], torch.nn.GELU(approximate="tanh"), self.m["f2"])

    def __call__(self):
        m, i, fmt = self.m, self.pl.inp, self.m["q"].input_format
        h1 = layernorm_triton(i["x"], eps=1e-6, out=fmt, **i["mod"])
        h3 = layernorm_triton(i["x"], eps=1e-6, out=fmt, **i["n3"])
        h2 = layernorm_triton(i["x"], eps=1e-6, out=fmt, **i["mod"])
        return [m["q"](h1), m["k"](h1), m["v"](h1), m["o"](i["attn"]), m["cq"](h3), m["ck"](i["ctx"]),
                m["cv"](i["ctx"]), m["co"](i["cross"]), self.feed_forward(self.ffn, h2)]


def errors(pl: Pipelines, name: str, rows: int) -> dict:
    """rel-L2 vs float32 of q (dim->dim), ffn.0 + GELU and ffn.2, on the first `rows` tokens."""
    L = pl.L
    sub = Pipelines(L, {**pl.inp, "x": pl.inp["x"][:, :rows], "attn": pl.inp["attn"][:rows],
                        "cross": pl.inp["cross"][:rows], "hid": pl.inp["hid"][:rows]}, {}, pl.smoke)
    ref = lambda n, a: F.linear(a.float(), L[n].w.float(), L[n].b.float())  # noqa: E731
    q_ref = ref("q", sub.h1)
    f0_ref = F.gelu(ref("f0", sub.h2), approximate="tanh")
    f2_ref = ref("f2", sub.inp["hid"])
    if name.startswith("bf16"):
        outs, f0, _ = sub.bf16()
        f0 = F.gelu(f0, approximate="tanh")
        f2 = F.linear(sub.inp["hid"], L["f2"].w, L["f2"].b)
    elif name == "fp8-cublas":
        outs, f0, _ = sub.cublas_fp8()
        f0 = F.gelu(f0, approximate="tanh")
        hq, hs = quantize_rows(sub.inp["hid"], "fp8")
        f2 = torch._scaled_mm(hq, L["f2"].f8t, scale_a=hs[:, None], scale_b=L["f2"].f8[1][None, :],
                              bias=L["f2"].b, out_dtype=torch.bfloat16)
    else:
        outs, hid, _ = sub.ours(name)
        fmt = "fp8" if name == "fp8" else "int8"
        w, ws = L["f2"].weights(name)
        if name == "int8-pc":   # as the pipeline does: the GELU grid, one scale per token
            f0 = gelu_grid_values(*hid)
            hq = int8_to_row_scales(*quantize_gelu_grid_ref(sub.inp["hid"].float()), gelu_grid=True)
            f2 = gemm8(hq[0], hq[1], w, ws, L["f2"].b, a_gelu_grid=True, b_colsum=L["f2"].colsum)
        else:
            f0 = deq(hid)
            hq = quantize_rows(sub.inp["hid"], fmt, group=None if fmt == "fp8" else 128)
            f2 = gemm8(hq[0], hq[1], w, ws, L["f2"].b)
    return {"q": rel(outs[0], q_ref), "ffn0+gelu": rel(f0, f0_ref), "ffn2": rel(f2, f2_ref)}


# --------------------------------------------------------------------------------------------- checks

def check_kernels(device, log):
    """Each kernel against its torch reference on fresh random inputs (ragged M and N)."""
    g = torch.Generator(device=device).manual_seed(1)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    res = {}
    x = (r(300, 384) * 2).to(torch.bfloat16)
    for fmt in ("int8", "fp8"):
        for group in (None, 128):
            q, s = quantize_rows(x, fmt, group)
            qr, sr = quantize_rows_ref(x, fmt, group)
            res[f"quant {fmt} group={group} equal"] = (q.float() == qr.float()).float().mean().item()
            res[f"quant {fmt} group={group} scale err"] = ((s - sr).abs() / sr).max().item()
    q, s = quantize_rows(x, "int8", 128)
    (q1, s1), (q2, s2) = int8_to_row_scales(q, s), int8_to_row_scales_ref(q, s)
    res["int8 groups -> row scales equal"] = float(torch.equal(q1, q2) and torch.equal(s1, s2))
    w = (r(200, 384) / 20).to(torch.bfloat16)
    b = r(200).to(torch.bfloat16)
    wtd, wpc, wf8 = quantize_tiles_ref(w), quantize_rows_ref(w, "int8"), quantize_rows_ref(w, "fp8")
    for fmt, wts in (("int8", {"td": wtd, "pc": wpc}), ("fp8", {"pc": wf8})):
        for wname, (wq, ws) in wts.items():
            for group in (None, 128):
                xq, xs = quantize_rows_ref(x, fmt, group)
                for gelu, out in ((False, None), (True, fmt)):
                    y = gemm8(xq, xs, wq, ws, b, gelu=gelu, out=out)
                    yr = gemm8_ref(xq, xs, wq, ws, b, gelu=gelu, out=out)
                    key = f"gemm {fmt} w={wname} a_group={group} gelu={gelu} out={out} rel"
                    res[key] = rel(deq(y), deq(yr)) if out else rel(y, yr)
    xs3 = (r(2, 150, 1536) * 2 + 0.5).to(torch.bfloat16)
    mod = dict(shift=0.1 * r(2, 1, 1536), scale=0.1 * r(2, 1, 1536))
    res["layernorm+mod rel"] = rel(layernorm_triton(xs3, **mod), layernorm_ref(xs3, **mod))
    for fmt in ("int8", "fp8"):
        q, s = layernorm_triton(xs3, out=fmt, **mod)
        q2, s2 = quantize_rows(layernorm_triton(xs3, **mod), fmt)
        res[f"layernorm->{fmt} equals separate"] = float((q.float() == q2.float()).all() and (s == s2).all())
    cos, sin = r(150, 64).cos(), r(150, 64).sin()
    wn = 1 + 0.1 * r(1536)
    res["rmsnorm+rope rel"] = rel(rmsnorm_rope_triton(xs3, wn, cos, sin, 12), rmsnorm_rope_ref(xs3, wn, cos, sin, 12))
    bd = output_bound(*wf8, b, "fp8")
    xq, xs = quantize_rows_ref(x, "fp8")
    y = gemm8(xq, xs, *wf8, b, gelu=True, out="fp8", out_bound=bd)
    yr = gemm8_ref(xq, xs, *wf8, b, gelu=True, out="fp8", out_bound=bd)
    res["gemm fp8 gelu out=fp8 bounded rel"] = rel(deq(y), deq(yr))
    res.update(check_pipelined_int8(device))
    res.update(check_modules(device))
    for k, v in res.items():
        log(f"  {k:55s} {v:.3g}")
    return res


def check_pipelined_int8(device):
    """The int8 GEMM with its products kept in flight (kernels/int_mma.py) at real shapes with ragged M: equal
    bit for bit to the plain launch (integer sums are exact) and to the float64 reference; the persistent form
    (int8 and FP8) equal bit for bit to one tile per program."""
    if device == "cpu":   # the edit applies to sm_90 GPUs only
        return {}
    g = torch.Generator(device=device).manual_seed(5)
    res = {}
    for M, N, K in ((4099, 1536, 1536), (4099, 8960, 1536), (4099, 1536, 8960), (517, 5120, 5120)):
        x = torch.randn(M, K, device=device, generator=g).to(torch.bfloat16)
        w = (torch.randn(N, K, device=device, generator=g) / K ** 0.5).to(torch.bfloat16)
        b = (0.1 * torch.randn(N, device=device, generator=g)).to(torch.bfloat16)
        (xq, xs), (wq, ws) = quantize_rows(x, "int8"), quantize_rows_ref(w, "int8")
        for kw in ({}, {"gelu": True, "out": "int8"}):
            y = gemm8(xq, xs, wq, ws, b, **kw)
            y_plain = with_switch("PIPELINE_INT8_MMA", False, lambda: gemm8(xq, xs, wq, ws, b, **kw))()
            y_ref = gemm8_ref(xq, xs, wq, ws, b, **kw)
            tag = f"gemm int8 pipelined {M}x{K}->{N}{' gelu->int8' if kw else ''}"
            res[f"{tag} == plain launch"] = float(all(torch.equal(p, q) for p, q in zip(
                y if kw else [y], y_plain if kw else [y_plain])))
            res[f"{tag} rel vs ref"] = rel(deq(y), deq(y_ref)) if kw else rel(y, y_ref)
            # FP8: the persistent form (where the default tiles choose it) against one tile per program
            (xf, xfs), (wf, wfs) = quantize_rows(x, "fp8"), quantize_rows_ref(w, "fp8")
            if kw:
                kw = dict(gelu=True, out="fp8", out_bound=output_bound(wf, wfs, b, "fp8"))
            y = gemm8(xf, xfs, wf, wfs, b, **kw)
            y_tiled = with_switch("PERSISTENT_GEMMS", False, lambda: gemm8(xf, xfs, wf, wfs, b, **kw))()
            res[f"gemm fp8 {M}x{K}->{N}{' gelu->fp8' if kw else ''} == one tile per program"] = float(all(
                torch.equal(p.view(torch.uint8), q.view(torch.uint8)) if p.dtype == torch.float8_e4m3fn
                else torch.equal(p, q) for p, q in zip(y if kw else [y], y_tiled if kw else [y_tiled])))
    return res


def check_modules(device):
    """The nn.Module layer on this device: 8-bit linears against float32, pre-quantised inputs, fused FFN."""
    from turbo_repl.models.linear import Fp8Linear, Int8Linear, feed_forward

    g = torch.Generator(device=device).manual_seed(3)
    res = {}
    x = (torch.randn(2, 300, 1536, device=device, generator=g) + 0.2).to(torch.bfloat16)
    mod = dict(shift=0.1 * torch.randn(2, 1, 1536, device=device, generator=g),
               scale=0.1 * torch.randn(2, 1, 1536, device=device, generator=g))
    lin0 = torch.nn.Linear(1536, 4096, device=device, dtype=torch.bfloat16).requires_grad_(False)
    lin2 = torch.nn.Linear(4096, 1536, device=device, dtype=torch.bfloat16).requires_grad_(False)
    ffn = torch.nn.Sequential(lin0, torch.nn.GELU(approximate="tanh"), lin2)
    h = layernorm_triton(x, **mod)
    ref = F.linear(h.float(), lin0.weight.float(), lin0.bias.float())
    ref_ffn = F.linear(F.gelu(ref, approximate="tanh"), lin2.weight.float(), lin2.bias.float())
    for cls, name in ((Int8Linear, "Int8Linear"), (Int8Linear, "Int8Linear per channel"), (Fp8Linear, "Fp8Linear")):
        a, c = cls.from_linear(lin0), cls.from_linear(lin2)
        if name.endswith("per channel"):
            a.use_channel_scales(), c.use_channel_scales()
        res[f"{name} input_format is {a.fmt}"] = float(a.input_format == a.fmt)
        res[f"{name} rel vs fp32"] = rel(a(h), ref)
        pair = layernorm_triton(x, out=a.fmt, **mod)
        sep = quantize_rows(h, a.fmt)
        res[f"{name} fused-norm 8-bit == separate quantisation"] = float(
            (pair[0].view(torch.uint8) == sep[0].view(torch.uint8)).float().mean())
        res[f"{name} fused-norm scales == separate"] = float((pair[1] == sep[1]).float().mean())
        res[f"{name} pair input vs tensor input, rel"] = rel(a(pair), a(h))
        res[f"{name} fused ffn rel vs fp32"] = rel(feed_forward(torch.nn.Sequential(a, ffn[1], c), h), ref_ffn)
        from turbo_repl.models.linear import residual_update

        res_x = torch.randn(2, 300, 4096, device=device, generator=g).to(torch.bfloat16)
        gate = torch.randn(2, 1, 4096, device=device, generator=g)
        res[f"{name} fused residual update rel vs plain"] = rel(residual_update(a, h, res_x, gate),
                                                               res_x.float() + a(h).float() * gate)
        a.mode = "reference"
        res[f"{name} reference mode rel vs fp32"] = rel(a(h), ref)
    return res


# --------------------------------------------------------------------------------------------- main

def sweep(layers, M, Mt, smoke, log, kinds=()):
    """Best tile configuration per (kind, per_k, fused epilogue) and GEMM shape."""
    best = {}
    g = torch.Generator(device=layers["q"].w.device).manual_seed(2)
    shapes = {}
    for n, lay in layers.items():
        rows = Mt if n in ("ck", "cv") else M
        shapes[(rows,) + tuple(lay.w.shape)] = lay
    for (rows, N, K), lay in shapes.items():
        x = torch.randn(rows, K, device=lay.w.device, generator=g).to(torch.bfloat16)
        for kind in ("int8-td", "int8-pc", "fp8"):
            fmt = "fp8" if kind == "fp8" else "int8"
            w, ws = lay.weights(kind)
            a_tok = quantize_rows(x, fmt)
            a_grp = quantize_rows(x, fmt, 128)
            epi = dict(gelu=True, out=fmt, **({"out_bound": lay.f8_bound} if kind == "fp8" else {}))
            cases = [(a_tok, {}), (a_grp, {})] if N < K else [(a_tok, {}), (a_tok, epi)]
            if kinds and kind not in kinds:
                continue
            for a, kw in cases:
                per_k = ws.dim() == 2 or a[1].dim() == 2
                key = (kind, per_k, bool(kw))
                if (key, rows, N, K) in best:
                    continue
                timings = []
                for cfg in CANDIDATES["per_k" if per_k else "coarse"]:
                    if kw and cfg["BLOCK_N"] % 128:
                        continue
                    try:
                        t = bench(lambda: gemm8(a[0], a[1], w, ws, lay.b, config=cfg, **kw), smoke)
                    except Exception as e:  # out of resources etc.: a finding
                        log(f"  config {cfg} failed: {str(e).splitlines()[0][:120]}")
                        continue
                    timings.append((t, cfg))
                if not timings:
                    continue
                t_def = bench(lambda: gemm8(a[0], a[1], w, ws, lay.b, **kw), smoke)
                t, cfg = min(timings, key=lambda p: p[0]) if not smoke else timings[0]
                if kw.get("gelu"):
                    for vname, vflags in EPILOGUE_VARIANTS.items():
                        tv = bench(lambda: gemm8(a[0], a[1], w, ws, lay.b, config={**cfg, **vflags}, **kw), smoke)
                        log(f"      epilogue variant '{vname}': {tv:.3f} ms (vs {t:.3f})")
                best[(key, rows, N, K)] = cfg
                tf = 2 * rows * N * K / (t * 1e-3) / 1e12 if t == t else float("nan")
                t_bf = bench(lambda: F.linear(x, lay.w, lay.b), smoke)
                t_mm = bench(lambda: torch._scaled_mm(a_tok[0], lay.f8t, scale_a=a_tok[1][:, None],
                                                      scale_b=lay.f8[1][None, :], bias=lay.b,
                                                      out_dtype=torch.bfloat16), smoke) if kind == "fp8" else 0
                log(f"  {rows:6d}x{K:5d}->{N:5d} {kind:8s} per_k={per_k!s:5} epi={bool(kw)!s:5} best {t:7.3f} ms "
                    f"({tf:6.0f} TOPS) default {t_def:7.3f}  bf16 {t_bf:7.3f}  scaled_mm {t_mm:7.3f}  cfg {cfg}  all "
                    f"{[round(tt, 3) for tt, _ in timings]}")
    return best


def with_switch(switch: str, value, fn):
    """`fn` run with one of turbo_kernels.gemm8's switches set (PIPELINE_INT8_MMA False: int8 GEMMs as Triton
    compiles them, one product at a time; PERSISTENT_GEMMS False: every GEMM one tile per program): the
    same-run baselines of those changes."""
    from turbo_kernels import gemm8 as gemm8_module

    def run():
        before = getattr(gemm8_module, switch)
        setattr(gemm8_module, switch, value)
        try:
            return fn()
        finally:
            setattr(gemm8_module, switch, before)
    return run


def run_model(name, device, configs, smoke, log, modules=False):
    dim, ffn, M = MODELS[name]
    layers, g = make_block(dim, ffn, device)
    inp = make_inputs(dim, ffn, M, device, g)
    pl = Pipelines(layers, inp, configs, smoke)
    flops = 2 * (6 * M * dim * dim + 2 * TEXT * dim * dim + 2 * M * dim * ffn)
    rows = {}
    runs = {
        "bf16": lambda: pl.bf16(), "bf16+gelu": lambda: pl.bf16(gelu=True),
        "bf16-norms": lambda: pl.bf16(gelu=True, norms=True),
        "int8-td": lambda: pl.ours("int8-td"), "int8-td fused": lambda: pl.ours("int8-td", norms=True),
        "int8-pc": lambda: pl.ours("int8-pc"), "int8-pc fused": lambda: pl.ours("int8-pc", norms=True),
        "int8-pc unpipelined": with_switch("PIPELINE_INT8_MMA", False, lambda: pl.ours("int8-pc")),
        "int8-pc fused, tile/program": with_switch("PERSISTENT_GEMMS", False, lambda: pl.ours("int8-pc", norms=True)),
        "fp8 fused, tile/program": with_switch("PERSISTENT_GEMMS", False, lambda: pl.ours("fp8", norms=True)),
        "fp8": lambda: pl.ours("fp8"), "fp8 fused": lambda: pl.ours("fp8", norms=True),
        "fp8-cublas": lambda: pl.cublas_fp8(), "fp8-cublas fused": lambda: pl.cublas_fp8(norms=True),
        "bf16+gelu again": lambda: pl.bf16(gelu=True),      # the baseline once more: the run's drift
    }
    if modules:
        from turbo_repl.models.linear import Fp8Linear, Int8Linear

        runs = {k: v for k, v in runs.items()
                if k.startswith("bf16") or k in ("int8-td fused", "int8-pc fused", "int8-pc unpipelined", "fp8 fused",
                                                 "int8-pc fused, tile/program", "fp8 fused, tile/program")}
        runs["Int8Linear modules"] = ModulePipeline(pl, Int8Linear)
        runs["Int8Linear modules, per channel"] = ModulePipeline(pl, Int8Linear, channel_scales=True)
        runs["Fp8Linear modules"] = ModulePipeline(pl, Fp8Linear)
        runs["bf16+gelu again"] = runs.pop("bf16+gelu again")
    for run, fn in runs.items():
        try:
            t = bench(fn, smoke)
        except Exception as e:
            log(f"  {run}: FAILED {str(e).splitlines()[0][:200]}")
            continue
        kind = {"Int8Linear modules": "int8-td", "Int8Linear modules, per channel": "int8-pc",
                "Fp8Linear modules": "fp8"}.get(run, run.split()[0])
        err = errors(pl, kind, 64 if smoke else 2048)
        rows[run] = {"ms": t, "tflops": flops / (t * 1e-3) / 1e12 if t == t else None, "err": err}
    # the int8 FFN's pass to one scale per token, alone, by how many 128-column groups a program step takes
    q = torch.randint(-128, 128, (M, ffn), dtype=torch.int8, device=device)
    s = torch.rand(M, ffn // 128, device=device) + 0.5
    for chunk in (1, 4, 8):
        t = bench(lambda: int8_to_row_scales(q, s, gelu_grid=True, chunk=chunk), smoke)
        log(f"  int8 hidden -> one scale per token, {chunk} group(s) per step: {t:.3f} ms "
            f"({2 * q.numel() / (t * 1e-3) / 1e12:.2f} TB/s)")
    del q, s
    base, base_g, base_n = rows["bf16"]["ms"], rows["bf16+gelu"]["ms"], rows.get("bf16-norms", {}).get("ms")
    log(f"\n{name}: dim {dim}, ffn {ffn}, M {M} (+{TEXT} text tokens); {flops / 1e12:.2f} TFLOP per block")
    log(f"  {'pipeline':32s} {'ms':>8s} {'TFLOPS':>7s} {'x bf16':>7s} {'x same-scope bf16':>18s}"
        "   rel-L2 q / ffn0+gelu / ffn2")
    for run, r in rows.items():
        scope = base_n if "fused" in run or "modules" in run or run == "bf16-norms" else (
            base if run == "bf16" else base_g)
        e = r["err"]
        log(f"  {run:32s} {r['ms']:8.3f} {r['tflops'] or 0:7.0f} {base / r['ms']:7.2f} {scope / r['ms']:18.2f}"
            f"   {e['q']:.2e} / {e['ffn0+gelu']:.2e} / {e['ffn2']:.2e}")
    del layers, inp, pl
    torch.cuda.empty_cache() if device == "cuda" else None
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--modules", action="store_true", help="time the nn.Module path (default configs) too")
    ap.add_argument("--sweep-kinds", default="", help="comma list of int8-td,int8-pc,fp8 (default: all)")
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1: tiny shapes, checks only")
    ap.add_argument("--graphs", action="store_true", help="time each pipeline as CUDA-graph replays")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    globals()["GRAPHS"] = args.graphs
    if args.smoke:
        MODELS.clear()
        MODELS.update({"smoke": (256, 384, 200)})
        args.models = "smoke"
        globals()["TEXT"] = 40
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    t0 = time.time()
    if device == "cuda":
        log(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
            f"triton {__import__('triton').__version__}")
    log("kernel checks (vs torch references):")
    try:
        if args.modules:  # the module checks only
            checks = {**check_pipelined_int8(device), **check_modules(device)}
            for k, v in checks.items():
                log(f"  {k:55s} {v:.3g}")
        else:
            checks = check_kernels(device, log)
    except Exception as e:  # keep going: the timings are still worth having
        log(f"  checks FAILED: {type(e).__name__}: {str(e)[:400]}")
        checks = {"error": str(e)}
    results = {"checks": checks, "models": {}, "sweep": {}}
    for name in args.models.split(","):
        configs = {}
        if args.sweep:
            dim, ffn, M = MODELS[name]
            log(f"\nsweep {name}:")
            layers, _ = make_block(dim, ffn, device)
            configs = sweep(layers, M, TEXT, args.smoke, log, [k for k in args.sweep_kinds.split(",") if k])
            results["sweep"][name] = {repr(k): v for k, v in configs.items()}
            del layers
        results["models"][name] = run_model(name, device, configs, args.smoke, log, args.modules)
        log(f"[{time.time() - t0:.0f} s]")
    from turbo_kernels import int_mma

    refused = sorted({str(v) for v in int_mma._compiled.values() if isinstance(v, int_mma.NotPipelinable)})
    log(f"int8 kernels the pipelining edit refused (these ran one product at a time): {len(refused)}")
    for why in refused:
        log(f"  {why[:300]}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "linear_bench.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(args.out, "linear_bench.log"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
