"""Reading checkpoints in the reference formats and loading them strictly into models built on `meta`.

Formats: `.safetensors` (memory-mapped), `.pth`/`.pt`/`.bin` through `torch.load(weights_only=True, mmap=True)`
(pickled code is never executed), and original Wan shards (a directory, or its `*.safetensors.index.json`).
`{"state_dict": ...}` / `{"model": ...}` wrappers and a leading `net.` on every key are removed, as
TurboDiffusion's own converters do. Nothing is renamed beyond that: key names are the reference's.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from turbo_repl.models.dit import WanDiT
from turbo_repl.models.tiny import deterministic_init

PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
_WRAPPER_KEYS = ("state_dict", "model")
_MIB = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and says what to do."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint whose keys or shapes do not fit the model it was loaded into."""


# --------------------------------------------------------------------------------------------- reading

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file (or shard set) on the CPU, memory-mapped where the format allows."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p} — check the path, or fetch the model with "
                              "`turbo-repl download`")
    if p.is_dir():
        sd = _read_directory(p)
    elif p.name.endswith(".index.json"):
        sd = _read_shards(p)
    elif p.suffix == ".safetensors":
        sd = _read_safetensors(p)
    elif p.suffix in PICKLE_SUFFIXES:
        sd = _read_pickle(p)
    else:
        raise CheckpointError(f"{p}: unknown checkpoint format '{p.suffix}'; expected .safetensors, "
                              f"{', '.join(PICKLE_SUFFIXES)}, a *.safetensors.index.json or a directory of shards")
    return _normalise(sd, p)


def _read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(p), device="cpu")   # lazily memory-mapped: pages are read when touched
    except Exception as e:  # safetensors raises its own exception type for every kind of damage
        raise CheckpointError(f"{p} is not a readable safetensors file ({e}); it is probably truncated or "
                              "corrupt — delete it and download it again") from e


def _read_pickle(p: Path) -> object:
    def load(mmap: bool):
        return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            return load(mmap=False)   # the pre-1.6 (non-zip) format cannot be memory-mapped
    except Exception as e:
        code = re.search(r"GLOBAL ([\w.]+)", str(e))
        if code:
            raise CheckpointError(
                f"{p} holds pickled Python objects, not only tensors (it names {code.group(1)}); turbo-repl "
                "never runs pickled code — re-save its state_dict as .safetensors with a tool you trust") from e
        # torch's own message would suggest weights_only=False, which is exactly what must not be done
        raise CheckpointError(f"{p} cannot be read as a PyTorch checkpoint ({type(e).__name__}); it is probably "
                              "truncated or corrupt — delete it and download it again") from e


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a safetensors shard index (no readable 'weight_map'); "
                              "point at the shard files' directory or download it again") from e
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.exists():
            raise CheckpointError(f"{index} lists shard {shard}, which is missing from {index.parent}; "
                                  "finish the download")
        sd.update(_read_safetensors(shard_path))
    absent = [k for k in weight_map if k not in sd]
    if absent:
        raise CheckpointError(f"{index}: {len(absent)} tensors it lists are in none of its shards "
                              f"(e.g. {absent[0]}); a shard is stale or truncated — download them again")
    return sd


def _read_directory(d: Path) -> dict[str, torch.Tensor]:
    indexes = sorted(d.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _read_shards(indexes[0])
    if len(indexes) > 1:
        raise CheckpointError(f"{d} holds several shard indexes ({', '.join(i.name for i in indexes)}); "
                              "name the one to load")
    files = sorted(d.glob("*.safetensors"))
    if len(files) == 1:
        return _read_safetensors(files[0])
    hint = ""
    subdirs = sorted(s.name for s in d.iterdir() if s.is_dir() and any(s.glob("*.safetensors*")))
    if subdirs:
        hint = f" (these subdirectories hold some: {', '.join(subdirs)})"
    what = "no .safetensors checkpoint" if not files else f"{len(files)} .safetensors files and no shard index"
    raise CheckpointError(f"{d} holds {what}{hint}; name the checkpoint file or shard directory to load")


def _normalise(obj: object, p: Path) -> dict[str, torch.Tensor]:
    """Unwrap `{"state_dict": …}` / `{"model": …}`, drop a leading `net.`, and insist on a flat tensor dict."""
    while isinstance(obj, dict):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{p} does not hold a state dict (found {type(obj).__name__}); "
                              "give a checkpoint of model weights")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{p}: entry '{bad}' is a {type(obj[bad]).__name__}, not a tensor; this file is not "
                              "a plain state dict of model weights")
    if all(k.startswith("net.") for k in obj):
        obj = {k[len("net."):]: v for k, v in obj.items()}
    return dict(obj)


# --------------------------------------------------------------------------------------------- loading

