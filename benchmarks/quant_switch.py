"""Run-time quant switching on a real-size model (1.3B, random weights, CUDA graphs): fp8 -> int8 -> off -> fp8 ->
int8 with one seed. A quant seen before must give identical frames (graphs dropped and captured again, weights
quantised again or reloaded). GPU only:

    . benchmarks/gpu_env.sh && python3 benchmarks/quant_switch.py
"""

import time

import torch

from turbo_repl.engine import Request
from turbo_repl.engine.engine import Engine
from turbo_repl.settings import Settings

MODEL = "wan2.1-1.3b"


def main() -> int:
    engine = Engine(MODEL, device="cuda", weights="random")
    base = Settings.defaults(MODEL).with_values({"attention": "sagesla", "frames": 33})
    frames: dict[str, torch.Tensor] = {}
    failures = 0
    for step, quant in enumerate(("fp8", "int8", "off", "fp8", "int8")):
        start = time.perf_counter()
        video = engine.generate(Request("a red fox in the snow", base.with_value("quant", quant), seed=7))
        print(f"{step} quant={quant:4s} chosen={video.info['quant']:4s} {time.perf_counter() - start:6.2f} s "
              f"allocated {torch.cuda.memory_allocated() / 2**30:5.1f} GiB", flush=True)
        if quant in frames:
            same = torch.equal(frames[quant], video.frames)
            failures += not same
            print(f"   {quant} again: identical frames {same}", flush=True)
        frames[quant] = video.frames
    for a, b in (("fp8", "int8"), ("fp8", "off"), ("int8", "off")):
        print(f"   mean |{a} - {b}| = {(frames[a].float() - frames[b].float()).abs().mean().item():.2f} (of 255)")
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
