"""Text-to-video and image-to-video on the tiny models, end to end through the Engine."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from turbo_repl.engine import Cancelled, Engine, Request
from turbo_repl.engine import pipeline as pl
from turbo_repl.settings import Settings

PROMPT = "a red fox running through fresh snow, cinematic"


@pytest.fixture(scope="module")
def t2v():
    return Engine("tiny")


@pytest.fixture(scope="module")
def i2v():
    return Engine("tiny-i2v")


def small(model, **values):
    s = Settings.defaults(model).with_values({"frames": "5", "attention": "original", **values})
    return s


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_t2v_makes_frames_of_the_requested_size(t2v):
    s = small("tiny", steps="2")
    video = t2v.generate(Request(PROMPT, s, 3))
    width, height = s.size
    assert video.frames.shape == (1, 5, height, width, 3)
    assert video.frames.dtype == torch.uint8
    assert video.frames.float().std() > 1   # not a constant image
    assert set(video.timings) >= {"text encoder", "denoise", "vae decode", "total"}
    assert video.info["attention"] == "original"


@pytest.mark.parametrize("ode", ["on", "off"])
def test_same_seed_same_frames(t2v, ode):
    s = small("tiny", steps="2", ode=ode)
    a = t2v.generate(Request(PROMPT, s, 11)).frames
    b = t2v.generate(Request(PROMPT, s, 11)).frames
    c = t2v.generate(Request(PROMPT, s, 12)).frames
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_samples_share_one_noise_stream(t2v):
    """Like the reference, N samples are one batch drawn from one generator: sample 0 of a 2-sample run is not
    the 1-sample video of the same seed, and the two samples differ."""
    two = t2v.generate(Request(PROMPT, small("tiny", steps="1", samples="2"), 5)).frames
    one = t2v.generate(Request(PROMPT, small("tiny", steps="1"), 5)).frames
    assert two.shape[0] == 2 and not torch.equal(two[0], two[1])
    assert two[0].shape == one[0].shape


def test_t2v_refuses_an_image(t2v, image):
    with pytest.raises(ValueError, match="text-to-video"):
        t2v.generate(Request(PROMPT, small("tiny", image=image), 0))


def test_i2v_needs_an_image(i2v):
    with pytest.raises(ValueError, match=":image"):
        i2v.generate(Request(PROMPT, small("tiny-i2v"), 0))


def test_i2v_end_to_end(i2v, image):
    s = small("tiny-i2v", image=image, steps="3")
    video = i2v.generate(Request(PROMPT, s, 1))
    width, height = s.size
    assert video.frames.shape == (1, 5, height, width, 3)
    assert torch.equal(video.frames, i2v.generate(Request(PROMPT, s, 1)).frames)


@pytest.mark.parametrize("steps,expected", [(1, [0]), (2, [0, 0]), (3, [0, 0, 1]), (4, [0, 0, 1, 1])])
def test_i2v_switches_expert_at_the_boundary(i2v, image, steps, expected):
    calls = []
    handles = [net.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, net in enumerate(i2v.components.experts)]
    try:
        i2v.generate(Request(PROMPT, small("tiny-i2v", image=image, steps=str(steps)), 0))
    finally:
        for h in handles:
            h.remove()
    assert calls == expected


def test_cancel_between_steps_leaves_the_engine_usable(t2v):
    cancel = threading.Event()
    seen = []

    def progress(stage, done, total):
        seen.append((stage, done))
        if stage == "denoise" and done == 1:
            cancel.set()

    s = small("tiny", steps="4")
    with pytest.raises(Cancelled):
        t2v.generate(Request(PROMPT, s, 0), progress=progress, cancel=cancel)
    assert ("denoise", 2) not in seen and not any(stage == "vae decode" for stage, _ in seen)
    after = t2v.generate(Request(PROMPT, s, 0)).frames
    assert torch.equal(after, t2v.generate(Request(PROMPT, s, 0)).frames)


def test_cancel_during_vae_decode(t2v):
    cancel = threading.Event()

    def progress(stage, done, total):
        if stage == "vae decode" and done == 1:
            cancel.set()

    with pytest.raises(Cancelled):
        t2v.generate(Request(PROMPT, small("tiny", steps="1"), 0), progress=progress, cancel=cancel)


@pytest.mark.parametrize("image_wh,expected", [
    # the reference's own examples at 720p (engine-facts §7.2)
    ((1024, 768), (1104, 832)), ((1920, 1080), (1280, 720)), ((1000, 1000), (960, 960)),
])
def test_adaptive_resolution_matches_reference_examples(image_wh, expected):
    assert pl.adaptive_size(*image_wh, area=1280 * 720) == expected


@pytest.mark.parametrize("w,h", [(640, 480), (333, 777), (1080, 1920), (500, 499), (4000, 300)])
def test_adaptive_resolution_rule(w, h):
    """Area kept, aspect followed, each side rounded half-to-even to a multiple of 16."""
    area = 832 * 480
    out_w, out_h = pl.adaptive_size(w, h, area)
    assert out_w % 16 == 0 and out_h % 16 == 0
    ideal_w, ideal_h = (area * w / h) ** 0.5, (area * h / w) ** 0.5
    assert abs(out_w - ideal_w) <= 8 and abs(out_h - ideal_h) <= 8
    assert out_w == 16 * round(ideal_w / 16) and out_h == 16 * round(ideal_h / 16)


def test_frames_must_be_4k_plus_1():
    job = pl.Job(prompt="x", width=224, height=128, frames=8, steps=1, sigma_max=80, ode=False, samples=1, seed=0)
    with pytest.raises(ValueError, match="4k\\+1"):
        pl.latent_shape(job)


def test_uint8_conversion_rounds_half_up_and_clamps():
    video = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, (2 * 127.5 / 255) - 1]).view(1, 1, 6, 1, 1).expand(1, 3, 6, 1, 1)
    out = pl.frames_to_uint8(video)[0, :, 0, 0, 0].tolist()
    assert out == [0, 0, 128, 255, 255, 128]


def test_image_preprocessing_range_and_size():
    rgb = torch.tensor(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    x = pl.preprocess_image(rgb, 64, 48)
    assert x.shape == (3, 48, 64) and x.min() >= -1 and x.max() <= 1
    same = pl.preprocess_image(rgb, 70, 50)
    assert torch.allclose(same, rgb.permute(2, 0, 1).float() / 127.5 - 1, atol=1e-6)


@pytest.mark.parametrize("prompt,expect", [
    ("a fox", ["short prompt (2 words)"]),
    ("A red fox trots through fresh snow in a birch forest at dawn, cinematic light", []),
    ("一只红色的狐狸在清晨的白桦林里穿过新雪，电影感的光线，浅景深，镜头缓慢推进", ["short prompt", "not in English"]),
])
def test_prompt_warnings(prompt, expect):
    warnings = pl.prompt_warnings(prompt)
    assert len(warnings) == len(expect)
    for w, e in zip(warnings, expect):
        assert e in w


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_quant_setting_switches_the_linears_and_back(t2v, quant):
    from turbo_repl.models.linear import Linear8

    s = small("tiny", steps="1")
    plain = t2v.generate(Request(PROMPT, s, 4))
    eight = t2v.generate(Request(PROMPT, s.with_value("quant", quant), 4))
    assert eight.info["quant"] == quant
    assert any(isinstance(m, Linear8) for m in t2v.components.experts[0].modules())
    assert not torch.equal(eight.frames, plain.frames)
    diff = (eight.frames.float() - plain.frames.float()).abs().mean()
    assert diff < 8   # close to the unquantised video (mean over uint8 pixels)
    back = t2v.generate(Request(PROMPT, s.with_value("quant", "auto"), 4))
    assert back.info["quant"] == "off" and torch.equal(back.frames, plain.frames)
