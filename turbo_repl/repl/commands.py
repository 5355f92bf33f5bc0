"""The REPL's command language: a line starting with ':' (or '/') is a command, anything else is a prompt.

Each command is a row of COMMANDS: name, usage, help, what its argument completes to, and a handler
`handler(repl, arg)`. A handler that refuses its input raises a ValueError subclass with one line (the REPL
prints it); nothing has changed by then.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.markup import escape

from turbo_repl.history import HistoryError, find_run, read_history, write_session
from turbo_repl.repl import render
from turbo_repl.settings import BY_NAME, SettingError, lookup

PREFIXES = (":", "/")


class CommandError(ValueError):
    """A command line that cannot be run; one line."""


class Quit(Exception):
    """`:quit`: leave the REPL."""


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    help: str
    handler: Callable[["object", str], None]
    completes: str = ""          # "setting", "setting value", "path", "help" or "" (nothing)
    aliases: tuple[str, ...] = ()


def is_command(line: str) -> bool:
    return line.lstrip().startswith(PREFIXES)


def join_continued(lines: list[str]) -> str:
    """Lines where all but the last end in a backslash, as one logical line."""
    return " ".join(line.rstrip().removesuffix("\\").strip() for line in lines).strip()


def split(line: str) -> tuple[Command, str]:
    """The command a line names and the rest of the line (its argument)."""
    body = line.strip()[1:]
    name, _, arg = body.partition(" ")
    return find(name), arg.strip()


def find(name: str) -> Command:
    key = name.strip().lower()
    for c in COMMANDS:
        if key == c.name or key in c.aliases:
            return c
    if not key:
        raise CommandError("a command name must follow ':'; :help lists them")
    close = difflib.get_close_matches(key, [c.name for c in COMMANDS], n=1)
    hint = f"; did you mean :{close[0]}?" if close else "; :help lists commands"
    raise CommandError(f"unknown command :{key}{hint}")


def run_line(repl, line: str) -> None:
    """Run one logical line: a command, or a prompt to generate from."""
    if is_command(line):
        command, arg = split(line)
        command.handler(repl, arg)
    elif line.strip():
        repl.generate(line.strip())


# --- handlers ------------------------------------------------------------------------------------------------

def _set(repl, arg: str) -> None:
    if not arg:
        repl.console.print(render.settings_table(repl.session.settings, repl.session.defaults))
        return
    if "=" in arg.split(" ", 1)[0]:
        name, _, value = arg.partition("=")
    else:
        name, _, value = arg.partition(" ")
    setting = lookup(name)
    if not value.strip() and setting.name != "image":
        raise CommandError(f"usage: :set {setting.name} VALUE ({setting.values})")
    repl.session.set(setting.name, value)
    _echo(repl, setting.name)


def _echo(repl, name: str) -> None:
    value = BY_NAME[name].text(getattr(repl.session.settings, name))
    extra = " (a fresh seed is drawn for each run and recorded)" if name == "seed" and value == "random" else ""
    repl.console.print(f"{name} = [bold]{escape(value)}[/]{extra}", highlight=False, soft_wrap=True)


def _show(repl, arg: str) -> None:
    if arg:
        raise CommandError(":show takes no argument (:help NAME explains one setting)")
    repl.console.print(render.settings_table(repl.session.settings, repl.session.defaults))


def _reset(repl, arg: str) -> None:
    if arg:
        repl.session.reset(arg)
        _echo(repl, lookup(arg).name)
    else:
        repl.session.reset()
        repl.console.print("all settings back to their defaults")


def _image(repl, arg: str) -> None:
    if not arg:
        current = repl.session.settings.image
        repl.console.print(f"image = {escape(current or 'none')}  [dim](:image PATH sets it, :image none "
                           "clears it)[/]")
        return
    repl.session.set("image", arg)
    _echo(repl, "image")


def _history(repl, arg: str) -> None:
    try:
        count = int(arg) if arg else 10
    except ValueError:
        raise CommandError(f"usage: :history [N] (N a number of runs, not {arg!r})") from None
    if count < 1:
        raise CommandError("usage: :history [N] with N ≥ 1")
    records = read_history(repl.session.history.path)
    if not records:
        repl.console.print(f"no runs recorded yet in {repl.session.history.path}")
        return
    repl.console.print(render.history_table(records[-count:]))


def _replay(repl, arg: str) -> None:
    if not arg:
        raise CommandError("usage: :replay FILE|RUN_ID (a session file, history file, mp4, or a run id)")
    from turbo_repl.replay import load_runs

    path = Path(arg).expanduser()
    if path.exists():
        records = load_runs(path)
    else:
        records = [find_run(read_history(repl.session.history.path), arg, str(repl.session.history.path))]
    repl.replay(records)


def _save(repl, arg: str) -> None:
    if not arg:
        raise CommandError("usage: :save FILE (e.g. :save sessions/fox.yaml)")
    finished = [r for r in repl.session.runs if r.get("status") == "finished"]
    if not finished:
        raise CommandError("no finished run in this session to save yet")
    path = Path(arg).expanduser()
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise CommandError(f"session files are YAML: name it {path.with_suffix('.yaml')}")
    try:
        write_session(path, finished)
    except OSError as e:
        raise HistoryError(f"cannot write {path}: {e.strerror or e}") from None
    repl.console.print(f"saved {len(finished)} run(s) to [bold]{escape(str(path))}[/]; "
                       f"replay with: turbo-repl replay {escape(str(path))}", soft_wrap=True)


def _help(repl, arg: str) -> None:
    console, defaults = repl.console, repl.session.defaults
    if not arg:
        console.print(render.commands_help(COMMANDS))
        console.print()
        console.print(render.settings_help(defaults))
        console.print("\n[dim]Anything not starting with ':' or '/' is a prompt. End a line with \\ to continue it. "
                      "Ctrl-C cancels a run, Ctrl-D quits.[/]")
        return
    name = arg.strip().lstrip(":/")
    try:
        console.print(render.setting_help(lookup(name), defaults))
        return
    except SettingError:
        pass
    try:
        c = find(name)
    except CommandError:
        raise CommandError(f"no command or setting called {name!r}; :help lists them") from None
    console.print(f"[bold]:{c.name} {escape(c.usage)}[/]  {escape(c.help)}")


def _quit(repl, arg: str) -> None:
    raise Quit()


COMMANDS: tuple[Command, ...] = (
    Command("set", "NAME VALUE", "change a setting (TurboDiffusion names work too: num_steps, sla_topk, …)", _set,
            "setting value"),
    Command("show", "", "all settings; changed ones are marked *", _show),
    Command("reset", "[NAME]", "one setting, or all, back to its default", _reset, "setting"),
    Command("image", "PATH", "the first frame for image-to-video (:image none clears it)", _image, "path"),
    Command("history", "[N]", "the last N runs (default 10) from the history file", _history),
    Command("replay", "FILE|ID", "regenerate runs of a session file, history file, mp4, or a run id, and compare",
            _replay, "path"),
    Command("save", "FILE", "write this session's finished runs to a session file (YAML)", _save, "path"),
    Command("help", "[NAME]", "commands and settings, or one of them", _help, "help"),
    Command("quit", "", "leave (Ctrl-D does too)", _quit, aliases=("exit", "q")),
)
