"""`turbo-repl replay FILE [--run ID]`: regenerate recorded runs and say whether the frames came out identical.

FILE is a session file (YAML), a history file (JSON lines) or an mp4 made by turbo-repl (its record is read
from the mp4's metadata). Exit status 0 when every run is identical, 1 when any differs or fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from turbo_repl.history import HistoryError, find_run, read_history, read_session
from turbo_repl.options import UsageError, add_common_arguments, open_session
from turbo_repl.video import VideoError, read_record


def load_runs(path: Path, run_id: str | None = None) -> list[dict]:
    """The run records in a session file, history file or turbo-repl mp4 (optionally one run, by id prefix)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HistoryError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix in (".mp4", ".mov", ".m4v"):
        record = read_record(path)
        outputs = list(record.get("outputs") or [str(path)])
        sample = record.get("sample", 0)
        if sample < len(outputs):
            outputs[sample] = str(path)   # compare with the file in hand, wherever it was moved to
        record["outputs"] = outputs
        records = [record]
    elif suffix in (".yaml", ".yml"):
        records = read_session(path)
    else:
        records = read_history(path)
        records = [r for r in records if r.get("status") == "finished" or run_id]
        if not records:
            raise HistoryError(f"{path} holds no finished run to replay")
    if run_id:
        records = [find_run(records, run_id, str(path))]
    return records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="session file (.yaml), history file (.jsonl) or mp4 made by turbo-repl")
    parser.add_argument("--run", metavar="ID", help="replay only this run (an id or its first characters)")
    add_common_arguments(parser, runs=False)


def run(args: argparse.Namespace) -> int:
    from turbo_repl.repl.render import error
    from turbo_repl.repl.runner import replay_all

    console, err = Console(highlight=False), Console(stderr=True, highlight=False)
    try:
        records = load_runs(args.file, args.run)
    except (HistoryError, VideoError) as e:
        error(err, str(e))
        return 2
    verdicts = []
    by_model: dict[str, list[dict]] = {}
    for record in records:
        by_model.setdefault(args.model or record.get("model") or "tiny", []).append(record)
    for model, group in by_model.items():
        try:
            with console.status(f"loading {model}…"):
                session, _, _ = open_session(args, model=model)
        except UsageError as e:
            error(err, str(e))
            return 2
        verdicts += replay_all(session, group, console)
        if any(v.status == "cancelled" for v in verdicts):
            return 130
    identical = sum(v.status == "identical" for v in verdicts)
    console.print(f"{identical} of {len(verdicts)} run(s) identical")
    return 0 if all(v.ok for v in verdicts) else 1

