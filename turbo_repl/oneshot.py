"""`turbo-repl run --prompt "…" [--set NAME=VALUE …]`: one video, recorded like a REPL run, then exit.

Exit status: 0 written, 1 the run failed, 2 bad options, 130 cancelled with Ctrl-C.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from turbo_repl.options import UsageError, add_common_arguments, open_session
from turbo_repl.repl import render, runner
from turbo_repl.session import RunError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="what the video shows")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    console, err = Console(highlight=False), Console(stderr=True, highlight=False)
    try:
        with console.status("loading the model…"):
            session, _, _ = open_session(args)
    except UsageError as e:
        render.error(err, str(e))
        return 2
    if session.engine.info.get("builtin"):
        render.note(err, f"{session.model} is the built-in model with untrained weights: its videos are noise "
                         "(turbo-repl download wan2.1-1.3b for real ones)")
    try:
        record = runner.generate(session, args.prompt, console)
    except (RunError, ValueError, MemoryError) as e:
        render.error(err, str(e))
        return 1
    return 0 if record is not None else 130
