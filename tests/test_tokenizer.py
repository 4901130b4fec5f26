"""The Mistral 7B v0.1 tokenizer in mistral_tokenizer/: loads offline and encodes exactly like SentencePiece."""

import os
from pathlib import Path

import pytest

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "mistral_tokenizer"

SAMPLES = [
    "Hello world",
    " = Title = ",  # WikiText headings start with a space
    " = = Section = = \n",
    "The year 2023 had 365 days; π ≈ 3.14159.",
    "a  b   c    d",  # runs of spaces
    "def f(x):\n    return x ** 2\n",
    "line1\n\nline3\ttab",
    "日本語 Привет 🤖 naïve café",
    "  two leading spaces",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: loading it must not need the Hub
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def test_size_and_special_tokens(tokenizer):
    assert tokenizer.is_fast
    assert len(tokenizer) == 32000
    assert (tokenizer.unk_token_id, tokenizer.unk_token) == (0, "<unk>")
    assert (tokenizer.bos_token_id, tokenizer.bos_token) == (1, "<s>")
    assert (tokenizer.eos_token_id, tokenizer.eos_token) == (2, "</s>")


def test_adds_bos_not_eos(tokenizer):
    assert tokenizer("Hello world").input_ids == [1, 22557, 1526]


def test_matches_sentencepiece(tokenizer):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))
    for text in SAMPLES:
        assert tokenizer(text).input_ids == [sp.bos_id()] + sp.encode(text), repr(text)


def test_decode_round_trip(tokenizer):
    for text in SAMPLES:
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text, repr(text)
