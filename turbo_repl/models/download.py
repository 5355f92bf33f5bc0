"""`turbo-repl download MODEL`: fetch exactly the files a model needs from the Hugging Face hub.

Files already present are never fetched again (and cost no request); the rest go through huggingface_hub
(resumable, with its progress bars) into its cache, or into a flat checkpoint folder with `--checkpoint-dir`.
`HF_HUB_OFFLINE=1` is honoured: then this only reports what is present and what is missing. Only the tokenizer
files of `google/umt5-xxl` are fetched, never its weights.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from turbo_repl.models.locate import NeededFile, fetch_command, find_in_cache, find_in_folder, needed_files
from turbo_repl.models.registry import get_model, model_names


@dataclass
class Entry:
    """One needed file and what is known about it."""

    need: NeededFile
    path: Path | None = None      # where it is (or will be linked from, for "in cache")
    size: int | None = None
    status: str = "to fetch"      # present | in cache | to fetch | fetched | copied | missing
    reason: str = ""              # why it is missing


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", help=f"one of: {', '.join(model_names())}")
    parser.add_argument("--quant", action="store_true", help="the int8 (-quant.pth) DiT checkpoints instead of bf16")
    parser.add_argument("--dry-run", action="store_true", help="list the files and their sizes; fetch nothing")
    parser.add_argument("--checkpoint-dir", type=Path, metavar="DIR",
                        help="put the files in this flat folder instead of the Hugging Face cache")


def run(args) -> int:
    out, err = Console(), Console(stderr=True, highlight=False)
    try:
        spec = get_model(args.model)
    except KeyError as e:
        err.print(e.args[0], markup=False)
        return 2
    if spec.builtin:
        out.print(f"'{spec.name}' is built in: it needs no files")
        return 0
    try:
        needs = needed_files(spec, args.quant)
    except ValueError as e:
        err.print(str(e), markup=False)
        return 2
    target = args.checkpoint_dir.expanduser() if args.checkpoint_dir else None
    entries = [_look(need, target) for need in needs]

    offline = _offline()
    for e in entries:
        if e.status != "to fetch":
            continue
        if offline:
            e.status, e.reason = "missing", "not here, and HF_HUB_OFFLINE is set: unset it to download"
        else:
            _ask_size(e)
    for e in entries:
        if e.status == "missing":
            err.print(f"error: {e.need.hub_path}: {e.reason}", markup=False)

    if args.dry_run:
        _table(out, spec.name, entries, target)
        return 1 if any(e.status == "missing" for e in entries) else 0

    short = _space_shortfall(entries, target)
    if short:
        err.print(short, markup=False)
        return 1
    for e in entries:
        if e.status == "in cache":
            _copy_from_cache(e, target, err)
        elif e.status == "to fetch":
            _fetch(e, target, out, err)

    _table(out, spec.name, entries, target)
    missing = [e for e in entries if e.status == "missing"]
    if missing:
        out.print(f"{len(missing)} of {len(entries)} files of '{spec.name}' are missing; when the cause above is "
                  f"fixed, run again: {fetch_command(spec.name, args.quant, target)}", markup=False)
        return 1
    out.print(f"all {len(entries)} files of '{spec.name}' are here", markup=False)
    return 0


def _look(need: NeededFile, target: Path | None) -> Entry:
    """Where the file already is: the target itself, or (for a folder target) the cache it can be copied from."""
    here = find_in_folder(need, target) if target else find_in_cache(need)
    if here:
        return Entry(need, here, here.stat().st_size, "present")
    cached = find_in_cache(need) if target else None
    if cached:
        return Entry(need, cached, cached.stat().st_size, "in cache")
    return Entry(need)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _ask_size(e: Entry) -> None:
    """Ask the hub for the file's size; a refusal (404, 401, no network) marks the file missing."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        e.size = get_hf_file_metadata(hf_hub_url(e.need.repo, e.need.filename)).size
    except Exception as exc:   # noqa: BLE001 — every failure becomes one line, see explain()
        e.status, e.reason = "missing", explain(exc, e.need)


