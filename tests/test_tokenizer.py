"""Tokenizers: the byte tokenizer's rules, and the umT5 wrapper against a real SentencePiece model."""

import io

import pytest
import sentencepiece as spm
import torch

from turbo_repl.models.tokenizer import (EOS_ID, PAD_ID, ByteTokenizer, HFTokenizer, SentencePieceTokenizer,
                                         TokenizerError, clean_prompt, load_tokenizer)

UMT5 = {"kind": "umt5", "repo": "google/umt5-xxl"}

SENTENCES = [
    "a cat riding a skateboard down a sunny street",
    "a slow pan across a misty mountain lake at dawn",
    "two dogs running through tall grass in the evening light",
    "a close up of rain drops falling on a red umbrella",
    "an astronaut walking on the surface of the moon",
    "waves crashing against the rocks under a stormy sky",
    "a small boat drifting on a calm river between green hills",
    "a street market at night with lanterns and people walking",
] * 4


# ------------------------------------------------------------------------------------------------- bytes

def test_bytes_are_offset_then_eos_then_padding():
    ids, mask = ByteTokenizer()(["ab", "é"], 6)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[97 + 3, 98 + 3, EOS_ID, PAD_ID, PAD_ID, PAD_ID],
                            [0xC3 + 3, 0xA9 + 3, EOS_ID, PAD_ID, PAD_ID, PAD_ID]]   # UTF-8 of é is C3 A9
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0]] * 2


def test_truncation_keeps_the_eos():
    ids, mask = ByteTokenizer()(["abcdefgh", "abcd"], 5)
    assert ids[0].tolist() == [100, 101, 102, 103, EOS_ID]    # four bytes fit before the EOS
    assert ids[1].tolist() == [100, 101, 102, 103, EOS_ID]    # exactly full: no padding
    assert mask.tolist() == [[1] * 5, [1] * 5]


def test_empty_prompt_is_just_eos():
    ids, mask = ByteTokenizer()([""], 3)
    assert ids.tolist() == [[EOS_ID, PAD_ID, PAD_ID]] and mask.tolist() == [[1, 0, 0]]


def test_prompts_are_cleaned_first():
    assert clean_prompt("  a &amp;amp; b \n\t c  ") == "a & b c"           # HTML unescaped twice, spaces collapsed
    assert clean_prompt("cafÃ© au lait") == "café au lait"                # ftfy repairs mojibake
    ids, _ = ByteTokenizer()(["  a\n b "], 5)
    assert ids[0].tolist() == [ord("a") + 3, ord(" ") + 3, ord("b") + 3, EOS_ID, PAD_ID]


def test_byte_kind_needs_no_files():
    assert isinstance(load_tokenizer({"kind": "bytes"}, None), ByteTokenizer)


# ------------------------------------------------------------------------------------------------- umT5

@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    """A real SentencePiece unigram model with T5's special ids: pad 0, eos 1, unk 2, no bos."""
    folder = tmp_path_factory.mktemp("spiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=model, vocab_size=90,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder


def sp_reference(folder, prompt, length):
    """What the umT5 tokenizer yields, from sentencepiece directly: pieces, cut to length-1, EOS, pad 0."""
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    tokens = sp.encode(prompt)[: length - 1] + [sp.eos_id()]
    return tokens + [sp.pad_id()] * (length - len(tokens)), [1] * len(tokens) + [0] * (length - len(tokens))


PROMPTS = ["a cat riding a boat on a calm lake", "two dogs", "waves crashing against the rocks under a sky"]


@pytest.mark.parametrize("length", [32, 8])   # 8 truncates the first and last prompt
def test_spiece_wrapper_matches_sentencepiece(spiece, length):
    tok = load_tokenizer(UMT5, spiece)
    assert isinstance(tok, SentencePieceTokenizer)
    ids, mask = tok(PROMPTS, length)
    for row, prompt in enumerate(PROMPTS):
        want_ids, want_mask = sp_reference(spiece, prompt, length)
        assert ids[row].tolist() == want_ids and mask[row].tolist() == want_mask
    assert mask[0].sum() == 8 if length == 8 else mask[0].sum() < length


@pytest.fixture(scope="module")
def tokenizer_json(spiece, tmp_path_factory):
    """The same model as a Hugging Face tokenizer.json (unigram pieces and scores, metaspace, `$A </s>`), with
    padding and truncation switched on in the file, as a tokenizer saved with them would have."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    sp = spm.SentencePieceProcessor(model_file=str(spiece / "spiece.model"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_ID)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.enable_padding(length=100, pad_id=0, pad_token="<pad>")
    tok.enable_truncation(max_length=3)
    folder = tmp_path_factory.mktemp("hf")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "spiece.model").write_bytes((spiece / "spiece.model").read_bytes())
    return folder


@pytest.mark.parametrize("length", [32, 8])
def test_tokenizer_json_is_preferred_and_matches_sentencepiece(tokenizer_json, spiece, length):
    tok = load_tokenizer(UMT5, tokenizer_json)
    assert isinstance(tok, HFTokenizer)   # the fast tokenizer, as Hugging Face's AutoTokenizer picks
    ids, mask = tok(PROMPTS, length)
    for row, prompt in enumerate(PROMPTS):
        want_ids, want_mask = sp_reference(spiece, prompt, length)
        assert ids[row].tolist() == want_ids and mask[row].tolist() == want_mask   # one EOS, our padding


def test_a_file_path_means_its_folder(spiece):
    assert isinstance(load_tokenizer(UMT5, spiece / "spiece.model"), SentencePieceTokenizer)


@pytest.mark.parametrize("where", ["empty", None])
def test_missing_files_say_what_to_run(tmp_path, where):
    with pytest.raises(TokenizerError, match=r"google/umt5-xxl tokenizer is missing.*turbo-repl download MODEL"):
        load_tokenizer(UMT5, tmp_path if where else None)


def test_unknown_kind_is_refused():
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer({"kind": "wordpiece"}, None)
