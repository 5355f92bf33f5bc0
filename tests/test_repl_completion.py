"""The command language and tab completion (no model needed)."""

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from turbo_repl.repl.commands import CommandError, find, is_command, join_continued, split
from turbo_repl.repl.completion import ReplCompleter


def complete(text: str) -> list[str]:
    return [c.text for c in ReplCompleter().get_completions(Document(text), CompleteEvent(completion_requested=True))]


def test_commands_and_prompts_are_told_apart():
    assert is_command(":set seed 1") and is_command("/show") and is_command("  :help")
    assert not is_command("a fox: running") and not is_command("")
    assert split(":set  seed   42") == (find("set"), "seed   42")
    assert split("/SHOW")[0].name == "show"
    assert split(":q")[0].name == "quit" and split(":exit")[0].name == "quit"


@pytest.mark.parametrize("line, words", [(":sett seed 1", "unknown command :sett; did you mean :set?"),
                                         (":xyzzy", "unknown command :xyzzy; :help lists commands"),
                                         (":", "a command name must follow ':'")])
def test_unknown_commands_are_one_line(line, words):
    with pytest.raises(CommandError, match=words.replace("?", r"\?")):
        split(line)


def test_backslash_continues_a_line():
    assert join_continued(["a fox \\", "  in the snow\\", "at dawn"]) == "a fox in the snow at dawn"
    assert join_continued(["one line"]) == "one line"


def test_completes_command_names():
    assert complete(":") == ["set", "show", "reset", "image", "history", "replay", "save", "help", "quit"]
    assert complete(":s") == ["set", "show", "save"]
    assert complete("/he") == ["help"]
    assert complete("a fox") == []


def test_completes_setting_names_and_aliases_once_typed():
    assert complete(":set st") == ["steps"]
    assert "seed" in complete(":set ") and "num_steps" not in complete(":set ")
    assert complete(":set num_") == ["num_steps", "num_frames", "num_samples"]
    assert complete(":reset asp") == ["aspect", "aspect_ratio"]
    assert set(complete(":help s")) >= {"seed", "steps", "samples", "sigma_max", "set", "show", "save"}


def test_completes_choices_of_a_setting():
    assert complete(":set attention ") == ["auto", "sagesla", "sla", "original"]
    assert complete(":set attention s") == ["sagesla", "sla"]
    assert complete(":set ode o") == ["on", "off"]
    assert complete(":set resolution 7") == ["720p", "720"]
    assert complete(":set num_steps ") == ["1", "2", "3", "4"]
    assert complete(":set nonsense ") == []


def test_completes_file_paths(tmp_path, monkeypatch):
    (tmp_path / "frame.png").write_bytes(b"")
    (tmp_path / "fox.yaml").write_text("")
    (tmp_path / "pictures").mkdir()
    monkeypatch.chdir(tmp_path)
    assert complete(":image fr") == ["ame.png"]
    assert complete(":set image pic") == ["tures"]
    assert complete(":replay fo") == ["x.yaml"]
    assert sorted(complete(":image ")) == ["fox.yaml", "frame.png", "pictures"]
