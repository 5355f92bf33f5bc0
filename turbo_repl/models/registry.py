"""Model specifications read from configs/models.yaml — the one place architectures and checkpoints live."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import os
from pathlib import Path

import yaml


@dataclass(frozen=True)
class CheckpointRef:
    """Where one checkpoint file lives on the hub (`file`), and its int8 variant (`quant_file`) if any."""

    repo: str
    file: str
    quant_file: str | None = None


@dataclass(frozen=True)
class TextEncoderSpec:
    name: str
    arch: dict
    text_len: int
    tokenizer: dict
    checkpoint: CheckpointRef | None


@dataclass(frozen=True)
class VaeSpec:
    name: str
    arch: dict
    checkpoint: CheckpointRef | None


@dataclass(frozen=True)
class ModelSpec:
    """A user-facing model: a DiT architecture (one or two experts), a text encoder, a VAE and defaults."""

    name: str
    task: str                       # "t2v" or "i2v"
    dit_name: str
    dit: dict                       # WanModel kwargs
    text_encoder: TextEncoderSpec
    vae: VaeSpec
    experts: dict[str, CheckpointRef | None]   # expert name -> checkpoint ("main" for T2V; "high"/"low" for I2V)
    attention: str                  # attention the released checkpoints were trained for ("sla" adds proj_l)
    defaults: dict = field(default_factory=dict)
    builtin: bool = False           # tiny models: deterministic random weights, no files


def _ref(d: dict | None) -> CheckpointRef | None:
    return CheckpointRef(d["repo"], d["file"], d.get("quant_file")) if d else None


def user_models_file() -> Path:
    """Where a user describes models of their own (fine-tunes of a known architecture, local checkpoints):
    `$TURBO_REPL_MODELS`, else `$XDG_CONFIG_HOME/turbo-repl/models.yaml`. Same format as configs/models.yaml."""
    from turbo_repl.config import config_dir

    if os.environ.get("TURBO_REPL_MODELS"):
        return Path(os.environ["TURBO_REPL_MODELS"])
    return config_dir() / "models.yaml"


@lru_cache(maxsize=1)
def _raw() -> dict:
    raw = yaml.safe_load(resources.files("turbo_repl.configs").joinpath("models.yaml").read_text())
    user = user_models_file()
    if user.is_file():
        from turbo_repl.config import read_user_yaml

        extra = read_user_yaml(user, "configs/models.yaml")
        for section in ("text_encoders", "vaes", "dits", "models"):
            raw[section].update(extra.get(section) or {})
    return raw


def reload() -> None:
    """Forget what was read, so that a changed user models file is read again."""
    _raw.cache_clear()
    get_model.cache_clear()


@lru_cache(maxsize=None)
def get_model(name: str) -> ModelSpec:
    raw = _raw()
    if name not in raw["models"]:
        raise KeyError(f"unknown model '{name}'; known models: {', '.join(model_names())}")
    m = raw["models"][name]
    te = raw["text_encoders"][m["text_encoder"]]
    vae = raw["vaes"][m["vae"]]
    experts_raw = m.get("experts") or ["main"]
    if isinstance(experts_raw, list):   # builtin models name their experts without files
        experts = {e: None for e in experts_raw}
    else:
        experts = {e: _ref(ref) for e, ref in experts_raw.items()}
    return ModelSpec(
        name=name,
        task=m["task"],
        dit_name=m["dit"],
        dit=dict(raw["dits"][m["dit"]]),
        text_encoder=TextEncoderSpec(m["text_encoder"], dict(te["arch"]), te["text_len"], dict(te["tokenizer"]),
                                     _ref(te.get("checkpoint"))),
        vae=VaeSpec(m["vae"], dict(vae["arch"]), _ref(vae.get("checkpoint"))),
        experts=experts,
        attention=m.get("attention", "original"),
        defaults=dict(m.get("defaults", {})),
        builtin=bool(m.get("builtin", False)),
    )


def model_names() -> list[str]:
    return list(_raw()["models"])


def dit_arch(name: str) -> dict:
    """WanModel kwargs of a named DiT architecture (`dits:` in models.yaml)."""
    return dict(_raw()["dits"][name])