def _space_shortfall(entries: list[Entry], target: Path | None) -> str | None:
    need = sum(e.size or 0 for e in entries if e.status == "to fetch")
    if not need:
        return None
    from huggingface_hub import constants

    where = Path(target or constants.HF_HUB_CACHE)
    probe = next(p for p in [where, *where.parents] if p.exists())
    free = shutil.disk_usage(probe).free
    if need <= free:
        return None
    return (f"not enough disk space in {where}: the missing files need {_human(need)}, {_human(free)} is free; "
            "free some space or choose a folder on a bigger disk with --checkpoint-dir")


def _fetch(e: Entry, target: Path | None, out: Console, err: Console) -> None:
    from huggingface_hub import hf_hub_download

    out.print(f"fetching {e.need.hub_path} ({_human(e.size)})", markup=False)
    try:
        if target is None:
            e.path = Path(hf_hub_download(e.need.repo, e.need.filename))
        else:
            dest = target / e.need.local_name
            got = Path(hf_hub_download(e.need.repo, e.need.filename, local_dir=dest.parent))
            if got != dest:   # a file in a repo subfolder still lands flat in the folder
                os.replace(got, dest)
            e.path = dest
        e.status, e.size = "fetched", e.path.stat().st_size
    except Exception as exc:   # noqa: BLE001
        e.status, e.reason = "missing", explain(exc, e.need)
        err.print(f"error: {e.need.hub_path}: {e.reason}", markup=False)


def _copy_from_cache(e: Entry, target: Path, err: Console) -> None:
    """A file the cache already holds goes into the folder by hard link (free) or copy, not over the network."""
    dest = target / e.need.local_name
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".incomplete")
        try:
            os.link(e.path.resolve(), partial)
        except OSError:
            shutil.copyfile(e.path, partial)
        os.replace(partial, dest)
        e.path, e.status = dest, "copied"
    except OSError as exc:
        e.status, e.reason = "missing", explain(exc, e.need)
        err.print(f"error: {e.need.hub_path}: {e.reason}", markup=False)


def explain(exc: BaseException, need: NeededFile) -> str:
    """One line that says what went wrong fetching `need` and what to do about it."""
    from huggingface_hub import constants
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "the disk is full: free some space, or choose a folder on a bigger disk with --checkpoint-dir"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError):
        return (f"{need.repo} is gated (HTTP {status}): accept its terms at {constants.ENDPOINT}/{need.repo}, "
                "then log in with `hf auth login` or set HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):
        return (f"repository {need.repo} not found, or private and you are not logged in (HTTP {status}): "
                "check the name, or log in with `hf auth login` / set HF_TOKEN")
    if status == 404:
        return f"{need.repo} has no file {need.filename} (HTTP 404)"
    if status in (401, 403):
        return f"access to {need.repo} denied (HTTP {status}): log in with `hf auth login` or set HF_TOKEN"
    if status is not None:
        return f"the hub answered HTTP {status}; try again later"
    cause = _network_cause(exc)
    if cause is not None:
        return (f"cannot reach {constants.ENDPOINT} ({type(cause).__name__}): check the network, a proxy or "
                "HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only what is here")
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no details'}"


def _network_cause(exc: BaseException) -> BaseException | None:
    """The connection error behind `exc` (huggingface_hub wraps them), if it is one."""
    names = {"TransportError", "ConnectionError", "Timeout", "TimeoutException"}
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)) or \
                any(c.__name__ in names for c in type(exc).__mro__):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _table(out: Console, model: str, entries: list[Entry], target: Path | None) -> None:
    table = Table(title=f"{model} → {target or 'Hugging Face cache'}", title_justify="left")
    for column in ("file", "size", "status", "path"):
        table.add_column(column, overflow="fold")
    styles = {"present": "green", "fetched": "green", "copied": "green", "in cache": "cyan", "to fetch": "yellow",
              "missing": "red"}
    for e in entries:
        table.add_row(e.need.hub_path, _human(e.size), f"[{styles[e.status]}]{e.status}[/]",
                      str(e.path or ""))
    out.print(table)
    total = sum(e.size or 0 for e in entries if e.status == "to fetch")
    if total:
        out.print(f"to fetch: {_human(total)}", markup=False)


def _human(size: int | None) -> str:
    if size is None:
        return "?"
    if size < 1000:
        return f"{size} B"
    for unit in ("KB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            return f"{size:.2f} {unit}"
