"""The user config file laid over configs/defaults.yaml, and the options that pick a model."""

import argparse

import pytest

from turbo_repl.config import ConfigError, load_config
from turbo_repl.options import UsageError, add_common_arguments, choose_model, parse_assignments


@pytest.fixture
def xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path


def write_config(xdg, text: str):
    path = xdg / "config" / "turbo-repl" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_without_a_user_file(xdg):
    config = load_config()
    assert config["model"] == "auto" and config["settings"] == {}
    assert config["history"] == xdg / "state" / "turbo-repl" / "history.jsonl"
    assert config["input_history"] == xdg / "state" / "turbo-repl" / "input-history"


def test_a_user_file_overrides_key_by_key(xdg):
    write_config(xdg, "model: tiny\nhistory: ~/runs.jsonl\nsettings:\n  steps: 2\n  output: clips/{seed}.mp4\n")
    config = load_config()
    assert config["model"] == "tiny" and config["settings"] == {"steps": 2, "output": "clips/{seed}.mp4"}
    assert config["history"].name == "runs.jsonl" and "~" not in str(config["history"])
    assert config["input_history"] == xdg / "state" / "turbo-repl" / "input-history"


@pytest.mark.parametrize("text, words", [
    ("model: [tiny\n", "cannot read"),
    ("- tiny\n", "must be a mapping"),
    ("modle: tiny\n", "unknown key 'modle'"),
])
def test_a_bad_user_file_is_one_line(xdg, text, words):
    path = write_config(xdg, text)
    with pytest.raises(ConfigError) as e:
        load_config()
    assert str(path) in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_set_options_parse_and_refuse_without_equals():
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    args = parser.parse_args(["--set", "seed=7", "--set", "output=a=b.mp4", "--model", "tiny"])
    assert parse_assignments(args.set) == {"seed": "7", "output": "a=b.mp4"}
    with pytest.raises(UsageError, match="--set needs NAME=VALUE, got 'seed'"):
        parse_assignments(["seed"])


def test_model_choice(tmp_path):
    assert choose_model("tiny-i2v", None).name == "tiny-i2v"
    with pytest.raises(UsageError, match="unknown model 'wan9'"):
        choose_model("wan9", None)
    # No GPU here, or no wan2.1-1.3b files in an empty folder and the cache: auto falls back to tiny, saying why.
    auto = choose_model("auto", tmp_path)
    assert auto.name == "tiny" and auto.reason
