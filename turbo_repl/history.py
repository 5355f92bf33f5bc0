"""Run records: the append-only history file and session files.

The history file is JSON lines. A run appends a "started" line before it runs and an "ended" line with the
same id when it finishes, fails or is cancelled; readers merge the lines of one id. Each line is one
`os.write` on an O_APPEND descriptor under an exclusive lock, then fsync'ed, so a killed process leaves a
parseable file (its run stays "running") and two processes appending never tear each other's lines.

A session file (YAML) is a list of run records, written by `:save` and read by `replay`.
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import yaml

try:
    import fcntl
except ImportError:   # Windows: O_APPEND alone keeps lines whole there too
    fcntl = None


class HistoryError(ValueError):
    """A history or session file cannot be read; the message names the file (and line) and what to do."""


def new_run_id() -> str:
    return secrets.token_hex(4)


def now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


@contextmanager
def _locked_append(path: Path) -> Iterator[int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)   # closing releases the lock


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def append_line(path: Path, obj: dict) -> None:
    """Append one JSON line atomically and durably."""
    line = json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"
    with _locked_append(Path(path)) as fd:
        if not _ends_with_newline(Path(path)):   # a torn tail (power loss, full disk) stays on its own line
            line = "\n" + line
        data = line.encode()
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path} ({written} of {len(data)} bytes): is the disk full?")
        os.fsync(fd)


def read_history(path: Path) -> list[dict]:
    """Run records of a history file, merged by id, oldest first. An unfinished run has status "running"."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise HistoryError(f"cannot read history {path}: {e}") from None
    runs: dict[str, dict] = {}
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            run_id = entry.pop("id")
            entry.pop("event", None)
        except (ValueError, KeyError, AttributeError, TypeError):
            if number == len(lines) and not text.endswith("\n"):
                continue   # a line cut short by a crash: the run stays "running"
            raise HistoryError(f"{path}:{number} is not a turbo-repl run record; fix or delete that line") from None
        runs.setdefault(run_id, {"id": run_id}).update(entry)
    return list(runs.values())


class History:
    """The history file of one process: `start` a run, then `end` it."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def start(self, record: dict) -> dict:
        """Record that a run started; returns the fields this added (status, start time)."""
        added = {"status": "running", "started": now()}
        append_line(self.path, {"event": "started", **record, **added})
        return added

    def end(self, run_id: str, status: str, **fields) -> None:
        append_line(self.path, {"id": run_id, "event": "ended", "status": status, "ended": now(), **fields})

    def records(self) -> list[dict]:
        return read_history(self.path)

    def find(self, id_prefix: str) -> dict:
        return find_run(self.records(), id_prefix, str(self.path))


def find_run(records: list[dict], id_prefix: str, where: str) -> dict:
    matches = [r for r in records if str(r.get("id", "")).startswith(id_prefix)]
    if not matches:
        raise HistoryError(f"no run {id_prefix!r} in {where} (:history lists run ids)")
    if len(matches) > 1:
        raise HistoryError(f"run id {id_prefix!r} is ambiguous in {where}: "
                           f"{', '.join(r['id'] for r in matches[:5])}")
    return matches[0]


# --- session files -----------------------------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:   # write shared values out in full, never as &anchors
        return True


SESSION_HEADER = "# turbo-repl session: regenerate and compare with `turbo-repl replay {path}`\n"


def write_session(path: Path, records: list[dict]) -> None:
    """Write runs to a new session file; an existing file is never overwritten."""
    path = Path(path)
    if path.exists():
        raise HistoryError(f"{path} exists; choose another name or delete it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = SESSION_HEADER.format(path=path) + yaml.dump(records, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    with open(path, "x", encoding="utf-8") as f:
        f.write(text)


def read_session(path: Path) -> list[dict]:
    """Runs of a session file: a YAML list of records, each with at least a prompt."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise HistoryError(f"cannot read session {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise HistoryError(f"{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, list) or not data:
        raise HistoryError(f"{path} is not a session file: expected a YAML list of runs")
    for i, run in enumerate(data, 1):
        if not isinstance(run, dict) or not isinstance(run.get("prompt"), str):
            raise HistoryError(f"{path}: run {i} has no prompt; each run needs at least `prompt:`")
        run.setdefault("id", f"{path.stem}-{i}")
    return data
