"""Where the files of a model are on this machine. Never touches the network.

A model needs its DiT checkpoints (one per expert, bf16 or the int8 `-quant.pth` variant), the Wan VAE, the
umT5 encoder and the umT5 tokenizer files; `configs/models.yaml` says which hub repo and file each one is.
They are looked for in an explicit checkpoint folder first, then in the Hugging Face cache.

A checkpoint folder is flat, as TurboDiffusion's `checkpoints/`: every checkpoint under its hub file name, and
the tokenizer under its repo id (`google/umt5-xxl/spiece.model`, as the official Wan folders ship it).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from turbo_repl.models.registry import CheckpointRef, ModelSpec, get_model


@dataclass(frozen=True)
class NeededFile:
    """One file a model needs: what it is for, where it lives on the hub, and its name in a checkpoint folder."""

    role: str          # "dit:<expert>", "vae", "text_encoder" or "tokenizer"
    repo: str
    filename: str      # path inside the hub repo
    local_name: str    # path inside a checkpoint folder

    @property
    def hub_path(self) -> str:
        return f"{self.repo}/{self.filename}"


@dataclass(frozen=True)
class ModelFiles:
    """Paths of every file a model needs. A built-in model needs none: every path is None."""

    model: str
    quant: bool
    experts: dict[str, Path]      # expert name ("main", "high", "low") -> DiT checkpoint
    vae: Path | None
    text_encoder: Path | None
    tokenizer: Path | None        # the folder that holds the tokenizer files
    builtin: bool = False


class MissingCheckpoint(ValueError):
    """Some files of a model are not on this machine; the message names them and the command that fetches them."""

    def __init__(self, model: str, missing: list[NeededFile], command: str):
        self.model, self.missing, self.command = model, missing, command
        names = ", ".join(f.hub_path for f in missing)
        super().__init__(f"model '{model}' is missing {len(missing)} file(s): {names}; fetch them with: {command}")


def needed_files(spec: ModelSpec, quant: bool = False) -> list[NeededFile]:
    """Every file `spec` needs, DiT experts first. Built-in models need none."""
    if spec.builtin:
        return []
    needs = []
    for expert, ref in spec.experts.items():
        if quant and not ref.quant_file:
            raise ValueError(f"model '{spec.name}' has no int8 (-quant) checkpoint; leave out --quant")
        needs.append(_checkpoint(f"dit:{expert}", ref, ref.quant_file if quant else ref.file))
    needs.append(_checkpoint("vae", spec.vae.checkpoint, spec.vae.checkpoint.file))
    needs.append(_checkpoint("text_encoder", spec.text_encoder.checkpoint, spec.text_encoder.checkpoint.file))
    tok = spec.text_encoder.tokenizer
    needs += [NeededFile("tokenizer", tok["repo"], f, f"{tok['repo']}/{f}") for f in tok.get("files", [])]
    return needs


def _checkpoint(role: str, ref: CheckpointRef, filename: str) -> NeededFile:
    return NeededFile(role, ref.repo, filename, Path(filename).name)


def find_in_folder(need: NeededFile, checkpoint_dir: Path) -> Path | None:
    path = Path(checkpoint_dir) / need.local_name
    return path if path.is_file() else None


def find_in_cache(need: NeededFile) -> Path | None:
    """The file's path in the Hugging Face cache (HF_HUB_CACHE), at the revision `main` points to, if there."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(need.repo, need.filename)
    return Path(hit) if isinstance(hit, str) else None   # None, or a marker that the hub said it does not exist


def fetch_command(model: str, quant: bool = False, checkpoint_dir: Path | None = None) -> str:
    words = ["turbo-repl", "download", model] + (["--quant"] if quant else [])
    if checkpoint_dir is not None:
        words += ["--checkpoint-dir", str(checkpoint_dir)]
    return shlex.join(words)


def locate(model_name: str, *, checkpoint_dir: str | Path | None = None, quant: bool = False) -> ModelFiles:
    """Paths of every file `model_name` needs, or `MissingCheckpoint` naming what is missing.

    Each file is looked for in `checkpoint_dir` (when given), then in the Hugging Face cache. The tokenizer
    files are one unit: they must all be in the same place, since the tokenizer loads from one folder.
    """
    spec = get_model(model_name)
    if spec.builtin:
        return ModelFiles(model_name, quant, {}, None, None, None, builtin=True)
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir).expanduser()
        if not checkpoint_dir.is_dir():
            raise ValueError(f"checkpoint folder '{checkpoint_dir}' does not exist")
    finders = ([lambda n: find_in_folder(n, checkpoint_dir)] if checkpoint_dir else []) + [find_in_cache]
    needs = needed_files(spec, quant)
    groups = [[n] for n in needs if n.role != "tokenizer"] + [[n for n in needs if n.role == "tokenizer"]]
    found: dict[NeededFile, Path] = {}
    missing: list[NeededFile] = []
    for group in filter(None, groups):
        # Take the group from the first place that has all of it; else report what the fullest place lacks.
        tries = [[finder(n) for n in group] for finder in finders]
        complete = next((paths for paths in tries if all(paths)), None)
        if complete:
            found.update(zip(group, complete))
        else:
            fullest = max(tries, key=lambda paths: sum(p is not None for p in paths))
            missing += [n for n, p in zip(group, fullest) if p is None]
    if missing:
        raise MissingCheckpoint(model_name, missing, fetch_command(model_name, quant, checkpoint_dir))

    def path_of(role: str) -> Path:
        return next(found[n] for n in needs if n.role == role)

    tokenizer_files = [n for n in needs if n.role == "tokenizer"]
    return ModelFiles(
        model=model_name,
        quant=quant,
        experts={e: path_of(f"dit:{e}") for e in spec.experts},
        vae=path_of("vae"),
        text_encoder=path_of("text_encoder"),
        tokenizer=found[tokenizer_files[0]].parent if tokenizer_files else None,
    )
