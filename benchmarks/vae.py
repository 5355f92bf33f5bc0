"""Wan2.1 VAE decode on one GPU: this implementation against an earlier one (same run, same weights, same latent).

    git show 2c9b257:turbo_repl/models/vae.py > .bench/vae_before.py     # the unoptimised decode path
    python3 benchmarks/vae.py --before .bench/vae_before.py [--sizes 480p,720p] [--runs 5] [--profile] [--out DIR]
                              [--variants 0,1,2,3] [--other-variants 0,2] [--check-frames 21] [--skip-checks]

Real architecture (dim 96), random weights (`deterministic_init`), a N(0, 1) latent of 21 frames (81 video frames).
Checks first, on a 480p latent (--check-frames): the Triton kernels against their torch references; this decode
in float32 against the earlier one in float32 (TF32 off); both in bf16 against that float32 result (rel-L2 and max
error over max |ref|), and against each other. Then times `decode` (bf16, synchronised wall clock, median of --runs
after one warm-up run, which includes cuDNN's algorithm search: reported as `first`) for: the earlier path as it
was (0), the earlier path with cuDNN autotuning (1), this path (2), this path with the plain-torch norm and bias
add in place of the Triton kernels (3), and this path with cuDNN's heuristic algorithm choice (4: cuDNN keeps the
plans it chose per shape either way, so time 4 in a process of its own, --skip-checks). --variants picks them for
the first size, --other-variants for the others. --profile adds the top CUDA kernels of one decode of 0 and 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import turbo_kernels  # noqa: F401
except ImportError:   # a bare checkout (the GPU machine): expose kernels/ as turbo_kernels
    shim = Path(tempfile.mkdtemp())
    (shim / "turbo_kernels").symlink_to(ROOT / "kernels")
    sys.path[:0] = [str(shim), str(ROOT)]

from turbo_kernels import vae_ops  # noqa: E402
from turbo_repl.models import vae as vae_mod  # noqa: E402
from turbo_repl.models.tiny import deterministic_init, seed_for  # noqa: E402

SIZES = {"480p": (60, 104), "720p": (90, 160), "tiny": (4, 6)}   # latent h, w (480x832, 720x1280)
LATENT_FRAMES = 21
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: a dry run of the script (--sizes tiny)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def load_before(path: str):
    spec = importlib.util.spec_from_file_location("vae_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def errors(out, ref):
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return {"rel_l2": float("nan"), "rel_max": float("nan")}
    return {"rel_l2": ((out - ref).norm() / ref.norm()).item(),
            "rel_max": ((out - ref).abs().max() / ref.abs().max()).item()}


def check_kernel():
    """The Triton kernel against the torch reference, fresh random inputs, into a slice of a larger buffer."""
    rows = []
    g = torch.Generator(DEVICE).manual_seed(7)
    for c, dtype in [(96, torch.bfloat16), (192, torch.bfloat16), (384, torch.float32), (16, torch.float32)]:
        x = (torch.randn(2, c, 3, 24, 40, generator=g, device=DEVICE) * 3 + 1).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        gamma = 1 + 0.1 * torch.randn(c, 1, 1, 1, generator=g, device=DEVICE)
        bias = torch.randn(c, generator=g, device=DEVICE).to(dtype)
        buf = torch.full((2, c, 5, 24, 40), float("nan"), dtype=dtype, device=DEVICE)
        buf = buf.contiguous(memory_format=torch.channels_last_3d)
        vae_ops.rms_norm_silu_triton(x, gamma, bias, out=buf[:, :, 2:])
        ref = vae_ops.rms_norm_silu_ref(x.double(), gamma.double(), bias.double())
        e = errors(buf[:, :, 2:], ref)
        ok = torch.isnan(buf[:, :, :2]).all().item() and e["rel_l2"] < (1e-2 if dtype == torch.bfloat16 else 1e-6)
        rows.append({"op": "rms_norm_silu", "C": c, "dtype": str(dtype), **e, "ok": ok})
        h, res = x.clone(), torch.randn_like(x)
        ref = vae_ops.add_bias_ref(h.double(), bias, res.double())
        e = errors(vae_ops.add_bias_triton(h, bias, res), ref)
        rows.append({"op": "add_bias", "C": c, "dtype": str(dtype), **e,
                     "ok": e["rel_l2"] < (1e-2 if dtype == torch.bfloat16 else 1e-6)})
    return rows


def timed(decode, z, runs):
    sync()
    t = time.perf_counter()
    decode(z)                                    # warm-up: compilation, cuDNN algorithm search
    sync()
    first = time.perf_counter() - t
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        sync()
        t = time.perf_counter()
        decode(z)
        sync()
        times.append(time.perf_counter() - t)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE == "cuda" else 0.0}


def profile(decode, z, top=15):
    from torch.profiler import ProfilerActivity, profile as prof
    decode(z)
    sync()
    with prof(activities=[ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU]) as p:
        decode(z)
        sync()
    kernels = [(e.key, (e.device_time_total if DEVICE == "cuda" else e.self_cpu_time_total) / 1e3, e.count)
               for e in p.key_averages()]
    kernels = [k for k in kernels if k[1] > 0]
    kernels.sort(key=lambda k: -k[1])
    return {"total_ms": sum(k[1] for k in kernels), "top": kernels[:top]}


class TorchElementwise:
    """This path with the plain-torch references in place of the Triton kernels."""

    def __enter__(self):
        self.saved = vae_mod.rms_norm_silu, vae_mod.add_bias
        vae_mod.rms_norm_silu, vae_mod.add_bias = vae_ops.rms_norm_silu_ref, vae_ops.add_bias_ref

    def __exit__(self, *exc):
        vae_mod.rms_norm_silu, vae_mod.add_bias = self.saved


class CudnnHeuristics:
    """This path with cuDNN's heuristic algorithm choice instead of timing them (cuDNN caches the plans it chose
    by shape whichever way: run this variant in a process of its own, before any other decode)."""

    def __enter__(self):
        vae_mod.CUDNN_AUTOTUNE = False

    def __exit__(self, *exc):
        vae_mod.CUDNN_AUTOTUNE = True


class CudnnAutotune:
    def __enter__(self):
        self.saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True

    def __exit__(self, *exc):
        torch.backends.cudnn.benchmark = self.saved


def run_checks(new, old, z, report) -> bool:
    """The kernels, then decode of latent z: float32 this vs earlier (TF32 off), bf16 both vs that float32."""
    report["checks"]["kernel"] = check_kernel()
    for r in report["checks"]["kernel"]:
        print(f"{r['op']:14s} C={r['C']:4d} {r['dtype']:15s} rel-L2 {r['rel_l2']:.2e}  max {r['rel_max']:.2e}  "
              f"{'ok' if r['ok'] else 'FAIL'}", flush=True)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    ref = old.float().decode(z)
    new32 = new.float().decode(z)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    checks = {"float32 this vs earlier": errors(new32, ref)}
    del new32
    old16 = old.bfloat16().decode(z)
    new16 = new.bfloat16().decode(z)
    checks["bf16 earlier vs float32"] = errors(old16, ref)
    checks["bf16 this vs float32"] = errors(new16, ref)
    checks["bf16 this vs bf16 earlier"] = errors(new16, old16)
    report["checks"]["decode"] = checks
    for name, e in checks.items():
        print(f"{name:28s} rel-L2 {e['rel_l2']:.2e}  max {e['rel_max']:.2e}", flush=True)
    ok = (checks["float32 this vs earlier"]["rel_max"] <= 1e-4
          and checks["bf16 this vs float32"]["rel_l2"] <= 1.1 * checks["bf16 earlier vs float32"]["rel_l2"]
          and all(r["ok"] for r in report["checks"]["kernel"]))
    report["checks"]["ok"] = ok
    print("checks", "ok" if ok else "FAILED", flush=True)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="path of the earlier vae.py")
    ap.add_argument("--sizes", default="480p,720p")
    ap.add_argument("--check-size", default="480p", help="latent size of the correctness checks")
    ap.add_argument("--check-frames", type=int, default=LATENT_FRAMES, help="latent frames of the checks")
    ap.add_argument("--frames", type=int, default=LATENT_FRAMES, help="latent frames")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--variants", default="0,1,2,3", help="for the first size, indices into: earlier, "
                    "earlier + cudnn autotune, this, this with torch elementwise, this with cuDNN heuristics")
    ap.add_argument("--other-variants", default="0,2", help="the same for the other sizes")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None, help="folder for vae.json and the profiles")
    args = ap.parse_args()
    before_mod = load_before(args.before)
    out_dir = Path(args.out) if args.out else None
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
              "checks": {}, "timings": []}

    with torch.device(DEVICE):
        new = deterministic_init(vae_mod.WanVAE(), seed_for("bench/vae")).eval()
        old = before_mod.WanVAE().eval()
    old.load_state_dict(new.state_dict())
    gen = torch.Generator(DEVICE).manual_seed(0)
    ok = True
    if not args.skip_checks:
        ok = run_checks(new, old, torch.randn(1, 16, args.check_frames, *SIZES[args.check_size], generator=gen,
                                               device=DEVICE), report)
        report["checks"]["latent"] = f"{args.check_size}, {args.check_frames} frames"
    new.bfloat16(), old.bfloat16()

    # ---- timings
    variants = [("earlier", old.decode, None), ("earlier + cudnn autotune", old.decode, CudnnAutotune),
                ("this", new.decode, None), ("this, torch elementwise", new.decode, TorchElementwise),
                ("this, cuDNN heuristics", new.decode, CudnnHeuristics)]
    for k, size in enumerate(args.sizes.split(",")):
        z = torch.randn(1, 16, args.frames, *SIZES[size], generator=gen, device=DEVICE, dtype=torch.bfloat16)
        for i in (args.other_variants if k else args.variants).split(","):
            name, decode, ctx = variants[int(i)]
            with ctx() if ctx else contextlib.nullcontext():
                t = timed(decode, z, args.runs)
                if args.profile and size == args.sizes.split(",")[0] and name in ("earlier", "this"):
                    t["profile"] = profile(decode, z)
            report["timings"].append({"size": size, "variant": name, **t})
            print(f"{size} {name:26s} {t['median_s'] * 1e3:8.1f} ms  (min {t['min_s'] * 1e3:.1f}, "
                  f"max {t['max_s'] * 1e3:.1f}, first {t['first_s'] * 1e3:.0f})  peak {t['peak_gib']:.2f} GiB",
                  flush=True)

    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "vae.json").write_text(json.dumps(report, indent=1))
    for row in report["timings"]:
        if "profile" in row:
            p = row["profile"]
            print(f"\n--- {row['variant']}: CUDA kernels {p['total_ms']:.0f} ms")
            for key, ms, n in p["top"]:
                print(f"{ms:8.1f} ms {n:6d}x  {key[:110]}")
    print(f"\n{report['device']}, torch {report['torch']}; bf16 decode of {args.frames} latent frames, "
          f"median of {args.runs}")
    base = {r["size"]: r["median_s"] for r in report["timings"] if r["variant"] == "earlier"}
    for r in report["timings"]:
        speedup = f"x{base[r['size']] / r['median_s']:.2f}" if r["size"] in base else ""
        print(f"{r['size']:5s} {r['variant']:26s} {r['median_s'] * 1e3:8.1f} ms {speedup:6s} first "
              f"{r['first_s'] * 1e3:6.0f} ms  peak {r['peak_gib']:.2f} GiB")
    print("checks", ("ok" if ok else "FAILED") if not args.skip_checks else "skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
