"""BLIP text tokenizer: bert-base-uncased WordPiece plus BLIP's [DEC] and [ENC] tokens.

Built directly on the ``tokenizers`` library with a vocab vendored in ``dlip/assets`` so that
loading never touches the network. Output matches ``transformers.BertTokenizer`` configured the
way BLIP does it (``bos_token='[DEC]'``, ``additional_special_tokens=['[ENC]']``).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import WordPiece

__all__ = ["Tokenizer", "get_tokenizer", "pre_caption"]

# Size of the bert-base-uncased vocab; anything else means the wrong file was vendored.
BERT_VOCAB_SIZE = 30522

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
DEC, ENC = "[DEC]", "[ENC]"

# Ids the BLIP checkpoints were trained with; checked on load so a different vocab fails loudly.
_EXPECTED_IDS = {PAD: 0, UNK: 100, CLS: 101, SEP: 102, MASK: 103}

# The ten characters BLIP's caption cleaning turns into spaces.
_PRE_CAPTION_STRIP = re.compile(r"[.!\"()*#:;~]")
_MULTI_SPACE = re.compile(r"\s{2,}")

# transformers' legacy ``clean_up_tokenization`` rules (its 4.x default for BERT decode).
_CLEANUP_RULES = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Normalise a caption exactly like BLIP's ``pre_caption``.

    Keeps commas, apostrophes, hyphens, slashes and question marks; a lone newline inside the
    text is left alone because BLIP only collapses runs of two or more whitespace characters.
    """
    caption = _PRE_CAPTION_STRIP.sub(" ", caption.lower())
    caption = _MULTI_SPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question: str, max_words: int = 50) -> str:
    """Normalise a VQA question exactly like BLIP's ``pre_question`` (salesforce/BLIP
    data/utils.py): lower case, ``.!"()*#:;~`` deleted (not replaced by a space, unlike
    ``pre_caption``; "?", "," and "'" are kept), trailing spaces dropped, at most `max_words`
    words."""
    question = _PRE_CAPTION_STRIP.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


def default_vocab_path() -> Path:
    """Path of the vendored bert-base-uncased vocab inside the installed ``dlip`` package."""
    # Traversable -> Path: the package is installed unzipped (wheel/editable), so this is real.
    return Path(str(resources.files("dlip") / "assets" / "vocab.txt"))


def _read_vocab(path: Path) -> dict[str, int]:
    """Read a one-token-per-line vocab and check it is bert-base-uncased shaped."""
    if not path.is_file():
        raise FileNotFoundError(f"dlip tokenizer vocab file not found: {path}")
    # Split on "\n" only (like HF's load_vocab); splitlines() would also break on odd
    # unicode separators and shift ids.
    tokens = path.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(tokens) != BERT_VOCAB_SIZE or len(vocab) != BERT_VOCAB_SIZE:
        raise ValueError(
            f"vocab file {path} has {len(tokens)} lines ({len(vocab)} unique), "
            f"expected {BERT_VOCAB_SIZE} (bert-base-uncased)"
        )
    for tok, idx in _EXPECTED_IDS.items():
        if vocab.get(tok) != idx:
            raise ValueError(f"vocab file {path}: {tok} has id {vocab.get(tok)}, expected {idx}")
    return vocab


def _build_backend(vocab: dict[str, int]) -> _HFTokenizer:
    """Assemble the same pipeline transformers 5.x uses for BertTokenizer."""
    tok = _HFTokenizer(WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])],
    )
    # cleanup=True only glues " ." " ," " ?" " !" per token; it is what HF 5.x decode does.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # Registering specials as added tokens makes literal "[SEP]"/"[DEC]" in text map to one id
    # (not "[", "sep", "]") and lets skip_special_tokens drop them. Order fixes [DEC]/[ENC] ids.
    specials = [PAD, UNK, CLS, SEP, MASK, DEC, ENC]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


