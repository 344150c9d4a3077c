"""A small tokenizer protocol so evaluation and calibration work for HF and llama2.c models alike,
and the SentencePiece form other runtimes read a llama2.c vocabulary in.

A SentencePiece BPE vocabulary (:class:`SentencePieceVocab`) is written here as ``tokenizer.model``
(SentencePiece's own file), ``tokenizer.json`` + ``tokenizer_config.json`` (``transformers.AutoTokenizer``);
the GGUF writer puts the same pieces, scores and types into llama.cpp's ``llama`` vocabulary.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Protocol


class TextTokenizer(Protocol):
    """What modelpress needs from a tokenizer."""

    bos_token_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens left out."""

    def save(self, directory: Path) -> None:
        """Write the tokenizer files into ``directory``."""


class HFTokenizer:
    """Adapter over a ``transformers`` tokenizer."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.bos_token_id = tok.bos_token_id

    def encode(self, text: str) -> list[int]:
        # Long texts (a whole eval corpus) exceed model_max_length; windows are cut later.
        return list(self.tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], **kw: Any) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, **kw)

    def save(self, directory: Path) -> None:
        self.tok.save_pretrained(str(directory))


class Llama2cTextTokenizer:
    """Adapter over :class:`modelpress.models.llama2c.Llama2cTokenizer` (no BOS from ``encode``)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.bos_token_id = tok.bos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, bos=False, eos=False))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def save(self, directory: Path) -> None:
        """``tokenizer.bin`` plus the Hugging Face files (see ``Llama2cTokenizer.save``)."""
        self.tok.save(directory)

    def sentencepiece_vocab(self) -> SentencePieceVocab:
        """The vocabulary in SentencePiece's form (what GGUF's ``llama`` tokenizer holds)."""
        return self.tok.sentencepiece_vocab()


# ---------------------------------------------------------------------------- SentencePiece form

SPACE = "\u2581"  # SentencePiece's visible space


class PieceType(IntEnum):
    """SentencePiece piece types (``ModelProto.SentencePiece.Type``); GGUF token types use the same numbers."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    BYTE = 6


@dataclass(frozen=True)
class SentencePieceVocab:
    """A SentencePiece BPE vocabulary: pieces spell spaces as ``▁``, each has a score and a type.

    ``tokenizer.model``, ``tokenizer.json`` and GGUF's ``llama`` vocabulary are all written from it; a
    llama2.c tokenizer becomes one (same ids and scores) through its ``sentencepiece_vocab()``.

    Example:
        >>> vocab = Llama2cTokenizer("tok512.bin").sentencepiece_vocab()  # doctest: +SKIP
        >>> vocab.pieces[:4], vocab.pieces[259]                           # doctest: +SKIP
        (('<unk>', '<s>', '</s>', '<0x00>'), '▁t')
    """

    pieces: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[PieceType, ...]
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2


def _pb_varint(n: int) -> bytes:
    """Protobuf's base-128 varint, low 7 bits first."""
    n &= (1 << 64) - 1  # a negative int32 is sign-extended to 64 bits, as protobuf writes it
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb_bytes(field: int, value: bytes) -> bytes:
    """A length-delimited protobuf field (string or sub-message)."""
    return _pb_varint(field << 3 | 2) + _pb_varint(len(value)) + value


def _pb_int(field: int, value: int) -> bytes:
    """A varint protobuf field (int32, bool, enum)."""
    return _pb_varint(field << 3) + _pb_varint(value)


def _pb_float(field: int, value: float) -> bytes:
    """A fixed32 protobuf field (float)."""
    return _pb_varint(field << 3 | 5) + struct.pack("<f", value)


