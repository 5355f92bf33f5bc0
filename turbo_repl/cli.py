"""Command line: `turbo-repl` (the REPL) and its subcommands.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their subcommand runs, so `turbo-repl doctor` never pays for the REPL.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). `None` is the REPL, run when no subcommand is given.
SUBCOMMANDS: dict[str | None, tuple[str, str]] = {
    None: ("turbo_repl.repl.app", "interactive session (default)"),
    "run": ("turbo_repl.oneshot", "generate one video from --prompt and exit"),
    "replay": ("turbo_repl.replay", "regenerate the runs of a session file, history file or mp4 and compare"),
    "download": ("turbo_repl.models.download", "fetch a model's checkpoints from the Hugging Face hub"),
    "doctor": ("turbo_repl.doctor", "report GPU, versions, checkpoints and the backends that work here"),
    "parity": ("turbo_repl.parity", "check turbo-repl against golden fixtures made by the reference code"),
    "bench": ("turbo_repl.bench", "time the real architectures at real shapes on this GPU"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of `command` (None: the REPL's) — only that module is imported."""
    from turbo_repl import __version__

    parser = argparse.ArgumentParser(prog="turbo-repl", description="Few-step Wan video generation in a terminal.")
    parser.add_argument("--version", action="version", version=f"turbo-repl {__version__}")
    if command is None:
        importlib.import_module(SUBCOMMANDS[None][0]).add_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if name is not None:
            sub.add_parser(name, help=help_text, description=help_text).set_defaults(_module=module)
    if command is not None:
        sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        importlib.import_module(SUBCOMMANDS[command][0]).add_arguments(sub_action.choices[command])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The first word that names a subcommand chooses it (options come after it: `turbo-repl run --prompt …`).
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    args = build_parser(command).parse_args(argv)
    module = importlib.import_module(getattr(args, "_module", SUBCOMMANDS[None][0]))
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
