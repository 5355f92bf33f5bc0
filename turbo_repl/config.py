"""User configuration and where turbo-repl keeps its files (XDG base directories).

configs/defaults.yaml is the commented default; $XDG_CONFIG_HOME/turbo-repl/config.yaml, when present,
is laid over it key by key.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import yaml

APP = "turbo-repl"


class ConfigError(ValueError):
    """The user's config file cannot be used; the message says which file and why."""


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / APP


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / APP


def config_path() -> Path:
    return config_dir() / "config.yaml"


def read_user_yaml(path: Path, example: str) -> dict:
    """A user's YAML file as a mapping ({} when empty), or one ConfigError that says which file and what is wrong
    with it (`example`: where a good one is to be seen)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read {path}: not valid YAML ({str(e).splitlines()[0]}); fix or remove it") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of key: value (see {example})")
    return data


def load_config() -> dict:
    """The default config with the user's file laid over it; paths resolved."""
    config = yaml.safe_load(resources.files("turbo_repl.configs").joinpath("defaults.yaml").read_text())
    path = config_path()
    if path.exists():
        user = read_user_yaml(path, "configs/defaults.yaml")
        unknown = set(user) - set(config)
        if unknown:
            raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}; known keys: {', '.join(config)}")
        config.update({k: v for k, v in user.items() if v is not None})
    config["settings"] = dict(config.get("settings") or {})
    config["history"] = Path(config["history"]).expanduser() if config["history"] else state_dir() / "history.jsonl"
    config["input_history"] = (Path(config["input_history"]).expanduser() if config["input_history"]
                               else state_dir() / "input-history")
    return config
