"""The history file (append-only JSON lines, merged by run id) and session files."""

import json
import subprocess
import sys
import textwrap

import pytest

from turbo_repl.history import History, HistoryError, append_line, find_run, read_history, read_session, \
    write_session


def test_a_run_is_started_then_ended_and_readers_merge_the_lines(tmp_path):
    history = History(tmp_path / "state" / "history.jsonl")
    history.start({"id": "a1", "prompt": "a fox", "seed": 1})
    history.start({"id": "b2", "prompt": "a cat", "seed": 2})
    assert [r["status"] for r in history.records()] == ["running", "running"]
    history.end("a1", "finished", outputs=["x.mp4"])
    lines = (tmp_path / "state" / "history.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["id"] for line in lines)
    a, b = history.records()
    assert (a["id"], a["status"], a["prompt"], a["outputs"], a["seed"]) == ("a1", "finished", "a fox", ["x.mp4"], 1)
    assert "started" in a and "ended" in a
    assert (b["id"], b["status"]) == ("b2", "running")
    assert history.find("b")["prompt"] == "a cat"


def test_find_run_by_prefix(tmp_path):
    records = [{"id": "abc1"}, {"id": "abd2"}]
    assert find_run(records, "abc", "h")["id"] == "abc1"
    with pytest.raises(HistoryError, match="ambiguous"):
        find_run(records, "ab", "h")
    with pytest.raises(HistoryError, match="no run 'zz'"):
        find_run(records, "zz", "h")


def test_a_missing_history_file_reads_as_empty(tmp_path):
    assert read_history(tmp_path / "none.jsonl") == []


def test_a_line_cut_short_at_the_end_is_skipped_and_the_next_append_starts_a_new_line(tmp_path):
    path = tmp_path / "h.jsonl"
    append_line(path, {"id": "a", "prompt": "kept"})
    with open(path, "a") as f:
        f.write('{"id": "b", "prom')          # what a crash in the middle of a write would leave
    assert [r["id"] for r in read_history(path)] == ["a"]
    append_line(path, {"id": "c", "prompt": "after"})
    assert path.read_text().splitlines()[-1] == '{"id":"c","prompt":"after"}'
    with pytest.raises(HistoryError, match=r"h.jsonl:2 is not a turbo-repl run record; fix or delete that line"):
        read_history(path)


def test_a_corrupt_history_file_is_refused_with_one_line(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"id": "a"}\nthis is not json\n{"id": "b"}\n')
    with pytest.raises(HistoryError) as e:
        read_history(path)
    assert str(e.value) == f"{path}:2 is not a turbo-repl run record; fix or delete that line"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(HistoryError, match="cannot read history"):
        read_history(path)


def test_two_processes_appending_at_once_never_tear_a_line(tmp_path):
    path = tmp_path / "h.jsonl"
    writer = textwrap.dedent(f"""
        import sys
        from turbo_repl.history import append_line
        tag = sys.argv[1]
        for i in range(300):
            append_line({str(path)!r}, {{"id": f"{{tag}}{{i}}", "payload": tag * 5000}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", writer, tag]) for tag in "xy"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    records = read_history(path)
    assert len(records) == 600
    for r in records:
        assert r["payload"] == r["id"][0] * 5000


def test_session_files_round_trip_and_never_overwrite(tmp_path):
    runs = [{"id": "a1", "prompt": "a fox: in \"snow\"", "model": "tiny", "seed": 3, "settings": {"steps": 2},
             "frames_sha256": "ab" * 32}]
    path = tmp_path / "sessions" / "fox.yaml"
    write_session(path, runs)
    assert path.read_text().startswith("# turbo-repl session")
    assert read_session(path) == runs
    with pytest.raises(HistoryError, match="exists; choose another name"):
        write_session(path, runs + runs)
    assert read_session(path) == runs


def test_hand_written_session_files_need_only_prompts(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("- prompt: a fox\n- prompt: a cat\n  settings: {steps: 2}\n")
    assert [(r["id"], r["prompt"]) for r in read_session(path)] == [("mine-1", "a fox"), ("mine-2", "a cat")]


@pytest.mark.parametrize("text, words", [
    ("- prompt: [unclosed\n", "bad.yaml:2 is not valid YAML"),
    ("prompt: a fox\n", "not a session file: expected a YAML list of runs"),
    ("", "not a session file"),
    ("- seed: 3\n", "run 1 has no prompt"),
])
def test_corrupt_session_files_are_refused_with_one_line(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(HistoryError) as e:
        read_session(path)
    assert words in str(e.value) and "\n" not in str(e.value)
