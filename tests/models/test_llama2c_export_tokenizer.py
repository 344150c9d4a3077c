"""A llama2.c tokenizer saved as Hugging Face / SentencePiece files encodes exactly like run.c.

``Llama2cTokenizer`` is checked against a transcription of run.c in ``test_llama2c.py``; here the
files ``save`` writes are read back by other people's code (``sentencepiece`` for
``tokenizer.model``, ``transformers.AutoTokenizer`` for ``tokenizer.json``) and must give the same
ids on real text, on inputs chosen to break whitespace handling and byte fallback, and on random
text. Two input classes differ, both artefacts of run.c rather than of the vocabulary: a NUL ends
run.c's C string, and U+2581 is SentencePiece's own spelling of a space.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.core.errors import ModelpressError
from modelpress.models.llama2c import Llama2cTokenizer
from modelpress.models.tokenizers import SPACE, PieceType
from tests.conftest import shared_file

TRICKY = [
    "", " ", "   ", "Hi", " Hi", "Hi ", "  Hi  there  ", "\n", "a\nb\n\n c\n", "\t tab\r\n", " \n \n ",
    "naïve café — 中文 🙂", "🙂🙂👩‍👩‍👧", "x\u00a0y\u200az", "e\u0301 \ufeff \U0010FFFF",
    "<s> </s> <unk> <0x0A>", "The 123 4567.", "“Quoted,” she said… ‘yes’",
]


@pytest.fixture(scope="module")
def tok() -> Llama2cTokenizer:
    return Llama2cTokenizer(shared_file("stories260k/tok512.bin"))


@pytest.fixture(scope="module")
def folder(tok: Llama2cTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf_tok")
    tok.save(out)
    return out


@pytest.fixture(scope="module")
def fast(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def slow(folder: Path):
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """TRICKY, the first 20k characters of TinyStories validation whole, and its paragraphs one by one."""
    head = shared_file("tinystories/tinystories_val_head.txt").read_text()[:20_000]
    return TRICKY + [head] + head.split("\n\n")


def test_save_writes_hf_files_beside_tokenizer_bin(tok, folder) -> None:
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.bin", "tokenizer.json", "tokenizer.model",
                                                         "tokenizer_config.json"]
    assert (folder / "tokenizer.bin").read_bytes() == tok.path.read_bytes()  # modelpress reloads this one
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["add_bos_token"] is True
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"]) == ("<s>", "</s>", "<unk>")


def test_sentencepiece_vocab_keeps_ids_scores_and_layout(tok) -> None:
    vocab = tok.sentencepiece_vocab()
    assert vocab.pieces[:4] == ("<unk>", "<s>", "</s>", "<0x00>") and vocab.pieces[258] == "<0xFF>"
    assert vocab.pieces[259] == SPACE + "t" and tok.pieces[259] == b" t"
    assert list(vocab.scores) == tok.scores
    assert vocab.types == (PieceType.UNKNOWN,) + (PieceType.CONTROL,) * 2 + (PieceType.BYTE,) * 256 + (
        PieceType.NORMAL,) * (tok.vocab_size - 259)


def test_auto_tokenizer_encodes_and_decodes_like_run_c(tok, fast, texts) -> None:
    assert type(fast).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast") and fast.is_fast
    for text in texts:
        ids = fast.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text, bos=False), text[:60]
        assert fast.decode(ids) == text


def test_sentencepiece_model_encodes_and_decodes_like_run_c(tok, slow, texts) -> None:
    assert (slow.vocab_size(), slow.unk_id(), slow.bos_id(), slow.eos_id()) == (tok.vocab_size, 0, 1, 2)
    for text in texts:
        ids = slow.encode(text)
        assert ids == tok.encode(text, bos=False), text[:60]
        assert slow.decode(ids) == text


def test_bos_first_by_default_and_special_ids(tok, fast) -> None:
    text = "Once upon a time, there was a little girl."
    ids = fast(text)["input_ids"]
    assert ids == tok.encode(text) and ids[0] == 1
    assert fast.decode(ids, skip_special_tokens=True) == tok.decode(ids) == text
    assert (fast.bos_token_id, fast.eos_token_id, fast.unk_token_id) == (1, 2, 0)
    assert fast.convert_ids_to_tokens([0, 1, 2, 13, 259]) == ["<unk>", "<s>", "</s>", "<0x0A>", SPACE + "t"]


def test_special_token_text_is_plain_text(tok, fast) -> None:
    """run.c and SentencePiece read "<s>" in the text as characters; so does the saved HF tokenizer."""
    text = "a <s> b </s>"
    assert fast.encode(text, add_special_tokens=False) == tok.encode(text, bos=False)
    assert 1 not in fast.encode(text, add_special_tokens=False)


_TEXT = st.one_of(
    st.text(st.characters(blacklist_characters="\0" + SPACE, blacklist_categories=("Cs",)), max_size=40),
    st.lists(st.sampled_from(list("abehilnorst TOLy.,!?'\"\n\t-<>0x") + ["é", "€", "中", "🙂", "  ", "the "]),
             max_size=40).map("".join),
)


@settings(max_examples=300, deadline=None)
@given(text=_TEXT)
def test_random_text_encodes_alike(tok, fast, slow, text: str) -> None:
    expected = tok.encode(text, bos=False)
    assert fast.encode(text, add_special_tokens=False) == expected
    assert slow.encode(text) == expected


def test_the_two_inputs_that_differ_from_run_c(tok, fast, slow) -> None:
    """run.c stops at NUL (C strings); SentencePiece reads U+2581 as a space. Everything else is equal."""
    for text in ("a\0b", "x\u2581y"):
        hf = fast.encode(text, add_special_tokens=False)
        assert hf == slow.encode(text) != tok.encode(text, bos=False)
    assert tok.encode("a\0b", bos=False) == tok.encode("a", bos=False)
    assert fast.encode("x\u2581y", add_special_tokens=False) == fast.encode("x y", add_special_tokens=False)


def _with_extra_piece(src: Path, dst: Path, piece: bytes) -> Path:
    dst.write_bytes(src.read_bytes() + struct.pack("<fi", -999.0, len(piece)) + piece)
    return dst


def test_vocabulary_sentencepiece_cannot_hold_keeps_tokenizer_bin_only(tok, tmp_path) -> None:
    odd = Llama2cTokenizer(_with_extra_piece(tok.path, tmp_path / "odd.bin", ("a" + SPACE).encode()))
    with pytest.warns(UserWarning, match=f"no Hugging Face tokenizer files written: .*odd.bin: cannot be written as a "
                                         f"SentencePiece vocabulary: a piece is empty, contains '{SPACE}'"):
        odd.save(tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["tokenizer.bin"]
    with pytest.raises(ModelpressError, match="cannot be written as a SentencePiece vocabulary"):
        odd.sentencepiece_vocab()
