"""Everything the REPL, `run` and `replay` print, drawn with rich."""

from __future__ import annotations

import threading

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from turbo_repl.settings import TABLE, Setting, Settings

def error(console: Console, message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def note(console: Console, message: str) -> None:
    console.print(f"[dim]{escape(message)}[/]", highlight=False, soft_wrap=True)


# --- start ---------------------------------------------------------------------------------------------------

def start_panel(info: dict, reason: str, attention: tuple[str, str] | None = None) -> Panel:
    """Model, device and the backends chosen (and why), from `engine.info`; `attention` is (mode, why)."""
    task = {"t2v": "text-to-video", "i2v": "image-to-video"}.get(info.get("task"), info.get("task"))
    rows = [("model", f"{info.get('model')} · {task}", reason),
            ("device", f"{info.get('gpu') or info.get('device')} · {info.get('dtype', '')}", "")]
    if attention:
        rows.append(("attention", attention[0], attention[1]))
    rows.append(("linear layers", {"off": "unquantised"}.get(info.get("quant"), info.get("quant")), ""))
    versions = info.get("versions") or {}
    rows.append(("versions", " · ".join(f"{k} {v}" for k, v in versions.items() if v), ""))
    lines = [f"[bold]{name:<13}[/] {escape(str(value))}" + (f"  [dim]({escape(why)})[/]" if why else "")
             for name, value, why in rows]
    if info.get("builtin"):
        lines += ["", "[yellow]This is the built-in tiny model: its weights are untrained, so its videos are noise.",
                  "For real videos: [bold]turbo-repl download wan2.1-1.3b[/], then [bold]turbo-repl --model "
                  "wan2.1-1.3b[/] (on a GPU).[/]"]
    lines.append("[dim]Type a prompt to make a video; :help lists commands and settings; Ctrl-D quits.[/]")
    return Panel("\n".join(lines), title="turbo-repl", title_align="left", expand=False)


# --- settings --------------------------------------------------------------------------------------------------

def settings_table(settings: Settings, defaults: Settings) -> Table:
    """`:show`: every setting, changed values marked with * and their default beside them."""
    changed = set(settings.changed(defaults))
    table = Table(title="settings (* = changed)", title_justify="left", box=None, pad_edge=False)
    table.add_column("setting", style="bold")
    table.add_column("value")
    table.add_column("default", style="dim")
    for s in TABLE:
        value = s.text(getattr(settings, s.name))
        if s.name in changed:
            table.add_row(f"{s.name}*", f"[yellow]{escape(value)}[/]", escape(s.text(getattr(defaults, s.name))))
        else:
            table.add_row(s.name, escape(value), "")
    w, h = settings.size
    table.caption = f"size {w}×{h}"
    table.caption_justify = "left"
    return table


def settings_help(defaults: Settings) -> Table:
    table = Table(title="settings (:set NAME VALUE)", title_justify="left", box=None, pad_edge=False)
    for column in ("setting", "values", "default", "what it does"):
        table.add_column(column, style="bold" if column == "setting" else None)
    for s in TABLE:
        table.add_row(s.name, escape(s.values), escape(s.text(getattr(defaults, s.name))), escape(s.help))
    return table


def setting_help(s: Setting, defaults: Settings) -> str:
    aliases = f" (also: {', '.join(s.aliases)})" if s.aliases else ""
    return (f"[bold]{s.name}[/]{escape(aliases)}: {escape(s.help)}\n"
            f"  values: {escape(s.values)}   default: {escape(s.text(getattr(defaults, s.name)))}")


def commands_help(commands) -> Table:
    table = Table(title="commands (':' or '/' prefix)", title_justify="left", box=None, pad_edge=False)
    table.add_column("command", style="bold")
    table.add_column("what it does")
    for c in commands:
        table.add_row(escape(f":{c.name} {c.usage}".strip()), escape(c.help))
    return table


# --- runs ------------------------------------------------------------------------------------------------------

def _seconds(timings: dict) -> str:
    """Stage times, then the whole run: the engine's total (generation) plus writing the files."""
    stages = [f"{k} {v:.2f}s" for k, v in timings.items() if k != "total"]
    total = timings.get("total", 0.0) + timings.get("write", 0.0)
    return " · ".join(stages + [f"total {total:.2f}s"])


def result_line(record: dict) -> str:
    outputs = record.get("outputs") or []
    s = record["settings"]
    extra = f" (+{len(outputs) - 1} more)" if len(outputs) > 1 else ""
    return (f"[green]✓[/] [bold]{escape(outputs[0] if outputs else '?')}[/]{extra}  "
            f"[dim]seed {record['seed']} · steps {s['steps']} · frames {s['frames']} · "
            f"{escape(_seconds(record.get('timings', {})))} · run {record['id']}[/]")


def history_table(records: list[dict]) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("run", "when", "status", "seed", "steps", "prompt", "output"):
        table.add_column(column)
    colours = {"finished": "green", "failed": "red", "cancelled": "yellow", "running": "magenta"}
    for r in records:
        s = r.get("settings") or {}
        status = r.get("status", "?")
        prompt = r.get("prompt", "")
        table.add_row(r.get("id", "?"), str(r.get("started", ""))[:19].replace("T", " "),
                      f"[{colours.get(status, 'white')}]{status}[/]", str(r.get("seed", "")), str(s.get("steps", "")),
                      escape(prompt if len(prompt) <= 40 else prompt[:39] + "…"),
                      escape(", ".join(r.get("outputs") or []) or r.get("error", "")))
    return table


def verdict_line(verdict) -> str:
    colour = {"identical": "green", "differs": "red", "failed": "red", "cancelled": "yellow"}.get(verdict.status,
                                                                                                  "white")
    return f"run {escape(verdict.run_id)}: [bold {colour}]{verdict.status}[/] [dim]{escape(verdict.detail)}[/]"


# --- progress ----------------------------------------------------------------------------------------------------

def stage_label(stage: str, done: int, total: int) -> str:
    """What runs now: `step 2/4` while the second step runs; other stages by name."""
    if stage == "denoise":
        return f"step {min(done + 1, total)}/{total}"
    return stage


class ProgressDisplay:
    """One progress display for every stage of a run. On a terminal a single rich bar that vanishes when the
    run ends (the prompt is not active meanwhile, so nothing fights it); elsewhere one line per stage."""

    def __init__(self, console: Console):
        self.console = console
        self._lock = threading.Lock()
        self._last = None
        self._progress = None
        if console.is_terminal:
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
            self._task = self._progress.add_task("starting", total=None)

    def __enter__(self) -> "ProgressDisplay":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        label = stage_label(stage, done, total)
        with self._lock:
            if self._progress is not None:
                self._progress.update(self._task, description=label, completed=done, total=total)
            elif done < total and label != self._last:
                self.console.print(f"[dim]… {escape(label)}[/]", highlight=False)
            self._last = label

    def say(self, message: str) -> None:
        self.console.print(f"[yellow]{escape(message)}[/]")   # above the bar while it is live
