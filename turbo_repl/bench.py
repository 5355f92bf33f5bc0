"""`turbo-repl bench`: time a real architecture at a real shape with random weights, stage by stage.

Runs the product's own path (Engine.generate with the chosen settings) on a random-weight model, then splits one
DiT forward by component with the profiler, and measures in the same run the baseline: dense `original`
attention with bf16 linears, and the original Wan recipe (50 steps with classifier-free guidance = 100 forwards,
extrapolated from one measured forward and labelled so). Prints JSON lines, then a table.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = ("A red fox trots through fresh snow in a birch forest at dawn, its breath steaming in the cold air, "
          "soft golden light filtering through the trees, cinematic, shallow depth of field.")
ORIGINAL_RECIPE_FORWARDS = 100   # Wan's own sampler: 50 steps, each a conditional and an unconditional forward


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help="model to time (default: wan2.1-1.3b on a GPU, tiny on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a generation setting, e.g. --set resolution=720p --set attention=sla (repeatable)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--skip", action="append", default=[], choices=["load", "components", "baseline", "mp4"],
                        help="leave a measurement out (repeatable)")
    parser.add_argument("--text-encoder", choices=["gpu", "cpu"], default="gpu",
                        help="cpu: park the text encoder in host memory after the first prompt (as on small GPUs)")
    parser.add_argument("--memory-cap", type=float, metavar="GIB",
                        help="let this process use at most GIB of GPU memory (to show a model fits a smaller GPU)")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="run the DiT eagerly (no graph memory pools: for tight memory budgets)")
    parser.add_argument("--cold", action="store_true",
                        help="evict the checkpoint file from the OS page cache before timing its load")
    parser.add_argument("--top-kernels", type=int, default=0, metavar="N",
                        help="also list the N kernels that take the most device time in a DiT forward")
    parser.add_argument("--json", action="store_true", help="print only the JSON lines")


class Report:
    def __init__(self, context: dict, quiet: bool):
        self.context, self.quiet, self.rows = context, quiet, []

    def add(self, metric: str, value: float, unit: str = "ms", note: str = "") -> None:
        row = {"metric": metric, "value": round(value, 4), "unit": unit, **({"note": note} if note else {})}
        self.rows.append(row)
        print(json.dumps({**self.context, **row}), flush=True)

    def table(self) -> None:
        if self.quiet:
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"turbo-repl bench — {self.context['model']} on {self.context['device_name']}")
        for col in ("metric", "value", "unit", "note"):
            t.add_column(col, justify="right" if col == "value" else "left")
        for r in self.rows:
            t.add_row(r["metric"], f"{r['value']:.4g}", r["unit"], r.get("note", ""))
        Console(stderr=True).print(t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


# Kernel names -> component. Our SLA kernels are _stats/_key_stats/_select/_linear/_attention_kernel; GEMMs come
# from cuBLAS/CUTLASS (nvjet, xmma, gemm) or our _gemm8_kernel; on the CPU these are aten op names.
_COMPONENTS = (
    ("attention", ("attention", "attn", "sla", "flash", "fmha", "sdpa", "softmax", "_stats_kernel", "_select_kernel",
                   "_linear_kernel")),
    ("linears", ("gemm", "matmul", "mm", "cutlass", "xmma", "nvjet", "aten::linear")),
    ("norms + rope", ("norm", "rope", "rotary")),
)


def _classify(kernel_name: str) -> str:
    n = kernel_name.lower()
    for component, keys in _COMPONENTS:
        if any(k in n for k in keys):
            return component
    return "other (elementwise, copies, casts)"


def _component_split(forward, device, top: int = 0) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Device time of one DiT forward by component, from the profiler's kernel list (ms), and the `top` kernels
    by device time as (name, ms, calls)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        forward()
        _sync(device)
    split: dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        if device.type == "cuda":
            us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        else:
            if evt.key.startswith("aten::") is False:
                continue
            us = evt.self_cpu_time_total
        if us:
            key = _classify(evt.key)
            split[key] = split.get(key, 0.0) + us / 1000
            kernels.append((evt.key, us / 1000, evt.count))
    return split, sorted(kernels, key=lambda k: -k[1])[:top]


def run(args) -> int:
    from turbo_repl.engine.engine import pick_device
    from turbo_repl.models.registry import get_model
    from turbo_repl.settings import SettingError, Settings

    device = pick_device(args.device)
    model = args.model or ("wan2.1-1.3b" if device.type == "cuda" else "tiny")
    try:
        settings = Settings.defaults(model)
        for item in args.set:
            name, _, value = item.partition("=")
            settings = settings.with_value(name.strip(), value.strip())
    except (SettingError, KeyError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="turbo-repl-bench-") as tmp:
        if get_model(model).task == "i2v" and not settings.image:   # image-to-video needs a picture: any will do
            settings = settings.with_value("image", str(_test_image(Path(tmp), *settings.size)))
        return _bench(args, model, device, settings)


def _test_image(folder: Path, width: int, height: int) -> Path:
    """A smooth colour gradient of the run's size, as a PNG."""
    from PIL import Image

    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    rgb = (torch.stack([x, y, (x + y) / 2], dim=-1) * 255).round().to(torch.uint8).numpy()
    path = folder / "bench.png"
    Image.fromarray(rgb).save(path)
    return path


