"""A Hugging Face cache laid out on disk the way huggingface_hub lays it out, and a stand-in hub on loopback.

The stand-in answers the two requests huggingface_hub makes for a file (HEAD, then GET on
`/{repo}/resolve/{revision}/{file}`) with the headers the real hub sends, and refuses unknown repos (401
RepoNotFound) and unknown files (404 EntryNotFound) as the real hub does. It records every request, so a test can
assert that nothing was asked of it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REVISION = "0123456789abcdef0123456789abcdef01234567"

# `turbo_repl.cli` builds the REPL's parser too; until the REPL module exists, run the subcommand's own
# add_arguments/run pair exactly as cli.main would.
_LAUNCH = (["-m", "turbo_repl.cli"] if importlib.util.find_spec("turbo_repl.repl.app") else
           ["-c", "import argparse, importlib, sys; from turbo_repl.cli import SUBCOMMANDS; "
                  "m = importlib.import_module(SUBCOMMANDS[sys.argv[1]][0]); p = argparse.ArgumentParser(); "
                  "m.add_arguments(p); sys.exit(m.run(p.parse_args(sys.argv[2:])))"])


def run_cli(tmp_path: Path, *args: str, **hf_env: str) -> subprocess.CompletedProcess:
    """`turbo-repl ARGS` in a fresh process, so that huggingface_hub reads this environment when it is imported:
    a hub cache and HF home under `tmp_path`, no token, no telemetry, wide uncoloured output, plus `hf_env`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_CACHE=str(Path(tmp_path) / "hub"), HF_HOME=str(Path(tmp_path) / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1", COLUMNS="250", NO_COLOR="1", **hf_env)
    return subprocess.run([sys.executable, *_LAUNCH, *args], env=env, capture_output=True, text=True, timeout=120)


def content_of(repo: str, filename: str) -> bytes:
    """Small, distinct bytes for every file, so a test can tell which file landed where."""
    return f"{repo}/{filename}\n".encode() * 7


def put_in_cache(cache: Path, repo: str, filename: str, data: bytes | None = None, revision: str = REVISION) -> Path:
    """Store one file as huggingface_hub does: a blob named by its hash, a snapshot symlink, refs/main."""
    data = content_of(repo, filename) if data is None else data
    folder = Path(cache) / ("models--" + repo.replace("/", "--"))
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = folder / "snapshots" / revision / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    return link


class FakeHub:
    """Serves `files` {(repo, filename): bytes}; `sizes` may claim a different size in HEAD answers."""

    def __init__(self, files: dict[tuple[str, str], bytes], sizes: dict[tuple[str, str], int] | None = None):
        self.files, self.sizes = files, sizes or {}
        self.requests: list[tuple[str, str]] = []     # (method, path)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fetched(self) -> list[str]:
        """Paths of every GET, i.e. every file actually transferred."""
        return [path for method, path in self.requests if method == "GET"]

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((handler.command, handler.path))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", handler.path)
        repo, filename = (m.group(1), m.group(3)) if m else (None, None)
        if not m or not any(r == repo for r, _ in self.files):
            return self._refuse(handler, 401, "RepoNotFound")
        if (repo, filename) not in self.files:
            return self._refuse(handler, 404, "EntryNotFound")
        data = self.files[(repo, filename)]
        start = 0
        if body and (rng := re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range", ""))):
            start = int(rng.group(1))
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", REVISION)
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        size = len(data) - start if body else self.sizes.get((repo, filename), len(data))
        handler.send_header("Content-Length", str(size))
        handler.end_headers()
        if body:
            handler.wfile.write(data[start:])

    @staticmethod
    def _refuse(handler: BaseHTTPRequestHandler, status: int, code: str) -> None:
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Repo-Commit", REVISION)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