def load_into(module: nn.Module, state_dict: dict[str, torch.Tensor], *, what: str,
              path: str | Path | None) -> nn.Module:
    """Strictly load `state_dict` into `module` (normally built on `meta`), assigning the tensors themselves.

    A mismatch raises CheckpointMismatch naming `what`, the file, the first offending keys and the likely fix.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointMismatch(_mismatch_message(what, path, expected, state_dict, missing, unexpected, wrong))
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module


def _first(keys: list[str], n: int = 3) -> str:
    more = f", … {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _mismatch_message(what, path, expected, sd, missing, unexpected, wrong) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
    if wrong:
        shapes = [f"{k} {list(sd[k].shape)} in file vs {list(expected[k].shape)} in model" for k in wrong]
        parts.append(f"{len(wrong)} of the wrong shape ({_first(shapes, 2)})")
    where = f"checkpoint {path}" if path is not None else "the state dict"
    hint = _hint(expected, sd, missing, unexpected, wrong)
    return f"{what}: {where} does not fit the model: " + "; ".join(parts) + (f". {hint}" if hint else "")


def _hint(expected, sd, missing, unexpected, wrong) -> str:
    model_sig, file_sig = dit_signature(expected), dit_signature(sd)
    if model_sig and file_sig and model_sig != file_sig:
        return _name_dit(file_sig)
    if any(k.endswith("proj_l.weight") for k in unexpected):
        return ("this is an SLA checkpoint (it carries sparse-attention proj_l weights): run it with "
                "attention sla or sagesla")
    if missing and all("proj_l" in k for k in missing):
        return "this is a dense checkpoint without SLA proj_l weights: run it with attention original"
    if any(k.endswith(".int8_weight") for k in unexpected):
        return "this is an int8 (-quant) checkpoint: load it with quant int8"
    if any(k.endswith(".int8_weight") for k in missing):
        return "this checkpoint is not int8-quantized: load it with quant off, or choose its -quant file"
    if len(missing) == len(expected):
        return "none of its keys belong to this model: is it the right file?"
    return ""


def dit_signature(sd: dict[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """(dim, in_dim, num_layers) of a Wan DiT state dict, or None if it does not look like one."""
    pe = sd.get("patch_embedding.weight")
    if pe is None or pe.dim() not in (2, 5) or "blocks.0.modulation" not in sd:
        return None
    in_dim = pe.shape[1] // 4 if pe.dim() == 2 else pe.shape[1]   # patch (1, 2, 2): 4 values per channel
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return pe.shape[0], in_dim, layers


def _name_dit(sig: tuple[int, int, int]) -> str:
    from turbo_repl.models.registry import get_model, model_names

    dim, in_dim, layers = sig
    desc = f"dim {dim}, {layers} blocks, {in_dim} input channels"
    names = [n for n in model_names()
             if tuple(get_model(n).dit[f] for f in ("dim", "in_dim", "num_layers")) == sig]
    if not names:
        return f"this checkpoint ({desc}) matches no known model"
    dit = get_model(names[0]).dit_name
    return f"this checkpoint is {dit} ({desc}): choose --model {' or --model '.join(names)}"


# --------------------------------------------------------------------------------------------- identity

def fingerprint(path: str | Path) -> str:
    """A cheap, stable id of a checkpoint for run records: SHA-256 over the file name, its size and its first
    and last MiB (every shard, for a shard set). Not a hash of the whole file: it tells checkpoints apart and
    catches truncation, but not a change in the middle of a file."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if p.name.endswith(".index.json"):
        files = [p] + sorted({p.parent / s for s in json.loads(p.read_text())["weight_map"].values()})
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_MIB))
            if size > _MIB:
                fh.seek(max(size - _MIB, _MIB))
                h.update(fh.read())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- the DiT

def dit_from_checkpoint(arch: dict, path: str | Path, *, device, dtype: torch.dtype | None,
                        name: str = "Wan") -> WanDiT:
    """Build a WanDiT of `arch` on `meta` and load `path` into it strictly, then place it on `device`.

    The checkpoint decides the variant: `proj_l` keys give sparse (SLA) attention modules, `int8_weight` keys
    8-bit linears. An original Wan Conv3d patch embedding [dim, C, 1, 2, 2] is read as the Linear [dim, C*4].
    Floating tensors become `dtype` (None keeps the stored dtypes), except int8 scales and norm weights.
    """
    sd = read_state_dict(path)
    pe = sd.get("patch_embedding.weight")
    if pe is not None and pe.dim() == 5:
        sd["patch_embedding.weight"] = pe.reshape(pe.shape[0], -1)
    with torch.device("meta"):
        model = WanDiT(**arch, sparse_attention=any(k.endswith("proj_l.weight") for k in sd))
    if any(k.endswith(".int8_weight") for k in sd):
        from turbo_repl.models.linear import int8_shells

        int8_shells(model)
    load_into(model, sd, what=f"{name} DiT", path=path)
    return model.place(device, dtype)


def tiny_dit(arch: dict, seed: int, sparse: bool = True) -> WanDiT:
    """A DiT of `arch` with deterministic random weights (the built-in tiny models; tests)."""
    return deterministic_init(WanDiT(**arch, sparse_attention=sparse), seed).eval().requires_grad_(False)
