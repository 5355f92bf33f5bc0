"""Prompt -> token ids + attention mask, as the reference prepares them for umT5.

The reference calls the Hugging Face tokenizer of `google/umt5-xxl` with padding to `max_length`, truncation
and the end-of-sequence token `</s>` (id 1) appended; pad id 0. Prompts are cleaned first (ftfy, HTML entities
unescaped twice, whitespace collapsed). Two kinds, chosen by `tokenizer:` in configs/models.yaml:

* `umt5`: the real tokenizer from local files: `tokenizer.json` through `tokenizers` (what Hugging Face's
  fast tokenizer runs), else `spiece.model` through `sentencepiece` (what its slow tokenizer runs; special
  tokens such as `<extra_id_0>` typed into a prompt are then not recognised).
* `bytes`: UTF-8 bytes + 3 (ids 0-2 are pad, eos, unk), for the tiny model: nothing to download.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch

PAD_ID, EOS_ID = 0, 1
BYTE_OFFSET = 3


class TokenizerError(ValueError):
    """Tokenizer files missing or unusable; the message says what to do."""


def clean_prompt(text: str) -> str:
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class _Tokenizer:
    vocab_size: int

    def pieces(self, text: str) -> list[int]:
        """Token ids of cleaned text, without special tokens."""
        raise NotImplementedError

    def __call__(self, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask: int64 [B, length]. Each row: tokens (cut to length-1), EOS, then padding (mask 0)."""
        if length < 1:
            raise ValueError(f"text length must be at least 1, not {length}")
        ids = torch.full((len(prompts), length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = self.pieces(clean_prompt(prompt))[: length - 1] + [EOS_ID]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask


class ByteTokenizer(_Tokenizer):
    vocab_size = 256 + BYTE_OFFSET

    def pieces(self, text: str) -> list[int]:
        return [b + BYTE_OFFSET for b in text.encode("utf-8")]


class HFTokenizer(_Tokenizer):
    """A `tokenizer.json` run by the `tokenizers` library."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_truncation()
        self._tok.no_padding()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def pieces(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


class SentencePieceTokenizer(_Tokenizer):
    """A `spiece.model` run by `sentencepiece`."""

    def __init__(self, path: Path):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.get_piece_size()

    def pieces(self, text: str) -> list[int]:
        return self._sp.encode(text)


def load_tokenizer(spec: dict, path: str | Path | None) -> _Tokenizer:
    """The tokenizer a text encoder's `tokenizer:` spec names; `path` is the folder holding its files (umt5)."""
    kind = spec.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "umt5":
        raise TokenizerError(f"unknown tokenizer kind {kind!r} in configs/models.yaml; expected 'umt5' or 'bytes'")
    folder = Path(path) if path is not None else None
    if folder is not None and folder.is_file():
        folder = folder.parent
    if folder is not None:
        if (folder / "tokenizer.json").is_file():
            return HFTokenizer(folder / "tokenizer.json")
        if (folder / "spiece.model").is_file():
            return SentencePieceTokenizer(folder / "spiece.model")
    where = f"in {folder}" if folder is not None else "(no tokenizer folder was given)"
    raise TokenizerError(f"the {spec.get('repo', 'umT5')} tokenizer is missing: no tokenizer.json or spiece.model "
                         f"{where}; run `turbo-repl download MODEL` for the model you chose")