def _bench(args, model: str, device: torch.device, settings) -> int:
    from turbo_repl.engine import Request
    from turbo_repl.engine.engine import Engine

    started = time.perf_counter()
    engine = Engine(model, device=str(device), weights="random", cuda_graphs=not args.no_cuda_graphs)
    build_s = time.perf_counter() - started
    request = Request(PROMPT, settings, seed=0)
    job = engine.job(request)
    context = {"bench": "turbo-repl", "model": model, "device_name": engine.info.get("gpu") or "cpu",
               "resolution": f"{job.width}x{job.height}", "frames": job.frames, "steps": job.steps,
               "samples": job.samples, "attention": settings.attention, "quant": settings.quant,
               "cuda_graphs": engine.pipeline.cuda_graphs,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    report = Report(context, args.json)
    report.add("build random-weight model", build_s * 1000, note="not a load from files")

    # The product path, warm: the first call compiles kernels and fills the prompt cache.
    step_times: list[list[float]] = []

    def progress(stage, done, total):
        if stage == "denoise":
            _sync(device)
            step_times[-1].append(time.perf_counter())

    step_times.append([])
    engine.generate(request, progress=progress)
    if args.text_encoder == "cpu":   # the prompt is cached now: the encoder may leave the GPU
        engine.pipeline.text_encoder.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        if args.memory_cap:   # from here on: the timed runs must fit in the cap
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap * 2**30 / total), device)
            context["memory_cap_gib"] = args.memory_cap
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(max(1, args.repeat)):
        step_times.append([])
        runs.append(engine.generate(request, progress=progress))
    chosen = runs[-1].info
    context.update(attention=chosen["attention"], quant=chosen["quant"])

    if device.type == "cuda":
        report.add("peak GPU memory, whole run (models loaded)", torch.cuda.max_memory_allocated(device) / 2**30,
                   unit="GiB", note="text encoder in host memory" if args.text_encoder == "cpu" else "")
    if runs[-1].info.get("vae_tiled"):
        context["vae"] = "tiled (whole frames did not fit)"
    text_ms = 0.0 if args.text_encoder == "cpu" else _median_ms(
        lambda: engine.pipeline.text_encoder.encode([PROMPT]), device, args.repeat)
    if args.text_encoder == "gpu":
        report.add("text encoder (new prompt)", text_ms)
    for i in range(job.steps):
        per_run = [(ts[i + 1] - ts[i]) * 1000 for ts in step_times[1:] if len(ts) > i + 1]
        if per_run:
            report.add(f"DiT step {i + 1}", statistics.median(per_run))
    dit_ms = statistics.median(r.timings["denoise"] * 1000 for r in runs)
    report.add(f"DiT, {job.steps} steps", dit_ms)
    report.add("VAE decode", statistics.median(r.timings["vae decode"] * 1000 for r in runs))

    if "mp4" not in args.skip:
        from turbo_repl.video import Mp4Streams, write_mp4

        with tempfile.TemporaryDirectory() as tmp:
            frames = runs[-1].frames[0]
            mp4_ms = _median_ms(lambda: write_mp4(frames, Path(tmp) / "bench.mp4", settings.fps),
                                torch.device("cpu"), args.repeat)
            report.add("mp4 encode, on its own", mp4_ms)
            made = iter(range(1_000_000))

            def prompt_to_mp4():   # as a run of the REPL: the mp4s are encoded while the VAE decodes
                paths = [Path(tmp) / f"run-{next(made)}.mp4" for _ in range(job.samples)]
                streams = Mp4Streams(paths, settings.fps)
                video = engine.generate(request, frames_sink=streams)
                streams.finish(video.frames, [None] * job.samples)

            whole = _median_ms(prompt_to_mp4, device, args.repeat)
        report.add("whole run, prompt to mp4 (prompt cached)", whole, note="encoding overlaps the VAE decode")
        if args.text_encoder == "gpu":
            report.add("whole run, prompt to mp4 (new prompt)", whole + text_ms)

    grid = _latent_grid(job)
    x = torch.randn(job.samples, 16, *grid, device=device).to(engine.dtype)
    t = torch.full((job.samples, 1), 900.0, device=device).to(engine.dtype)
    ctx = engine.pipeline.embed(PROMPT).expand(job.samples, -1, -1)
    y = torch.randn(job.samples, 20, *grid, device=device).to(engine.dtype) if engine.spec.task == "i2v" else None

    def forward():
        with torch.no_grad():
            engine.pipeline.forward(0)(x, t, ctx, y)

    fwd_ms = _median_ms(forward, device, args.repeat)
    report.add("DiT forward", fwd_ms)
    if "components" not in args.skip:
        split, kernels = _component_split(forward, device, args.top_kernels)
        for component, ms in sorted(split.items()):
            report.add(f"DiT forward: {component}", ms, note="device time from the profiler")
        for name, ms, calls in kernels:
            report.add(f"kernel {name[:60]}", ms, note=f"{calls} calls, {_classify(name)}")

    if "baseline" not in args.skip:
        from turbo_repl.models.attention import configure_attention

        if engine.components.quant != "off":
            engine.components.requantize("off")
            engine.pipeline.forget_graphs()
        configure_attention(engine.components.experts[0], "original", settings.topk)
        base_ms = _median_ms(forward, device, args.repeat)
        report.add("baseline DiT forward (dense attention, unquantised linears)", base_ms)
        report.add(f"baseline DiT, {job.steps} steps", base_ms * job.steps)
        recipe = base_ms * ORIGINAL_RECIPE_FORWARDS
        report.add("original Wan recipe (50 steps x CFG)", recipe, note="extrapolated: 100 x one measured forward")
        report.add("DiT speed-up over the original recipe", recipe / dit_ms, unit="x")

    if "load" not in args.skip:
        for note, ms in _load_times(engine, device, args.cold):
            report.add("load of the DiT from a local file", ms, note=note)
    report.table()
    return 0


def _latent_grid(job) -> tuple[int, int, int]:
    return 1 + (job.frames - 1) // 4, job.height // 8, job.width // 8


def evict_from_page_cache(path: Path) -> None:
    """Write the file's pages back and ask the kernel to drop them, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _load_times(engine, device, cold: bool) -> list[tuple[str, float]]:
    """Save the (random) DiT as .safetensors, then time loading it the way a real checkpoint loads: from the page
    cache, and (cold) once more after evicting the file from it."""
    from safetensors.torch import save_file

    from turbo_repl.models.checkpoint import dit_from_checkpoint

    def timed_load(path: Path) -> float:
        _sync(device)
        start = time.perf_counter()
        loaded = dit_from_checkpoint(engine.spec.dit, path, device=device, dtype=engine.dtype)
        _sync(device)
        ms = (time.perf_counter() - start) * 1000
        del loaded
        return ms

    net = engine.components.experts[0]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TURBO_REPL_BENCH_TMP")) as tmp:
        path = Path(tmp) / "dit.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
        times = [("page cache warm", timed_load(path))]
        if cold:
            evict_from_page_cache(path)
            times.append(("file evicted from the page cache first", timed_load(path)))
    return times
