"""Tests for dlip.tokenizer: vendored vocab, parity with transformers' BertTokenizer."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from dlip.tokenizer import Tokenizer, default_vocab_path, get_tokenizer, pre_caption

VOCAB_MD5 = "64800d5d8528ce344256daf115d4965e"

LONG_CAPTION = " ".join(
    ["a very long description of a busy street market with many colourful stalls"] * 6
)

CAPTIONS = [
    "a dog running on the beach",
    "A man riding a horse.",
    "Hello, world! What's up? (nothing) #tag: yes; no ~ *star*",
    "Café crème with naïve résumé",
    "a sign that says 東京 and 你好",
    "12 people and 3.5 km/h at 10:30",
    "it's a dog's life, isn't it",
    "a well-known state-of-the-art self-driving car",
    LONG_CAPTION,
    "",
    "two   cats    sleeping\tin a\n box",
    "[DEC] a picture of a cat",
    "[ENC] hello [SEP] world [CLS] x [MASK] [PAD] [UNK] [unused0] [dec]",
    "A LARGE RED BUS ON THE STREET",
    "quotes \"like this\" and 'that' and `those`",
    "emoji 🙂 and control\x00char and zero\u200bwidth",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return get_tokenizer()


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    path = str(default_vocab_path())
    if int(transformers.__version__.split(".")[0]) >= 5:
        # 5.x silently ignores vocab_file= and yields a 5-token vocab that maps all to [UNK].
        hf = transformers.BertTokenizer(vocab=path)
    else:
        # 4.x: the fast class runs the same `tokenizers` pipeline as 5.x's BertTokenizer.
        hf = transformers.BertTokenizerFast(vocab_file=path)
    assert len(hf) == 30522
    hf.add_special_tokens({"bos_token": "[DEC]"})
    hf.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert len(hf) == 30524
    return hf


def test_vendored_vocab_file() -> None:
    data = default_vocab_path().read_bytes()
    assert hashlib.md5(data).hexdigest() == VOCAB_MD5
    assert data.count(b"\n") == 30522
    assert data.endswith(b"\n")


def test_special_token_ids(tok: Tokenizer) -> None:
    assert len(tok) == 30524 == tok.vocab_size
    ids = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    ids |= {"[DEC]": 30522, "[ENC]": 30523}
    assert tok.convert_ids_to_tokens(list(ids.values())) == list(ids)
    assert (tok.pad_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 100, 103)
    assert (tok.cls_token_id, tok.sep_token_id, tok.eos_token_id) == (101, 102, 102)
    assert tok.bos_token_id == tok.dec_token_id == 30522
    assert tok.enc_token_id == 30523
    assert tok.encode("[DEC] [ENC]") == [101, 30522, 30523, 102]


def test_hf_special_ids_agree(tok: Tokenizer, hf_tok) -> None:
    assert hf_tok.bos_token_id == tok.bos_token_id
    assert hf_tok.convert_tokens_to_ids("[ENC]") == tok.enc_token_id
    assert hf_tok.pad_token_id == tok.pad_token_id
    assert hf_tok.sep_token_id == tok.sep_token_id


def test_known_encoding(tok: Tokenizer) -> None:
    # Pinned ids catch a regression even if transformers changes in lockstep.
    assert tok.encode("A dog, running") == [101, 1037, 3899, 1010, 2770, 102]
    assert tok.encode("Café crème") == [101, 7668, 13675, 21382, 102]
    assert tok.encode("[DEC] a picture of") == [101, 30522, 1037, 3861, 1997, 102]
    assert tok.encode("你") == [101, 100, 102]
    assert tok.encode("") == [101, 102]


@pytest.mark.parametrize("clean", [False, True], ids=["raw", "pre_caption"])
@pytest.mark.parametrize(
    ("padding", "max_length"),
    [("longest", 35), ("longest", 30), ("max_length", 35), ("max_length", 30), ("longest", 8)],
)
def test_batch_matches_hf(tok: Tokenizer, hf_tok, padding: str, max_length: int, clean: bool):
    texts = [pre_caption(c) for c in CAPTIONS] if clean else CAPTIONS
    ours = tok(texts, padding=padding, truncation=True, max_length=max_length)
    ref = hf_tok(
        texts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt"
    )
    for key in ("input_ids", "attention_mask"):
        assert ours[key].dtype == torch.long
        assert torch.equal(ours[key], ref[key]), key
    expected_len = max_length if padding == "max_length" else ours["input_ids"].shape[1]
    assert ours["input_ids"].shape == (len(texts), expected_len)


def test_truncation_keeps_sep(tok: Tokenizer) -> None:
    out = tok(LONG_CAPTION, max_length=30, padding="longest")
    ids = out["input_ids"]
    assert ids.shape == (1, 30)
    assert ids[0, 0].item() == 101 and ids[0, -1].item() == 102
    assert (ids[0, 1:-1] != 102).all()
    assert out["attention_mask"].sum().item() == 30


def test_padding_and_mask(tok: Tokenizer) -> None:
    out = tok(["a dog", "a black dog runs"], padding="longest")
    assert out["input_ids"].tolist() == [
        [101, 1037, 3899, 102, 0, 0],
        [101, 1037, 2304, 3899, 3216, 102],
    ]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    fixed = tok("a dog", padding="max_length", max_length=35)
    assert fixed["input_ids"].shape == (1, 35)
    assert fixed["attention_mask"].sum().item() == 4


@pytest.mark.parametrize("text", CAPTIONS)
def test_single_string_matches_hf(tok: Tokenizer, hf_tok, text: str) -> None:
    ref = hf_tok(text, padding="longest", truncation=True, max_length=35, return_tensors="pt")
    ours = tok(text)
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    assert tok.encode(text) == hf_tok(text)["input_ids"]


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_hf(tok: Tokenizer, hf_tok, skip: bool) -> None:
    texts = [*CAPTIONS, "a dog , running", "a dog, running .", "3.5 km / h ?"]
    for text in texts:
        ids = hf_tok(text)["input_ids"]
        for clean in (False, True):
            # Explicit flag: the HF default flipped between 4.x (True) and 5.x (False).
            ours = tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean)
            ref = hf_tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean)
            assert ours == ref, (text, clean)


def test_decode_known_outputs(tok: Tokenizer) -> None:
    # transformers 5.x only glues " ." " ," " ?" " !" by default; apostrophes stay spaced.
    ids = tok.encode("It's a dog , running. Isn't it?")
    assert tok.decode(ids) == "it ' s a dog, running. isn ' t it?"
    assert tok.decode(ids, clean_up_tokenization_spaces=True) == "it's a dog, running. isn't it?"
    assert tok.decode(ids, skip_special_tokens=False).startswith("[CLS] it ' s")
    assert tok.decode(tok.encode("unbelievably")) == "unbelievably"


def test_decode_generated_style_ids(tok: Tokenizer, hf_tok) -> None:
    # BLIP's generate output: [DEC] bos, wordpieces, [SEP] eos, then [PAD] fill.
    rows = torch.tensor(
        [
            [30522, 1037, 3861, 1997, 1037, 3899, 102, 0, 0],
            [30522, 1037, 2158, 5559, 1037, 3586, 1012, 102, 0],
        ]
    )
    assert tok.batch_decode(rows) == ["a picture of a dog", "a man riding a horse."]
    ref = hf_tok.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert tok.batch_decode(rows) == ref
    assert tok.batch_decode(rows.tolist()) == tok.batch_decode(rows)
    assert tok.decode(rows[0]) == "a picture of a dog"


def test_decode_roundtrip(tok: Tokenizer) -> None:
    for text in ["a dog running on the beach", "a man riding a horse", "two cats on a bed"]:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('A.B!C"D(E)F*G#H:I;J~K', "a b c d e f g h i j k"),
        ("Hello.", "hello"),
        ("  leading and trailing  ", "leading and trailing"),
        ("many     spaces\t\tand tabs", "many spaces and tabs"),
        ("keep, it's well-known a/b? yes", "keep, it's well-known a/b? yes"),
        ("a dog on the grass.\n", "a dog on the grass"),
        ("line one\nline two", "line one\nline two"),
        ("a dog .\n\n", "a dog"),
        ("(a) *b* ~c~", "a b c"),
        ("x: y; z", "x y z"),
        ("", ""),
        ("UPPER Case", "upper case"),
    ],
)
def test_pre_caption(raw: str, expected: str) -> None:
    assert pre_caption(raw) == expected


def test_pre_caption_max_words() -> None:
    words = [f"w{i}" for i in range(40)]
    assert pre_caption(" ".join(words)) == " ".join(words[:30])
    assert pre_caption(" ".join(words), max_words=5) == "w0 w1 w2 w3 w4"
    assert pre_caption("one two three", max_words=3) == "one two three"
    # Removed punctuation must not count as words after collapsing.
    assert pre_caption("a . b . c . d", max_words=3) == "a b c"


def test_missing_vocab_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Tokenizer(missing)


def test_wrong_size_vocab_raises(tmp_path: Path) -> None:
    bad = tmp_path / "vocab.txt"
    bad.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected 30522"):
        Tokenizer(bad)


def test_bad_arguments(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="padding"):
        tok("a dog", padding="do_not_pad")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exceeds max_length"):
        tok(LONG_CAPTION, padding="max_length", truncation=False, max_length=10)


def test_get_tokenizer_is_cached() -> None:
    assert get_tokenizer() is get_tokenizer()


def test_pre_question_is_blips():
    from dlip.tokenizer import pre_question

    # Lower case; . ! " ( ) * # : ; ~ deleted (no space put in), "?" "," "'" kept, inner runs of
    # spaces kept, trailing spaces dropped (salesforce/BLIP data/utils.py).
    raw = 'What is   THE man\'s (left) hand holding, "really"?!  '
    assert pre_question(raw) == "what is   the man's left hand holding, really?"
    assert pre_question("a b c d e", max_words=3) == "a b c"
    assert pre_question("Is it 2.5 m:long?") == "is it 25 mlong?"