class Tokenizer:
    """bert-base-uncased WordPiece tokenizer with BLIP's ``[DEC]`` (bos) and ``[ENC]`` tokens."""

    pad_token_id: int = 0
    unk_token_id: int = 100
    cls_token_id: int = 101
    sep_token_id: int = 102
    eos_token_id: int = 102
    mask_token_id: int = 103
    dec_token_id: int = BERT_VOCAB_SIZE
    bos_token_id: int = BERT_VOCAB_SIZE
    enc_token_id: int = BERT_VOCAB_SIZE + 1
    vocab_size: int = BERT_VOCAB_SIZE + 2

    def __init__(self, vocab_path: str | os.PathLike[str]) -> None:
        self.vocab_path = Path(vocab_path)
        self._tok = _build_backend(_read_vocab(self.vocab_path))
        n = self._tok.get_vocab_size(with_added_tokens=True)
        dec, enc = self._tok.token_to_id(DEC), self._tok.token_to_id(ENC)
        if n != self.vocab_size or dec != self.dec_token_id or enc != self.enc_token_id:
            raise RuntimeError(f"tokenizer built with size {n}, {DEC}={dec}, {ENC}={enc}")

    @classmethod
    def default(cls) -> Tokenizer:
        """Tokenizer from the vocab shipped inside ``dlip`` (no network, no fallback)."""
        return cls(default_vocab_path())

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int = 35,
        padding: Literal["longest", "max_length"] = "longest",
        truncation: bool = True,
        return_tensors: Literal["pt"] | None = "pt",
    ) -> dict[str, torch.Tensor] | dict[str, list[list[int]]]:
        """Batch-encode with [CLS]/[SEP], right-padded with [PAD]; same as HF BertTokenizer.

        A single string is treated as a batch of one, so tensors are always (B, T).
        """
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        batch = [texts] if isinstance(texts, str) else list(texts)
        ids = [enc.ids for enc in self._tok.encode_batch(batch, add_special_tokens=True)]
        if truncation:
            ids = [self._truncate(x, max_length) for x in ids]
        longest = max((len(x) for x in ids), default=0)
        target = max_length if padding == "max_length" else longest
        if padding == "max_length" and longest > max_length:
            raise ValueError(f"sequence of length {longest} exceeds max_length={max_length}")
        input_ids = [x + [self.pad_token_id] * (target - len(x)) for x in ids]
        attention_mask = [[1] * len(x) + [0] * (target - len(x)) for x in ids]
        if return_tensors is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long).reshape(len(ids), target),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long).reshape(
                len(ids), target
            ),
        }

    def _truncate(self, ids: list[int], max_length: int) -> list[int]:
        # Cutting the body and re-appending [SEP] equals HF's truncation of the text before
        # adding specials, because the single-sequence template is "[CLS] $A [SEP]".
        if len(ids) <= max_length:
            return ids
        return [*ids[: max_length - 1], self.sep_token_id]

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, with [CLS] ... [SEP] and no truncation."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(
        self,
        ids: Sequence[int] | torch.Tensor,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
    ) -> str:
        """Ids back to text, like transformers 5.x ``BertTokenizer.decode``.

        ``clean_up_tokenization_spaces=True`` additionally applies transformers' legacy cleanup
        (e.g. "it ' s" -> "it's"), which was BERT's default in transformers 4.x used by BLIP.
        """
        text = self._tok.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if clean_up_tokenization_spaces else text

    def batch_decode(
        self,
        batch: Sequence[Sequence[int]] | torch.Tensor,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
    ) -> list[str]:
        """Decode each row of ``batch`` (a list of id lists or a 2-D tensor)."""
        if isinstance(batch, torch.Tensor):
            batch = batch.tolist()
        rows = [_as_id_list(r) for r in batch]
        texts = self._tok.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        return [_clean_up_spaces(t) for t in texts] if clean_up_tokenization_spaces else texts

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Token strings for ids (None for ids outside the vocab)."""
        return [self._tok.id_to_token(i) for i in _as_id_list(ids)]


def _as_id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    # The Rust backend rejects tensors and numpy ints; plain Python ints only.
    if isinstance(ids, torch.Tensor):
        return [int(i) for i in ids.reshape(-1).tolist()]
    return [int(i) for i in ids]


def _clean_up_spaces(text: str) -> str:
    for old, new in _CLEANUP_RULES:
        text = text.replace(old, new)
    return text


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """Process-wide shared default tokenizer (building it parses 30k vocab lines)."""
    return Tokenizer.default()
