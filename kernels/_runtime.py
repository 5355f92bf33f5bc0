"""Which implementation an attention call runs (plain torch or Triton), and what works on a device."""

from __future__ import annotations

import functools
import os

import torch

IMPLS = ("auto", "torch", "triton")


def interpreting() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e})"
    return None


def triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, or None when they can."""
    device = torch.device(device)
    if (err := _triton_import_error()) is not None:
        return err
    if device.type == "cpu":
        return None if interpreting() else "no GPU (the kernels run on CPU only under TRITON_INTERPRET=1)"
    if device.type != "cuda":
        return f"no Triton kernels for {device.type} devices"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return f"GPU is sm{major}{minor}; the kernels need sm80 or newer (bf16 tensor cores)"
    return None


def has_fp8(device: torch.device) -> bool:
    """FP8 (e4m3) tensor-core products: sm89 (Ada) and sm90+ GPUs. CPU: emulated (interpreter and reference)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """'auto' -> 'triton' on CUDA tensors where the kernels run, else 'torch'. Bad choices raise ValueError."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, not {impl!r}")
    if impl == "auto":
        return "triton" if x.is_cuda and triton_unavailable(x.device) is None else "torch"
    if impl == "triton" and (why := triton_unavailable(x.device)) is not None:
        raise ValueError(f"impl='triton' cannot run here: {why}; use impl='torch'")
    return impl


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4   # interpreter: few programs keep it fast


def available_backends(device: torch.device | str | None = None) -> dict[str, str]:
    """{'sla': ..., 'sagesla': ...}: "ok" where the fast kernel runs on `device`, otherwise why it does not
    (the call then still works, through the plain-torch reference or the slower form that is named)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        why = "no GPU: plain-torch reference (slow at video sizes)"
        return {"sla": why, "sagesla": why + "; int8/fp8 rounding emulated"}
    if (why := triton_unavailable(device)) is not None:
        return {"sla": f"{why}: plain-torch reference", "sagesla": f"{why}: plain-torch reference"}
    if not has_fp8(device):
        major, minor = torch.cuda.get_device_capability(device)
        return {"sla": "ok", "sagesla": f"no FP8 on sm{major}{minor}: sagesla runs int8 QK + bf16 PV"}
    return {"sla": "ok", "sagesla": "ok"}
