"""`turbo-repl`: the interactive session (the default command).

On a terminal: a prompt_toolkit prompt with persistent input history, completion, a bottom toolbar and `\\`
line continuation. With stdin not a terminal (`turbo-repl < prompts.txt`): every line runs as a script, with
no prompt UI; the exit status is 1 if any line failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.console import Console
from rich.markup import escape

from turbo_repl.options import UsageError, add_common_arguments, open_session
from turbo_repl.repl import render, runner
from turbo_repl.repl.commands import Quit, join_continued, run_line
from turbo_repl.repl.completion import ReplCompleter
from turbo_repl.repl.toolbar import toolbar
from turbo_repl.session import RunError, Session

PROMPT = "turbo> "


class Repl:
    def __init__(self, session: Session, console: Console):
        self.session = session
        self.console = console
        self.failures = 0

    # --- one logical line ---------------------------------------------------------------------------------

    def handle(self, line: str) -> bool:
        """Run a command or a prompt; print one line for anything refused. False when it is time to quit."""
        try:
            run_line(self, line)
        except Quit:
            return False
        except KeyboardInterrupt:
            render.note(self.console, "interrupted")
        except (ValueError, RunError, MemoryError) as e:
            render.error(self.console, str(e))
            self.failures += 1
        except Exception as e:  # noqa: BLE001 - the session survives any failed run; the record holds it too
            render.error(self.console, f"{type(e).__name__}: {e}")
            self.failures += 1
        return True

    def generate(self, prompt: str) -> None:
        runner.generate(self.session, prompt, self.console)

    def replay(self, records: list[dict]) -> None:
        verdicts = runner.replay_all(self.session, records, self.console)
        self.failures += sum(not v.ok for v in verdicts)

    # --- front ends -----------------------------------------------------------------------------------------

    def prompt_session(self, history: History, **io) -> PromptSession:
        keys = KeyBindings()

        @keys.add("enter")
        @keys.add("c-j")
        def _accept_or_continue(event) -> None:
            buffer = event.current_buffer
            if buffer.document.text_before_cursor.endswith("\\") and buffer.document.is_cursor_at_the_end:
                buffer.insert_text("\n")
            else:
                buffer.validate_and_handle()

        return PromptSession(history=history, completer=ReplCompleter(), auto_suggest=AutoSuggestFromHistory(),
                             bottom_toolbar=lambda: toolbar(self.session), multiline=True, key_bindings=keys,
                             prompt_continuation="... ", complete_while_typing=True, **io)

    def interactive(self, history: History, **io) -> int:
        """The prompt loop. `io` may hold prompt_toolkit `input` / `output` (tests use a pipe)."""
        prompt = self.prompt_session(history, **io)
        while True:
            try:
                text = prompt.prompt(PROMPT)
            except KeyboardInterrupt:
                continue   # Ctrl-C at the prompt clears the line
            except EOFError:
                break
            if not self.handle(join_continued(text.split("\n"))):
                break
        self.console.print("bye")
        return 0

    def script(self, lines: Iterable[str]) -> int:
        """Run lines as typed at the prompt: commands, prompts, `\\` continuations; `#` starts a comment line."""
        pending: list[str] = []
        for raw in lines:
            line = raw.rstrip("\r\n")
            if line.rstrip().endswith("\\"):
                pending.append(line)
                continue
            logical, pending = join_continued(pending + [line]), []
            if not logical or logical.startswith("#"):
                continue
            self.console.print(f"[dim]{PROMPT}{escape(logical)}[/]", highlight=False, soft_wrap=True)
            if not self.handle(logical):
                break
        return 1 if self.failures else 0


def input_history(path: Path, console: Console) -> History:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return FileHistory(str(path))
    except OSError as e:
        render.note(console, f"input history not kept ({path}: {e.strerror or e})")
        return InMemoryHistory()


def attention_choice(session: Session) -> tuple[str, str] | None:
    """The attention backend the current settings resolve to here, and why (for the start panel)."""
    from turbo_repl.engine.backends import choose_attention

    try:
        return choose_attention(session.settings.attention, session.engine.device,
                                session.engine.info["sparse_checkpoint"])
    except (ValueError, KeyError, AttributeError):
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)


def run(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    stdin = stdin or sys.stdin
    console = Console(highlight=False)
    try:
        with console.status("loading the model…"):
            session, choice, config = open_session(args)
    except UsageError as e:
        render.error(Console(stderr=True, highlight=False), str(e))
        return 2
    console.print(render.start_panel(session.engine.info, choice.reason, attention_choice(session)))
    repl = Repl(session, console)
    if stdin.isatty():
        return repl.interactive(input_history(config["input_history"], console))
    return repl.script(stdin)