def sentencepiece_model_proto(vocab: SentencePieceVocab) -> bytes:
    """``tokenizer.model``: a serialised SentencePiece ``ModelProto`` (BPE with byte fallback).

    Written field by field (numbers from ``sentencepiece_model.proto``) so that no protobuf runtime
    is needed. The trainer and normaliser settings are Llama 2's: the normaliser adds the dummy ``▁``
    prefix and turns spaces into ``▁`` but changes nothing else (run.c neither trims nor folds
    whitespace), so ``SentencePieceProcessor(model_file=...).encode(text)`` equals run.c's ids.

    Example:
        >>> Path("tokenizer.model").write_bytes(sentencepiece_model_proto(vocab))  # doctest: +SKIP
    """
    pieces = b"".join(_pb_bytes(1, _pb_bytes(1, p.encode()) + _pb_float(2, s) + _pb_int(3, t))
                      for p, s, t in zip(vocab.pieces, vocab.scores, vocab.types))
    trainer = (_pb_int(3, 2) + _pb_int(4, len(vocab.pieces))  # model_type BPE, vocab_size
               + _pb_int(22, True) + _pb_int(25, True)  # split_by_whitespace, split_digits
               + _pb_int(26, True) + _pb_int(35, True)  # allow_whitespace_only_pieces, byte_fallback
               + _pb_int(40, vocab.unk_id) + _pb_int(41, vocab.bos_id) + _pb_int(42, vocab.eos_id)
               + _pb_int(43, -1))  # pad_id: none
    normalizer = (_pb_bytes(1, b"identity") + _pb_int(3, True)  # add_dummy_prefix
                  + _pb_int(4, False) + _pb_int(5, True))  # keep repeated spaces; spaces as "▁"
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


def _bpe_merges(vocab: SentencePieceVocab) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best merged score first.

    ``tokenizers`` ranks merges, run.c and SentencePiece rank merged pieces by score (leftmost on
    ties). The orders agree when merged pieces have distinct scores (SentencePiece-trained
    vocabularies do); two splits of one piece take adjacent ranks, in split-point order.
    """
    normal = {p: i for i, (p, t) in enumerate(zip(vocab.pieces, vocab.types)) if t == PieceType.NORMAL}
    found = [(-vocab.scores[i], i, k, p[:k], p[k:]) for p, i in normal.items()
             for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal]
    return [(a, b) for *_, a, b in sorted(found)]


def hf_tokenizer_json(vocab: SentencePieceVocab) -> str:
    """``tokenizer.json`` for the ``tokenizers`` library that encodes exactly like SentencePiece (and run.c).

    A BPE model with byte fallback, and SentencePiece's normaliser spelled out (always prepend
    ``▁``, then spaces to ``▁``): the ``Metaspace`` pre-tokenizer that transformers' own Llama class
    builds skips the dummy prefix when the text already starts with a space, so it is not used.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    ids = {p: i for i, p in enumerate(vocab.pieces)}
    bos = vocab.pieces[vocab.bos_id]
    tok = Tokenizer(BPE(vocab=ids, merges=_bpe_merges(vocab), unk_token=vocab.pieces[vocab.unk_id],
                        fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab.bos_id)])
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True)
                            for p, t in zip(vocab.pieces, vocab.types) if t in (PieceType.UNKNOWN, PieceType.CONTROL)])
    return tok.to_str()


def hf_tokenizer_config(vocab: SentencePieceVocab) -> dict[str, object]:
    """``tokenizer_config.json``: load ``tokenizer.json`` as written, BOS first, special-token text is text.

    ``PreTrainedTokenizerFast`` (not ``LlamaTokenizer``) because transformers 5 rebuilds a Llama
    tokenizer's pipeline around ``Metaspace`` (see :func:`hf_tokenizer_json`). BOS is added by
    default because llama2.c models were trained with it first (run.c's ``encode(text, bos=1)``;
    modelpress adds it too). ``split_special_tokens``: run.c and SentencePiece read ``"<s>"`` in
    the text as three characters, not as BOS.
    """
    p = vocab.pieces
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": p[vocab.bos_id], "eos_token": p[vocab.eos_id],
            "unk_token": p[vocab.unk_id], "add_bos_token": True, "add_eos_token": False,
            "split_special_tokens": True, "clean_up_tokenization_spaces": False}


def write_hf_tokenizer(vocab: SentencePieceVocab, directory: str | Path) -> list[Path]:
    """Write ``tokenizer.model``, ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``.

    Example:
        >>> write_hf_tokenizer(tok.sentencepiece_vocab(), "out")  # doctest: +SKIP
        >>> AutoTokenizer.from_pretrained("out").encode("Hi", add_special_tokens=False)  # doctest: +SKIP
        [320, 417]
    """
    folder = Path(directory)
    files = {"tokenizer.model": sentencepiece_model_proto(vocab), "tokenizer.json": hf_tokenizer_json(vocab).encode(),
             "tokenizer_config.json": json.dumps(hf_tokenizer_config(vocab), indent=2).encode()}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]

