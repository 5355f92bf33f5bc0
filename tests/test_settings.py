"""The settings table: names, aliases, validation, per-model defaults, sizes, round trips."""

import dataclasses

import pytest

from turbo_repl.models.registry import get_model, model_names
from turbo_repl.settings import ASPECTS, RESOLUTIONS, TABLE, SettingError, Settings, lookup, resolution_size


def test_settings_has_one_attribute_per_table_entry():
    assert [f.name for f in dataclasses.fields(Settings)] == [s.name for s in TABLE]
    assert [s.name for s in TABLE] == ["seed", "steps", "topk", "ode", "resolution", "aspect", "frames",
                                       "sigma_max", "samples", "attention", "quant", "boundary", "adaptive",
                                       "image", "fps", "output"]


@pytest.mark.parametrize("alias, name", [
    ("num_steps", "steps"), ("sla_topk", "topk"), ("num_frames", "frames"), ("attention_type", "attention"),
    ("num_samples", "samples"), ("aspect_ratio", "aspect"), ("adaptive_resolution", "adaptive"),
    ("quant_linear", "quant"), ("save_path", "output"), ("image_path", "image"), ("--num-steps", "steps"),
    ("STEPS", "steps"),
])
def test_turbodiffusion_names_are_aliases(alias, name):
    assert lookup(alias).name == name


def test_defaults_come_from_the_table_and_the_model():
    base = Settings.defaults()
    assert (base.steps, base.topk, base.boundary, base.fps, base.frames, base.resolution) == (4, 0.1, 0.9, 16, 81,
                                                                                             "480p")
    for name in model_names():
        s = Settings.defaults(name)
        for key, value in get_model(name).defaults.items():
            assert getattr(s, lookup(key).name) == value
    assert Settings.defaults("tiny").resolution == "128p"
    assert Settings.defaults("tiny-i2v").sigma_max == 200.0


@pytest.mark.parametrize("name, text, value", [
    ("seed", "42", 42), ("seed", "random", "random"), ("steps", "2", 2), ("topk", "1", 1.0), ("topk", ".15", 0.15),
    ("ode", "on", True), ("ode", "false", False), ("frames", "33", 33), ("frames", "1", 1),
    ("sigma_max", "200", 200.0), ("attention", "SageSLA", "sagesla"), ("quant", "on", "int8"),
    ("quant", "off", "off"), ("boundary", "0", 0.0), ("aspect", "9:16", "9:16"), ("resolution", "720", "720"),
    ("image", "none", None), ("output", "clips/{seed}-{sample}.mp4", "clips/{seed}-{sample}.mp4"),
])
def test_values_parse_to_typed_values(name, text, value):
    assert getattr(Settings.defaults("tiny").with_value(name, text), name) == value


@pytest.mark.parametrize("name, text, words", [
    ("steps", "5", "out of range 1–4"), ("steps", "two", "not a whole number"),
    ("topk", "0", "0 < x ≤ 1"), ("topk", "1.5", "0 < x ≤ 1"), ("frames", "80", "try 77 or 81"),
    ("frames", "0", "out of range"), ("seed", "-3", "≥ 0 or 'random'"), ("sigma_max", "nan", "> 0"),
    ("sigma_max", "0", "> 0"), ("samples", "0", "≥ 1"), ("boundary", "1.1", "0–1"), ("ode", "maybe", "on or off"),
    ("resolution", "1080p", "not one of"), ("aspect", "2:1", "not one of"), ("attention", "flash", "not one of"),
    ("image", "/no/such/picture.png", "no such file"), ("output", "{prompt}.mp4", "unknown placeholder {prompt}"),
    ("output", "  ", "empty"), ("fps", "0", "out of range"),
])
def test_bad_values_are_refused_with_one_line_and_change_nothing(name, text, words):
    s = Settings.defaults("tiny")
    with pytest.raises(SettingError) as e:
        s.with_value(name, text)
    message = str(e.value)
    assert words in message and message.startswith(f"{name}: ") and "\n" not in message
    assert s == Settings.defaults("tiny")


def test_unknown_names_suggest_the_closest():
    with pytest.raises(SettingError, match="did you mean fps"):
        lookup("fsp")
    with pytest.raises(SettingError, match=":help lists them"):
        lookup("colour")


def test_settings_are_immutable():
    s = Settings.defaults("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 2
    assert s.with_value("steps", "2").steps == 2 and s.steps == 4


def test_dict_round_trip_and_partial_dicts():
    s = Settings.defaults("tiny").with_values({"seed": "7", "ode": "on", "num_frames": "33", "aspect": "1:1"})
    assert Settings.from_dict(s.to_dict()) == s
    partial = Settings.from_dict({"steps": 2}, base=Settings.defaults("tiny"))
    assert partial == Settings.defaults("tiny").with_value("steps", "2")
    with pytest.raises(SettingError, match="unknown setting 'colour'"):
        Settings.from_dict({"colour": "red"})
    with pytest.raises(SettingError, match="mapping"):
        Settings.from_dict(["steps", 2])


def test_changed_lists_what_differs():
    base = Settings.defaults("tiny")
    assert base.with_values({"steps": "2", "seed": "1"}).changed(base) == ["seed", "steps"]


def test_resolution_table():
    assert resolution_size("480p", "16:9") == (832, 480)
    assert resolution_size("720", "16:9") == (1280, 704)
    assert resolution_size("512", "9:16") == (384, 640)
    assert {a: resolution_size("128p", a) for a in ASPECTS} == {
        "16:9": (224, 128), "9:16": (128, 224), "1:1": (160, 160), "4:3": (192, 144), "3:4": (144, 192)}
    for row in RESOLUTIONS.values():
        assert set(row) == set(ASPECTS)
        assert all(w % 16 == 0 and h % 16 == 0 for w, h in row.values())
    assert Settings.defaults("tiny").with_value("aspect", "1:1").size == (160, 160)


def test_readme_settings_table_is_the_tables_output():
    from pathlib import Path

    from turbo_repl.settings import markdown

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert markdown() in readme
