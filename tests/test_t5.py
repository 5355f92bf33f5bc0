"""The umT5 encoder against the reference's outputs and checkpoint layout; the text context built from it."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from turbo_repl.models.registry import get_model
from turbo_repl.models.t5 import TextEncoder, UMT5Encoder
from turbo_repl.models.tiny import deterministic_init, seed_for
from turbo_repl.models.tokenizer import ByteTokenizer, load_tokenizer

DATA = Path(__file__).parent / "data"


def rel_max(out, ref):
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    meta = json.loads((fixtures_dir / "umt5.json").read_text())
    weights = load_file(str(fixtures_dir / meta["files"]["weights"]["file"]))
    io = load_file(str(fixtures_dir / meta["files"]["io"]["file"]))
    return meta, weights, io


def fixture_encoder(fixture, dtype=torch.float32):
    meta, weights, _ = fixture
    encoder = UMT5Encoder(**meta["constructor"]["cfg"]).eval()   # the reference's own argument names
    encoder.load_state_dict(weights, strict=True)
    return encoder.to(dtype)


def test_encoder_matches_reference(fixture):
    meta, _, io = fixture
    out = fixture_encoder(fixture)(io["ids"], io["mask"])
    assert rel_max(out, io["encoder_out"]) <= meta["tolerance"]["threshold"]
    assert ((out - io["encoder_out"]).norm() / io["encoder_out"].norm()).item() <= 1e-5


def test_context_matches_reference(fixture):
    meta, _, io = fixture
    text = TextEncoder(fixture_encoder(fixture), ByteTokenizer(), meta["config"]["text_len"])
    context = text.context(io["ids"], io["mask"])
    assert rel_max(context, io["context"]) <= meta["tolerance"]["threshold"]
    for row, length in enumerate(meta["config"]["lengths"]):
        assert context[row, length:].abs().max() == 0 and context[row, :length].abs().min(dim=-1).values.gt(0).all()


def test_bfloat16_follows_the_reference_bfloat16_path(fixture):
    """TurboDiffusion runs umT5 in bf16. Its logits (no 1/sqrt(d)) reach ~50 here, where bf16's spacing is 0.25,
    so bf16 lands far from float32 (~0.12 max, 4e-2 rel-L2): the check that matters is against the reference's
    own bf16 run (tests/data/make_reference_data.py). Rounded at the same places, they agree to within a couple
    of bf16 steps (bit for bit on the machine that made the data)."""
    _, _, io = fixture
    ref = load_file(str(DATA / "umt5_bf16.safetensors"))["encoder_out"].float()
    out = fixture_encoder(fixture, torch.bfloat16)(io["ids"], io["mask"])
    assert out.dtype == torch.bfloat16
    assert rel_max(out, ref) <= 1e-2
    assert rel_max(out, io["encoder_out"]) <= 0.25


def test_num_layers_spellings_agree():
    a = UMT5Encoder(vocab_size=10, dim=8, dim_attn=8, dim_ffn=16, num_heads=2, num_layers=3)
    b = UMT5Encoder(vocab_size=10, dim=8, dim_attn=8, dim_ffn=16, num_heads=2, encoder_layers=3,
                    decoder_layers=3, dropout=0.1)
    assert a.state_dict().keys() == b.state_dict().keys() and len(a.blocks) == 3


def test_shared_position_bias_is_one_table():
    enc = UMT5Encoder(vocab_size=10, dim=8, dim_attn=8, dim_ffn=16, num_heads=2, num_layers=2, shared_pos=True)
    keys = [k for k in enc.state_dict() if "pos_embedding" in k]
    assert keys == ["pos_embedding.embedding.weight"]
    ids = torch.randint(0, 10, (1, 5))
    assert torch.isfinite(enc(ids)).all()


def test_real_umt5_xxl_keys(fixture):
    meta, _, _ = fixture
    real = meta["real_umt5_xxl_encoder_keys (meta device)"]
    with torch.device("meta"):
        enc = UMT5Encoder(**meta["constructor"]["real_umt5_xxl"]).to(torch.bfloat16)
    sd = enc.state_dict()
    assert len(sd) == real["total_keys"] == 242
    described = {f"{k} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for k, t in sd.items()}
    for i in range(real["num_blocks"]):
        assert {s.replace("blocks.0.", f"blocks.{i}.") for s in real["block_0_keys (blocks.N.* repeat this)"]} <= described
    assert set(real["non_block_keys"]) <= described
    assert sum(t.numel() for t in sd.values()) == 5_680_910_336


@pytest.fixture(scope="module")
def tiny_text():
    spec = get_model("tiny").text_encoder
    encoder = deterministic_init(UMT5Encoder(**spec.arch), seed_for("test/text_encoder")).eval()
    return TextEncoder(encoder, load_tokenizer(spec.tokenizer, None), spec.text_len)


def test_tiny_text_encoder_context(tiny_text):
    prompts = ["a cat on a skateboard", "a much longer prompt about a dog running through a field of tall grass"]
    context = tiny_text.encode(prompts)
    assert context.shape == (2, 32, 32)
    lengths = [len(p) + 1 for p in prompts]   # bytes + EOS, the second cut to the text length
    lengths[1] = 32
    assert context[0, lengths[0]:].abs().max() == 0
    assert context[0, :lengths[0]].abs().amax(dim=-1).gt(0).all() and context[1].abs().amax(dim=-1).gt(0).all()


def test_padding_does_not_leak_into_tokens(tiny_text):
    """Padded keys are masked: a prompt's context does not depend on what it is batched with."""
    alone = tiny_text.encode(["a cat"])
    batched = tiny_text.encode(["a cat", "a long prompt that fills the whole text length"])
    assert torch.allclose(alone[0], batched[0], atol=1e-6, rtol=0)


def test_text_encoder_moves_with_to(tiny_text):
    text = TextEncoder(tiny_text.encoder, tiny_text.tokenizer, tiny_text.text_len)
    text.to(torch.float64)
    assert text.encoder.token_embedding.weight.dtype == torch.float64
    assert text.encode(["a cat"]).dtype == torch.float64


def test_tokenizer_larger_than_vocabulary_is_refused():
    enc = UMT5Encoder(vocab_size=50, dim=8, dim_attn=8, dim_ffn=16, num_heads=2, num_layers=1)
    with pytest.raises(ValueError, match="do not belong together"):
        TextEncoder(enc, ByteTokenizer(), 8).encode(["zzz"])
