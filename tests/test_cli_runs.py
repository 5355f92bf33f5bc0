"""The turbo-repl program as people run it: one-shot `run`, `replay`, piped scripts, a terminal with Ctrl-C,
and a process killed mid-run. Real processes on the real tiny model."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from turbo_repl.history import read_history

FAST = ["--set", "steps=1", "--set", "frames=5"]


def environment(home: Path) -> dict:
    return {**os.environ, "XDG_STATE_HOME": str(home / "state"), "XDG_CONFIG_HOME": str(home / "config"),
            "TRITON_INTERPRET": "1", "COLUMNS": "200", "NO_COLOR": "1", "PROMPT_TOOLKIT_NO_CPR": "1"}


def turbo_repl(home: Path, *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "turbo_repl.cli", *args], cwd=home, env=environment(home),
                          input=stdin, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One `turbo-repl run`, shared by the tests that replay it."""
    home = tmp_path_factory.mktemp("home")
    result = turbo_repl(home, "run", "--prompt", "a heron standing in a river", "--set", "seed=7", *FAST)
    assert result.returncode == 0, result.stderr
    (record,) = read_history(home / "state" / "turbo-repl" / "history.jsonl")
    return home, result, record


def test_run_makes_one_video_and_records_it(made):
    home, result, record = made
    assert (record["status"], record["seed"], record["model"]) == ("finished", 7, "tiny")
    assert record["settings"]["steps"] == 1 and record["settings"]["frames"] == 5
    (output,) = record["outputs"]
    assert (home / output).is_file() and output.startswith("outputs/") and output.endswith("-7-a-heron-standing"
                                                                                         "-in-a-river.mp4")
    assert output in result.stdout
    assert "untrained weights: its videos are noise" in result.stderr
    versions = record["versions"]
    assert versions["turbo_repl"] and versions["torch"] and "triton" in versions and "gpu" in versions
    assert record["info"]["checkpoints"]


def test_replay_of_an_mp4_and_of_a_history_run_is_identical(made):
    home, _, record = made
    result = turbo_repl(home, "replay", record["outputs"][0])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"run {record['id']}: identical" in result.stdout and "1 of 1 run(s) identical" in result.stdout
    result = turbo_repl(home, "replay", "state/turbo-repl/history.jsonl", "--run", record["id"][:4])
    assert result.returncode == 0 and f"run {record['id']}: identical" in result.stdout


def test_replay_reports_a_difference_and_fails(made):
    home, _, record = made
    session = home / "changed.yaml"
    session.write_text(yaml.safe_dump([{**record, "prompt": "a heron flying"}]))
    result = turbo_repl(home, "replay", str(session))
    assert result.returncode == 1
    assert f"run {record['id']}: differs" in result.stdout and "of pixels differ" in result.stdout


@pytest.mark.parametrize("args, words", [
    (["replay", "missing.yaml"], "no such file: missing.yaml"),
    (["run", "--prompt", "x", "--set", "steps=7"], "steps: 7 is out of range 1–4"),
    (["run", "--prompt", "x", "--set", "steps"], "--set needs NAME=VALUE"),
    (["run", "--prompt", "x", "--model", "wan9"], "unknown model 'wan9'"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, args, words):
    result = turbo_repl(tmp_path, *args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0]


def test_piped_stdin_runs_as_a_script(tmp_path):
    script = "# a comment\n:set seed 11\n:set steps 1\n:set frames 5\na fox \\\n in the snow\n:set steps 9\n"
    result = turbo_repl(tmp_path, stdin=script)
    assert result.returncode == 1    # one line of the script failed
    assert "turbo> a fox in the snow" in result.stdout
    assert "error: steps: 9 is out of range 1–4" in result.stdout
    assert "built-in tiny model" in result.stdout and "turbo-repl download wan2.1-1.3b" in result.stdout
    (record,) = read_history(tmp_path / "state" / "turbo-repl" / "history.jsonl")
    assert (record["status"], record["seed"], record["prompt"]) == ("finished", 11, "a fox in the snow")
    assert (tmp_path / record["outputs"][0]).is_file()


def test_a_process_killed_mid_run_leaves_a_parseable_history_with_the_run_unfinished(tmp_path):
    history = tmp_path / "h.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "turbo_repl.cli", "run", "--prompt", "a slow fox", "--history",
                             str(history), "--set", "frames=65", "--set", "steps=4"], cwd=tmp_path,
                            env=environment(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (history.exists() and history.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (record,) = read_history(history)
    assert record["status"] == "running" and record["prompt"] == "a slow fox" and "ended" not in record


def test_ctrl_c_cancels_a_run_and_the_session_goes_on(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "turbo_repl.cli"], cwd=str(tmp_path), env=environment(tmp_path),
                          encoding="utf-8", timeout=90, dimensions=(40, 200))
    try:
        child.expect("turbo>")
        # long enough (65 latent frames) that the run is still going when Ctrl-C arrives, even on a busy machine
        child.sendline(":set frames 257")
        child.expect(r"frames = \S*257")
        child.expect("turbo>")          # type only at a prompt: keys sent while it redraws can be lost
        child.sendline("a long slow pan over a city")
        child.expect(r"step 1/4")
        child.sendcontrol("c")
        child.expect("cancelled")
        child.expect("turbo>")
        child.sendline(":set frames 5")
        child.expect(r"frames = \S*5")
        child.expect("turbo>")
        child.sendline("a short one")
        child.expect("✓")
        child.expect("turbo>")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    first, second = read_history(tmp_path / "state" / "turbo-repl" / "history.jsonl")
    assert (first["status"], first["prompt"]) == ("cancelled", "a long slow pan over a city")
    assert (second["status"], second["prompt"]) == ("finished", "a short one")
    assert (tmp_path / "state" / "turbo-repl" / "input-history").read_text().count("a short one") == 1
