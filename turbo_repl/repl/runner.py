"""Running generations in the foreground: a worker thread does the work while the main thread shows progress
and turns Ctrl-C into a cancel request, so a cancelled run leaves the models loaded."""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

from rich.console import Console

from turbo_repl.engine.types import Cancelled
from turbo_repl.repl import render
from turbo_repl.session import Session, Verdict

T = TypeVar("T")


def in_worker(console: Console, work: Callable[[render.ProgressDisplay, threading.Event], T]) -> T:
    """`work(progress, cancel)` in a thread; Ctrl-C sets `cancel` and waits for the work to stop."""
    cancel, done = threading.Event(), threading.Event()
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = work(display, cancel)
        except BaseException as e:  # noqa: BLE001 - handed back to the main thread as is
            outcome["error"] = e
        finally:
            done.set()

    with render.ProgressDisplay(console) as display:
        # Waiting on an Event, not Thread.join: an interrupted join can leave is_alive() wrong (CPython < 3.13).
        threading.Thread(target=target, name="turbo-repl-run", daemon=True).start()
        while not done.is_set():
            try:
                done.wait(0.05)
            except KeyboardInterrupt:
                if not cancel.is_set():
                    cancel.set()
                    display.say("cancelling at the next step…")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def generate(session: Session, prompt: str, console: Console) -> dict | None:
    """One run with progress; prints the result line. Returns the record, or None if cancelled.
    Raises session.RunError (one line) when the run failed."""
    from turbo_repl.engine.pipeline import prompt_warnings

    for warning in prompt_warnings(prompt):
        render.note(console, warning)
    try:
        record = in_worker(console, lambda progress, cancel: session.run(prompt, progress, cancel))
    except Cancelled:
        console.print("[yellow]cancelled[/] [dim](recorded as cancelled; the model is still loaded)[/]")
        return None
    console.print(render.result_line(record), highlight=False, soft_wrap=True)
    return record


def replay_all(session: Session, records: list[dict], console: Console) -> list[Verdict]:
    """Regenerate each record and print its verdict; stops after a cancelled one."""
    verdicts = []
    for record in records:
        prompt = record.get("prompt", "")
        render.note(console, f"replaying run {record.get('id', '?')}: {prompt[:60]}")
        verdict = in_worker(console, lambda progress, cancel: session.replay(record, progress, cancel))
        console.print(render.verdict_line(verdict), highlight=False, soft_wrap=True)
        verdicts.append(verdict)
        if verdict.status == "cancelled":
            break
    return verdicts

