"""Same-process A/B of the residual updates fused into the 8-bit GEMMs (`linear.FUSE_RESIDUAL`) on the 1.3B DiT:
median of 5 graph replays, fused / unfused / fused / unfused, for fp8 and int8. GPU only:

    . benchmarks/gpu_env.sh && python3 benchmarks/fuse_residual_ab.py
"""

import statistics
import time

import torch

from turbo_repl.engine import Request
from turbo_repl.engine.engine import Engine
from turbo_repl.models import linear
from turbo_repl.settings import Settings

MODEL = "wan2.1-1.3b"


def forward_ms(engine, args, replays=5) -> float:
    engine.pipeline.forget_graphs()          # capture again with the current switch
    forward = engine.pipeline.forward(0)
    with torch.no_grad():
        for _ in range(2):
            forward(*args)
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start = time.perf_counter()
            forward(*args)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    for quant in ("fp8", "int8"):
        engine = Engine(MODEL, device="cuda", weights="random")
        settings = Settings.defaults(MODEL).with_values({"quant": quant, "attention": "sagesla"})
        request = Request("a fox", settings, seed=0)
        engine.generate(request)                 # quantises, compiles, fills the prompt cache
        job = engine.job(request)
        grid = (1 + (job.frames - 1) // 4, job.height // 8, job.width // 8)
        x = torch.randn(1, 16, *grid, device="cuda").bfloat16()
        t = torch.full((1, 1), 900.0, device="cuda").bfloat16()
        args = (x, t, engine.pipeline.embed("a fox"), None)
        results = {True: [], False: []}
        for fuse in (True, False, True, False):
            linear.FUSE_RESIDUAL = fuse
            results[fuse].append(round(forward_ms(engine, args), 1))
        linear.FUSE_RESIDUAL = True
        print(f"{MODEL} {quant}: fused {results[True]} ms, unfused {results[False]} ms", flush=True)
        del engine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
