"""Which attention and linear backends a run uses, and why — `auto` resolved against this device."""

from __future__ import annotations

import platform

import torch

from turbo_repl import __version__


def _kernel_backends(device: torch.device) -> dict[str, str]:
    """attention backend -> "ok" or the reason it cannot run here (from the kernels package)."""
    try:
        from turbo_kernels.sla import available_backends
    except ImportError as e:  # kernels package incomplete: only the dense path is known to work
        return {"sagesla": f"kernels unavailable ({e})", "sla": f"kernels unavailable ({e})"}
    return available_backends(device)


def choose_attention(setting: str, device: torch.device, sparse_checkpoint: bool) -> tuple[str, str]:
    """Resolve the `attention` setting. Returns (mode, reason)."""
    if setting != "auto":
        if setting != "original" and not sparse_checkpoint:
            raise ValueError(f"attention {setting} needs an SLA checkpoint (with proj_l); this one is dense: "
                             "use `:set attention original`")
        return setting, "set by the user"
    if not sparse_checkpoint:
        return "original", "the checkpoint has no SLA weights (proj_l), so it runs dense attention"
    if device.type != "cuda":
        return "sla", "no GPU: SLA through its plain-torch reference"
    backends = _kernel_backends(device)
    for mode in ("sagesla", "sla"):
        if backends.get(mode) == "ok":
            return mode, f"fastest that works here ({mode})"
    return "sla", "; ".join(f"{m}: {why}" for m, why in backends.items())


def choose_quant(setting: str, loaded: str, device: torch.device) -> str:
    """Resolve the `quant` setting against what the checkpoint holds (`loaded`: off | int8 | fp8)."""
    if setting == "auto":
        return loaded
    if setting == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError("fp8 needs a GPU with FP8 (compute capability 8.9 or newer); use `:set quant int8`")
    return setting


def cpu_name() -> str:
    """The processor's model name: float32 results on the CPU can differ between processor families."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"versions": {"turbo_repl": __version__, "torch": torch.__version__, "triton": triton_version,
                         "python": platform.python_version()},
            "gpu": gpu, "cpu": cpu_name()}
