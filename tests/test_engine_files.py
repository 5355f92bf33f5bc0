"""The engine's checkpoint path: a model described in a user models file, loaded from a checkpoint folder in the
reference formats, gives exactly the videos of the same weights built in."""

import re

import pytest
import torch
import yaml

from turbo_repl.engine import Engine, Request
from turbo_repl.models import registry
from turbo_repl.models.linear import quantize_state_dict
from turbo_repl.settings import Settings

PROMPT = "a lighthouse on a cliff at dusk, waves below"


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    """`my-tiny`: the tiny architecture, with its weights in files named as TurboDiffusion and Wan name theirs."""
    builtin = Engine("tiny")
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    c = builtin.components
    torch.save(c.experts[0].state_dict(), folder / "my-dit.pth")
    torch.save(quantize_state_dict(c.experts[0].state_dict()), folder / "my-dit-quant.pth")
    torch.save(c.vae.state_dict(), folder / "my-vae.pth")
    torch.save(c.text_encoder.encoder.state_dict(), folder / "my-t5.pth")
    tiny = registry.get_model("tiny")
    models_file = tmp_path / "models.yaml"
    models_file.write_text(yaml.safe_dump({
        "text_encoders": {"my-t5": {"arch": tiny.text_encoder.arch, "text_len": tiny.text_encoder.text_len,
                                    "tokenizer": {"kind": "bytes"},
                                    "checkpoint": {"repo": "me/t5", "file": "my-t5.pth"}}},
        "vaes": {"my-vae": {"arch": tiny.vae.arch, "checkpoint": {"repo": "me/vae", "file": "my-vae.pth"}}},
        "models": {"my-tiny": {"task": "t2v", "dit": tiny.dit_name, "text_encoder": "my-t5", "vae": "my-vae",
                               "experts": {"main": {"repo": "me/dit", "file": "my-dit.pth",
                                                    "quant_file": "my-dit-quant.pth"}},
                               "defaults": tiny.defaults}},
    }))
    monkeypatch.setenv("TURBO_REPL_MODELS", str(models_file))
    registry.reload()
    yield builtin, folder
    monkeypatch.delenv("TURBO_REPL_MODELS")
    registry.reload()


def test_user_model_loads_from_files_and_matches_builtin(user_model):
    builtin, folder = user_model
    engine = Engine("my-tiny", checkpoint_dir=folder)
    assert engine.components.sparse            # proj_l keys in the file -> SLA modules
    assert set(engine.info["checkpoints"]) == {"main", "vae", "text_encoder"}
    s = Settings.defaults("tiny").with_values({"frames": "5", "steps": "2", "attention": "sla"})
    ours = engine.generate(Request(PROMPT, s, 9)).frames
    assert torch.equal(ours, builtin.generate(Request(PROMPT, s, 9)).frames)


def test_int8_checkpoint_made_the_reference_way_runs_like_quantising_at_load(user_model):
    """A -quant.pth (TurboDiffusion's int8 layout) loads into int8 linears and gives the video that converting the
    bf16 weights at load gives: the same quantiser made both."""
    builtin, folder = user_model
    engine = Engine("my-tiny", checkpoint_dir=folder, quant="int8")
    assert engine.components.quant == "int8" == engine.components.native_quant
    s = Settings.defaults("tiny").with_values({"frames": "5", "steps": "1", "attention": "sla"})
    ours = engine.generate(Request(PROMPT, s, 2))
    assert ours.info["quant"] == "int8"
    assert torch.equal(ours.frames, builtin.generate(Request(PROMPT, s.with_value("quant", "int8"), 2)).frames)


def test_auto_takes_the_int8_checkpoint_when_only_it_was_downloaded(user_model):
    _, folder = user_model
    (folder / "my-dit.pth").unlink()
    engine = Engine("my-tiny", checkpoint_dir=folder)
    assert engine.components.quant == "int8"
    with pytest.raises(ValueError, match="my-dit.pth.*turbo-repl download my-tiny"):
        engine.generate(Request(PROMPT, Settings.defaults("tiny").with_values({"frames": "5", "quant": "off"}), 0))
    s = Settings.defaults("tiny").with_values({"frames": "5", "steps": "1"})
    assert engine.generate(Request(PROMPT, s, 0)).info["quant"] == "int8"   # still usable after the refusal


def test_missing_checkpoint_names_the_file_and_the_command(user_model, tmp_path):
    _, folder = user_model
    (folder / "my-vae.pth").unlink()
    with pytest.raises(ValueError, match="my-vae.pth.*turbo-repl download my-tiny"):
        Engine("my-tiny", checkpoint_dir=folder)


@pytest.mark.parametrize("text, says", [("models: [unclosed\n", "not valid YAML"),
                                        ("- my-model\n", "must be a mapping")])
def test_broken_user_models_file_is_one_clear_error(tmp_path, monkeypatch, text, says):
    bad = tmp_path / "models.yaml"
    bad.write_text(text)
    monkeypatch.setenv("TURBO_REPL_MODELS", str(bad))
    registry.reload()
    try:
        with pytest.raises(ValueError, match=f"{re.escape(str(bad))}.*{says}"):
            registry.get_model("tiny")
    finally:
        monkeypatch.delenv("TURBO_REPL_MODELS")
        registry.reload()


def test_quant_auto_returns_to_what_the_files_hold_after_starting_with_fp8(user_model):
    """Starting with `quant fp8` quantises the bf16 checkpoint at load; `quant auto` afterwards means what a fresh
    engine's auto means (the bf16 weights as they are), so that runs recorded with `auto` replay identically."""
    builtin, folder = user_model
    engine = Engine("my-tiny", checkpoint_dir=folder, quant="fp8")
    s = Settings.defaults("tiny").with_values({"frames": "5", "steps": "1", "attention": "sla"})
    video = engine.generate(Request(PROMPT, s, 4))
    assert video.info["quant"] == "off"
    assert torch.equal(video.frames, builtin.generate(Request(PROMPT, s, 4)).frames)


def test_records_name_the_checkpoint_the_experts_were_reloaded_from(user_model):
    from turbo_repl.models.checkpoint import fingerprint

    _, folder = user_model
    engine = Engine("my-tiny", checkpoint_dir=folder, quant="int8")
    assert engine.info["checkpoints"]["main"] == fingerprint(folder / "my-dit-quant.pth")
    s = Settings.defaults("tiny").with_values({"frames": "5", "steps": "1", "quant": "off"})
    assert engine.generate(Request(PROMPT, s, 1)).info["checkpoints"]["main"] == fingerprint(folder / "my-dit.pth")
