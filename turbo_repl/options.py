"""Command-line options shared by the REPL, `run` and `replay`, and opening a Session from them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from turbo_repl.config import ConfigError, load_config
from turbo_repl.history import History
from turbo_repl.settings import Settings, SettingError


class UsageError(ValueError):
    """Options that cannot be used; one line."""


def add_common_arguments(parser: argparse.ArgumentParser, *, runs: bool = True) -> None:
    """--model, --checkpoint-dir, --device; with `runs`, also what shapes new runs: --history and --set."""
    parser.add_argument("--model", help="model to load (configs/models.yaml; default: the config's, else auto: "
                                        "wan2.1-1.3b when a GPU and its files are here, otherwise tiny)")
    parser.add_argument("--checkpoint-dir", type=Path, help="folder holding the model's checkpoint files")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    if runs:
        parser.add_argument("--history", type=Path,
                            help="history file (default $XDG_STATE_HOME/turbo-repl/history.jsonl)")
        parser.add_argument("--set", dest="set", action="append", default=[], metavar="NAME=VALUE",
                            help="a generation setting, as :set NAME VALUE (repeatable; :help lists them)")


@dataclass
class ModelChoice:
    name: str
    reason: str      # why this model, shown in the start panel


def choose_model(requested: str | None, checkpoint_dir: Path | None) -> ModelChoice:
    """The model to load: the one asked for, else wan2.1-1.3b if it can run here, else the built-in tiny."""
    if requested and requested != "auto":
        from turbo_repl.models.registry import get_model

        try:
            get_model(requested)
        except KeyError as e:
            raise UsageError(e.args[0]) from None
        return ModelChoice(requested, "asked for")
    import torch

    from turbo_repl.models.locate import MissingCheckpoint, locate

    real = "wan2.1-1.3b"
    if not torch.cuda.is_available():
        return ModelChoice("tiny", "no GPU here")
    try:
        locate(real, checkpoint_dir=checkpoint_dir)
    except (MissingCheckpoint, ValueError):
        return ModelChoice("tiny", f"no {real} checkpoints found")
    return ModelChoice(real, "GPU and checkpoints found")


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--set needs NAME=VALUE, got {pair!r} (e.g. --set seed=7)")
        values[name.strip()] = value
    return values


def open_session(args: argparse.Namespace, model: str | None = None):
    """Load the engine for the chosen model and build the Session (config file, --history, --set applied).

    Returns (session, choice, config). Raises UsageError for bad options, before anything heavy is loaded."""
    from turbo_repl.session import Session

    try:
        config = load_config()
    except ConfigError as e:
        raise UsageError(str(e)) from None
    choice = choose_model(model or args.model or config.get("model"), args.checkpoint_dir)
    try:
        defaults = Settings.defaults(choice.name).with_values(config["settings"])
        overrides = parse_assignments(getattr(args, "set", []))
        start = defaults.with_values(overrides)
    except SettingError as e:
        raise UsageError(str(e)) from None
    from turbo_repl.engine import Engine

    try:
        engine = Engine(model=choice.name, checkpoint_dir=args.checkpoint_dir, device=args.device, quant=start.quant)
    except (ValueError, KeyError, OSError) as e:
        raise UsageError(str(e).strip('"')) from None
    history = History(getattr(args, "history", None) or config["history"])
    session = Session(engine, choice.name, history, defaults=defaults)
    session.settings = start
    return session, choice, config
