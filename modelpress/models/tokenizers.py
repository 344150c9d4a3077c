"""A small tokenizer protocol so evaluation and calibration work for HF and llama2.c models alike."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class TextTokenizer(Protocol):
    """What modelpress needs from a tokenizer."""

    bos_token_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""

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

    def save(self, directory: Path) -> None:
        self.tok.save(directory)
