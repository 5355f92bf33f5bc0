"""`turbo-repl doctor`: what this machine has, which checkpoints are here, and which backends work.

Every probe is defensive: a part that is missing or broken is reported as such, and the report still comes out
(on a machine without a GPU too). `--json` prints the same report for machines.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from turbo_repl import __version__
from turbo_repl.models.locate import MissingCheckpoint, locate, needed_files
from turbo_repl.models.registry import get_model, model_names

ATTENTION_BACKENDS = ("sagesla", "sla", "original")
LINEAR_BACKENDS = ("off", "int8", "fp8")


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--checkpoint-dir", type=Path, metavar="DIR",
                        help="also look for checkpoints in this flat folder (as `turbo-repl download` fills it)")


def run(args) -> int:
    report = collect(args.checkpoint_dir)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report, Console())
    return 0


def collect(checkpoint_dir: Path | None = None) -> dict:
    try:
        import torch
    except ImportError as e:   # nothing below can run without torch; say so rather than crash
        return {"versions": _versions(None), "error": f"torch cannot be imported: {e}"}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "versions": _versions(torch),
        "device": device.type,
        "gpu": _gpu(torch) if device.type == "cuda" else None,
        "ffmpeg": _ffmpeg(),
        "hub": _hub(),
        "models": {name: _checkpoints(name, checkpoint_dir) for name in model_names()},
        "attention": _attention(device),
        "linear": _linear(device),
    }


def _versions(torch) -> dict:
    versions = {"turbo_repl": __version__, "python": platform.python_version(),
                "torch": getattr(torch, "__version__", None),
                "cuda": getattr(getattr(torch, "version", None), "cuda", None)}
    for name in ("triton", "huggingface_hub"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:   # noqa: BLE001 — a broken install is reported, not raised
            versions[name] = None
    return versions


def _gpu(torch) -> dict:
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
            "memory_gib": round(total / 2**30, 1), "free_gib": round(free / 2**30, 1)}


def _ffmpeg() -> dict:
    try:
        import imageio_ffmpeg

        return {"path": imageio_ffmpeg.get_ffmpeg_exe(), "version": imageio_ffmpeg.get_ffmpeg_version()}
    except Exception as e:   # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def _hub() -> dict:
    try:
        from huggingface_hub import constants
    except Exception as e:   # noqa: BLE001
        return {"error": f"huggingface_hub cannot be imported: {e}"}
    return {"cache": str(constants.HF_HUB_CACHE), "endpoint": constants.ENDPOINT,
            "offline": bool(constants.HF_HUB_OFFLINE)}


def _checkpoints(name: str, checkpoint_dir: Path | None) -> dict:
    """For a real model: which of its bf16 and int8 file sets are here, and what each lacks."""
    spec = get_model(name)
    if spec.builtin:
        return {"task": spec.task, "builtin": True, "available": True}
    entry = {"task": spec.task, "builtin": False}
    for variant, quant in (("bf16", False), ("int8", True)):
        try:
            locate(name, checkpoint_dir=checkpoint_dir, quant=quant)
            entry[variant] = {"present": True, "missing": []}
        except MissingCheckpoint as e:
            entry[variant] = {"present": False, "missing": [n.hub_path for n in e.missing],
                              "files": len(needed_files(spec, quant)), "fetch": e.command}
        except Exception as e:   # noqa: BLE001 — no such variant, no such folder, a broken huggingface_hub
            entry[variant] = {"present": False, "missing": [], "error": str(e)}
    entry["available"] = entry["bf16"]["present"] or entry["int8"]["present"]
    return entry


def _attention(device) -> dict:
    """attention backend -> "ok" or why not (from the kernels), and what `auto` picks (from the engine)."""
    try:
        from turbo_kernels.sla import available_backends

        backends = {k: str(v) for k, v in dict(available_backends(device)).items()}
    except Exception as e:   # noqa: BLE001 — the kernels may be missing or broken; say so
        backends = {name: f"unknown ({type(e).__name__}: {e})" for name in ATTENTION_BACKENDS[:-1]}
    backends.setdefault("original", "ok")   # dense attention is torch's own SDPA: no kernels needed
    try:
        from turbo_repl.engine.backends import choose_attention

        auto, why = choose_attention("auto", device, sparse_checkpoint=True)
    except Exception as e:   # noqa: BLE001
        auto, why = "unknown", f"{type(e).__name__}: {e}"
    return {"backends": backends, "auto": auto, "auto_reason": why}


def _linear(device) -> dict:
    """linear backend -> "ok" or why not, and what `auto` picks, as the engine decides them for this device."""
    try:
        from turbo_repl.engine.backends import choose_quant

        backends = {}
        for name in LINEAR_BACKENDS:
            try:
                choose_quant(name, "off", device)
                backends[name] = "ok" if device.type == "cuda" or name == "off" else "ok (plain-torch reference)"
            except ValueError as e:
                backends[name] = str(e)
        auto = (f"as the checkpoint: {choose_quant('auto', 'int8', device)} with -quant.pth, "
                f"{choose_quant('auto', 'off', device)} with bf16")
    except Exception as e:   # noqa: BLE001 — the engine may be missing or broken; say so
        unknown = f"unknown ({type(e).__name__}: {e})"
        backends, auto = {name: unknown for name in LINEAR_BACKENDS}, "unknown"
    return {"backends": backends, "auto": auto}


def render(report: dict, console: Console) -> None:
    env = Table(title="environment", title_justify="left", show_header=False)
    env.add_column(style="bold")
    env.add_column(overflow="fold")
    for name, version in report["versions"].items():
        missing = "none (a CPU build of torch)" if name == "cuda" else "[red]not installed[/]"
        env.add_row(name, escape(version) if version else missing)
    if "error" in report:
        console.print(env)
        console.print(f"[red]{escape(report['error'])}[/]")
        return
    gpu = report["gpu"]
    env.add_row("device", report["device"])
    env.add_row("gpu", f"{escape(gpu['name'])} ×{gpu['count']}, compute capability {gpu['capability']}, "
                       f"{gpu['memory_gib']} GiB ({gpu['free_gib']} GiB free)" if gpu else "none (CPU only)")
    ff = report["ffmpeg"]
    env.add_row("ffmpeg", escape(f"{ff['version']}  {ff['path']}") if "path" in ff else
                f"[red]{escape(ff['error'])}[/]")
    hub = report["hub"]
    env.add_row("hub cache", f"[red]{escape(hub['error'])}[/]" if "error" in hub else
                escape(f"{hub['cache']}  ({hub['endpoint']}{', offline' if hub['offline'] else ''})"))
    console.print(env)

    models = Table(title="checkpoints", title_justify="left")
    for column in ("model", "task", "bf16", "int8 (-quant)"):
        models.add_column(column, overflow="fold")
    for name, m in report["models"].items():
        if m["builtin"]:
            models.add_row(name, m["task"], "[green]built in[/]", "[green]built in[/]")
        else:
            models.add_row(name, m["task"], _variant(m["bf16"]), _variant(m["int8"]))
    console.print(models)

    backends = Table(title="backends", title_justify="left")
    for column in ("kind", "backend", "works here", "auto"):
        backends.add_column(column, overflow="fold")
    for kind in ("attention", "linear"):
        section = report[kind]
        for i, (name, status) in enumerate(section["backends"].items()):
            auto = (section["auto"] + (f" — {section['auto_reason']}" if section.get("auto_reason") else "")
                    if i == 0 else "")
            backends.add_row(kind if i == 0 else "", name, "[green]ok[/]" if status == "ok" else escape(status),
                             escape(auto))
    console.print(backends)


def _variant(v: dict) -> str:
    if v["present"]:
        return "[green]present[/]"
    if "error" in v:
        return escape(v["error"])
    return f"[yellow]missing {len(v['missing'])} of {v['files']}[/] — {escape(v['fetch'])}"
