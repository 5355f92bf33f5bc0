"""Sparse-linear attention on one GPU: our SLA and SageSLA (whole call) against dense SDPA, at Wan sizes.

    python3 benchmarks/attention.py [--shapes 1.3b-480p,14b-720p] [--topk 0.1,0.15] [--blocks 128x64,128x128]
                                    [--breakdown] [--sweep] [--json PATH]

Per shape: dense SDPA (cuDNN and flash backends, q/k/v already [B, H, L, D]); then per topk and block size our
`sparse_linear_attention` (block map, quantisation, sparse part, linear branch, proj_l, [B, L, H, D] in and out),
timed with triton.testing.do_bench (median). TFLOPS are dense-equivalent, 4·B·H·L²·D / time. rel-L2 is against
the float32 reference of the same function (`sla_ref`, computed on the GPU with the block map our kernel chose).
Inputs: iid N(0, 1) q, k, v in bf16 (the worst case for FP8 P·V, see kernels/sagesla.py), a random proj_l.
--breakdown times each stage alone; --sweep times the attention kernel under other (G, warps, stages).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import turbo_kernels  # noqa: F401
except ImportError:   # a bare checkout (the GPU machine): expose kernels/ as turbo_kernels
    shim = Path(tempfile.mkdtemp())
    (shim / "turbo_kernels").symlink_to(Path(__file__).resolve().parents[1] / "kernels")
    sys.path.insert(0, str(shim))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from turbo_kernels import sla  # noqa: E402
from turbo_kernels.block_map import block_lut_ref, key_block_count, select_blocks  # noqa: E402
from turbo_kernels.sagesla import quantize_operands  # noqa: E402

SHAPES = {"1.3b-480p": (1, 32760, 12, 128), "14b-720p": (1, 75600, 40, 128)}
DEVICE, DTYPE = "cuda", torch.bfloat16


def median_ms(fn, rep=300):
    return do_bench(fn, warmup=50, rep=rep, return_mode="median")


def rel_l2(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def dense(q, k, v, rep):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    rows = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)  # noqa: E731
                fn()
                rows[name] = median_ms(fn, rep)
        except Exception as e:   # noqa: BLE001
            rows[name] = f"{type(e).__name__}: {e}"[:120]
    del qh, kh, vh
    return rows


def kernel_info(compiled) -> dict:
    ptx = compiled.asm.get("ptx", "") if hasattr(compiled, "asm") else ""
    return {"regs": getattr(compiled, "n_regs", None), "spills": getattr(compiled, "n_spills", None),
            "wgmma": "wgmma.mma_async" in ptx, "e4m3": "e4m3" in ptx and "wgmma" in ptx,
            "s8": ".s8" in ptx and "wgmma" in ptx}


def run_shape(name, topks, blocks, args, results):
    B, L, H, D = SHAPES[name]
    flops = 4 * B * H * L * L * D
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(3))
    w = torch.randn(D, D, device=DEVICE, generator=g) / math.sqrt(D)
    b = 0.1 * torch.randn(D, device=DEVICE, generator=g)
    rep = 300 if L < 50000 else 600

    d = dense(q, k, v, rep=rep * 2)
    best = min((t for t in d.values() if isinstance(t, float)), default=float("nan"))
    for backend, t in d.items():
        row = {"shape": name, "what": f"dense SDPA {backend}", "ms": t}
        if isinstance(t, float):
            row["tflops"] = flops / t * 1e-9
        results.append(row)
        print(row, flush=True)

    for topk in topks:
        for bq, bk in blocks:
            n_kb = triton.cdiv(L, bk)
            count = key_block_count(topk, n_kb)
            ref = lut = None
            for quantized in (False, True):
                mode = "sagesla" if quantized else "sla"
                row = {"shape": name, "what": mode, "topk": topk, "blocks": f"{bq}x{bk}", "kept": f"{count}/{n_kb}"}
                try:
                    fn = lambda: sla.sparse_linear_attention(q, k, v, w, b, topk=topk, block_q=bq, block_k=bk,  # noqa: E731
                                                             quantized=quantized, impl="triton")
                    fn()
                    row["ms"] = median_ms(fn, rep)
                    row["tflops"] = flops / row["ms"] * 1e-9
                    row["x_dense"] = best / row["ms"]
                    out, lut32 = sla.sla_triton(q, k, v, w, b, count, bq, bk, quantized, True)
                    if ref is None:    # one float32 reference per (topk, blocks): both modes share the block map
                        lut = lut32[..., :count].view(B, H, -1, count).long()
                        t0 = time.time()
                        ref = sla.sla_ref(q, k, v, w, b, topk=topk, block_q=bq, block_k=bk, lut=lut)
                        row["ref_s"] = round(time.time() - t0, 1)
                        exact = block_lut_ref(q, k, topk, bq, bk)
                        row["lut_agree"] = (lut == exact).float().mean().item()
                    else:
                        row["same_lut"] = bool(torch.equal(lut32[..., :count].view(B, H, -1, count).long(), lut))
                    row["rel_l2"] = rel_l2(out, ref)
                    del out
                except Exception as e:   # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                results.append(row)
                print(row, flush=True)
            del ref
            torch.cuda.empty_cache()

    if args.breakdown or args.sweep:
        stages(name, q, k, v, w, b, topks[0], args, results, rep)


def stages(name, q, k, v, w, b, topk, args, results, rep):
    """Each stage alone (block sizes 128x64), and the attention kernel under other configurations."""
    B, L, H, D = q.shape
    bq, bk = 128, 64
    count = key_block_count(topk, triton.cdiv(L, bk))
    for quantized in (False, True):
        mode = "sagesla" if quantized else "sla"
        cfg = sla.default_config(quantized, bq, bk, D)
        cp = triton.cdiv(count, cfg["G"]) * cfg["G"]
        try:
            ops = sla.prepare(q, k, v, w, count, cp, bq, bk, quantized, True)
        except Exception as e:   # noqa: BLE001
            print({"shape": name, "what": f"{mode} prepare", "error": f"{type(e).__name__}: {e}"[:300]}, flush=True)
            continue
        timings = {}
        if args.breakdown:
            timings["prepare (1-3)"] = lambda: sla.prepare(q, k, v, w, count, cp, bq, bk, quantized, True)
            timings["statistics (q, k, v pass)"] = lambda: sla.statistics(q, k, v, bq, bk, True, quantized)
            st = sla.statistics(q, k, v, bq, bk, True, quantized)
            for pps, nw in ((2, 8), (8, 8), (4, 4), (8, 4)):
                timings[f"statistics, {pps} programs/SM, {nw} warps"] = \
                    lambda pps=pps, nw=nw: sla.statistics(q, k, v, bq, bk, True, quantized, pps, nw)
            timings["select (block map)"] = lambda: select_blocks(st["qsum"], st["ksum"], st["kmean"], L, count, cp, bq, bk)
            if quantized:
                timings["quantize q, k, v"] = lambda: quantize_operands(q, k, v, st["kmean"], st["vmean"], st["vscale"],
                                                                        bq, bk, True, False)
            timings["attention kernel"] = lambda: sla.attend(ops, q, b, bq, bk, cfg)
            timings["attention kernel, no linear branch"] = lambda: sla.attend(ops, q, b, bq, bk, cfg, linear=False)
        for label, fn in timings.items():
            row = {"shape": name, "what": f"{mode} stage: {label}", "topk": topk, "blocks": f"{bq}x{bk}"}
            try:
                fn()
                row["ms"] = median_ms(fn, rep)
            except Exception as e:   # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            results.append(row)
            print(row, flush=True)
        if args.breakdown:
            _, compiled = sla.attend(ops, q, b, bq, bk, cfg)
            row = {"shape": name, "what": f"{mode} kernel info {cfg}", **kernel_info(compiled)}
            results.append(row)
            print(row, flush=True)
        if args.sweep:
            sweep = [(1, 8, 2), (1, 8, 3), (2, 8, 2), (2, 8, 3)]
            for G, warps, stg in sweep:
                c = {"G": G, "num_warps": warps, "num_stages": stg}
                row = {"shape": name, "what": f"{mode} attention kernel {c}", "topk": topk}
                try:
                    cpg = triton.cdiv(count, G) * G
                    ops_g = sla.prepare(q, k, v, w, count, cpg, bq, bk, quantized, True)
                    _, compiled = sla.attend(ops_g, q, b, bq, bk, c)
                    row["ms"] = median_ms(lambda: sla.attend(ops_g, q, b, bq, bk, c), rep)
                    row.update(kernel_info(compiled))
                except Exception as e:   # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                results.append(row)
                print(row, flush=True)
        del ops


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--topk", default="0.1,0.15")
    p.add_argument("--blocks", default="128x64,128x128")
    p.add_argument("--breakdown", action="store_true")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = []
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for name in args.shapes.split(","):
        run_shape(name, [float(t) for t in args.topk.split(",")],
                  [tuple(int(x) for x in bl.split("x")) for bl in args.blocks.split(",")], args, results)
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "triton": triton.__version__, "rows": results}, indent=1))
    print("\n| shape | what | topk | blocks | kept | ms | TFLOPS (dense-equiv.) | × dense | rel-L2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "stage" in r["what"] or "kernel" in r["what"]:
            continue
        ms = f"{r['ms']:.3f}" if isinstance(r.get("ms"), float) else r.get("error", r.get("ms", ""))[:60]
        print(f"| {r['shape']} | {r['what']} | {r.get('topk', '')} | {r.get('blocks', '')} | {r.get('kept', '')} | {ms} "
              f"| {r.get('tflops', float('nan')):.0f} | {r.get('x_dense', float('nan')):.2f} "
              f"| {r.get('rel_l2', float('nan')):.2e} |")
    for r in results:
        if "stage" in r["what"] or "kernel" in r["what"]:
            print(r["shape"], r["what"], f"{r['ms']:.3f} ms" if isinstance(r.get("ms"), float) else "",
                  {k: r[k] for k in ("regs", "spills", "wgmma", "e4m3", "s8", "error") if k in r})


if __name__ == "__main__":
    main()
