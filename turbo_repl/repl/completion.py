"""Tab completion: command names, setting names (and aliases), a setting's choices, and file paths."""

from __future__ import annotations

from typing import Iterable

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document

from turbo_repl.repl.commands import COMMANDS, PREFIXES, CommandError, find
from turbo_repl.settings import TABLE, SettingError, lookup


class ReplCompleter(Completer):
    def __init__(self) -> None:
        self._paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor.lstrip()
        if not text.startswith(PREFIXES):
            return   # a prompt: nothing to complete
        body = text[1:]
        if " " not in body:
            for c in COMMANDS:
                if c.name.startswith(body.lower()):
                    yield Completion(c.name, -len(body), display_meta=c.help)
            return
        name, _, rest = body.partition(" ")
        try:
            kind = find(name).completes
        except CommandError:
            return
        rest = rest.lstrip()
        if kind == "path":
            yield from self._path(rest, event)
        elif " " not in rest and kind in ("setting", "setting value", "help"):
            yield from _settings(rest)
            if kind == "help":
                yield from (Completion(c.name, -len(rest), display_meta=c.help) for c in COMMANDS
                            if c.name.startswith(rest.lower()))
        elif kind == "setting value":
            setting_name, _, value = rest.partition(" ")
            try:
                setting = lookup(setting_name)
            except SettingError:
                return
            value = value.lstrip()
            if setting.path:
                yield from self._path(value, event)
            else:
                yield from (Completion(choice, -len(value)) for choice in setting.choices if choice.startswith(value))

    def _path(self, text: str, event: CompleteEvent) -> Iterable[Completion]:
        yield from self._paths.get_completions(Document(text, len(text)), event)


def _settings(prefix: str) -> Iterable[Completion]:
    prefix = prefix.lower()
    for s in TABLE:
        for name in (s.name, *s.aliases):
            if name.startswith(prefix) and (name == s.name or prefix):   # aliases only once typed into
                yield Completion(name, -len(prefix), display_meta=s.help if name == s.name else f"= {s.name}")
