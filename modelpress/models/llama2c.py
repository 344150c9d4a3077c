"""Import llama2.c checkpoints (``.bin``) and tokenizers as Hugging Face Llama models.

llama2.c's legacy checkpoint is a 7-int32 header followed by raw float32 tensors, and its
tokenizer file is a list of ``(score, bytes)`` pieces merged greedily by score. Both are read
without pickle; the tests check that the converted model reproduces run.c's logits.

Example:
    >>> model = llama2c_to_hf("stories260K.bin")                          # doctest: +SKIP
    >>> tok = Llama2cTokenizer(find_llama2c_tokenizer("stories260K.bin"))  # doctest: +SKIP
    >>> model(torch.tensor([tok.encode("Once upon a time")])).logits.shape  # doctest: +SKIP
    torch.Size([1, 5, 512])

A tokenizer saved into a folder also becomes ``tokenizer.model`` (SentencePiece), ``tokenizer.json``
and ``tokenizer_config.json``, which ``transformers.AutoTokenizer`` reads and which encode exactly as
run.c does (:mod:`modelpress.models.tokenizers` writes them); ``sentencepiece_vocab()`` is the same
vocabulary in the form GGUF's ``llama`` tokenizer uses.
"""
from __future__ import annotations

import heapq
import math
import re
import shutil
import struct
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from modelpress.core.errors import ModelpressError
from modelpress.models.tokenizers import SPACE, PieceType, SentencePieceVocab, write_hf_tokenizer

if TYPE_CHECKING:  # transformers is heavy: imported only when a model is built
    from transformers import LlamaConfig, LlamaForCausalLM

__all__ = [
    "Llama2cHeader",
    "Llama2cTokenizer",
    "find_llama2c_tokenizer",
    "llama2c_config",
    "llama2c_to_hf",
    "read_llama2c",
    "sentencepiece_mismatch",
]

_HEADER = struct.Struct("<7i")
_MAGIC_V1 = 0x616B3432  # "ak42": llama2.c's versioned exports, a different layout
ROPE_THETA = 10000.0  # llama2.c's precompute_freqs_cis / run.c default
RMS_NORM_EPS = 1e-5  # run.c's rmsnorm


@dataclass(frozen=True)
class Llama2cHeader:
    """Hyper-parameters from a llama2.c checkpoint header.

    ``vocab_size`` is stored positive; the file's sign becomes ``shared_classifier``
    (positive: the classifier is the embedding table; negative: ``wcls`` follows at the end).
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection: ``n_kv_heads * head_size``."""
        return self.n_kv_heads * self.head_size

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Stored tensors and their shapes, in file order (run.c ``memory_map_weights``)."""
        n_l, d, h, kv, v = self.n_layers, self.dim, self.hidden_dim, self.kv_dim, self.vocab_size
        shapes = {
            "tok_embeddings": (v, d), "rms_att": (n_l, d),
            "wq": (n_l, d, d), "wk": (n_l, kv, d), "wv": (n_l, kv, d), "wo": (n_l, d, d),
            "rms_ffn": (n_l, d), "w1": (n_l, h, d), "w2": (n_l, d, h), "w3": (n_l, h, d),
            "rms_final": (d,),
            "freq_cis_real": (self.seq_len, self.head_size // 2),
            "freq_cis_imag": (self.seq_len, self.head_size // 2),
        }
        if not self.shared_classifier:
            shapes["wcls"] = (v, d)
        return shapes

    def expected_bytes(self) -> int:
        """Exact file size this header implies."""
        return _HEADER.size + 4 * sum(math.prod(s) for s in self.tensor_shapes().values())


def _parse_header(path: Path, raw: bytes) -> Llama2cHeader:
    """Decode and sanity-check the 7 int32 header fields; bad values are a bad file."""
    if len(raw) < _HEADER.size:
        raise ModelpressError(f"{path}: too short for a llama2.c checkpoint ({len(raw)} bytes)")
    dim, hidden, layers, heads, kv_heads, vocab, seq = _HEADER.unpack(raw[: _HEADER.size])
    if dim == _MAGIC_V1:
        raise ModelpressError(f"{path}: versioned llama2.c export (magic 'ak42'); only the legacy format is supported")
    header = Llama2cHeader(dim, hidden, layers, heads, kv_heads, abs(vocab), seq, vocab > 0)
    valid = (
        min(dim, hidden, layers, heads, kv_heads, abs(vocab), seq) > 0
        and dim % heads == 0 and (dim // heads) % 2 == 0 and heads % kv_heads == 0
    )
    if not valid:
        raise ModelpressError(f"{path}: not a llama2.c checkpoint (implausible header {header})")
    return header


def read_llama2c(path: str | Path) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """Read a legacy llama2.c checkpoint into float32 tensors named as in ``tensor_shapes``.

    The file is memory-mapped (never unpickled) and must be exactly the size the header
    implies, so a truncated download or a different format fails loudly instead of loading
    shifted weights.

    Args:
        path: the ``.bin`` checkpoint.
    Returns:
        ``(header, tensors)``; tensors are owned float32 copies, e.g. ``wq`` is
        ``(n_layers, dim, dim)`` in (out, in) order like ``nn.Linear.weight``.
    Example:
        >>> header, w = read_llama2c("stories260K.bin")  # doctest: +SKIP
        >>> header.n_kv_heads, tuple(w["wk"].shape)      # doctest: +SKIP
        (4, (5, 32, 64))
    """
    path = Path(path)
    if not path.is_file():
        raise ModelpressError(f"{path}: llama2.c checkpoint not found")
    with path.open("rb") as f:
        header = _parse_header(path, f.read(_HEADER.size))
    expected, actual = header.expected_bytes(), path.stat().st_size
    if actual != expected:
        raise ModelpressError(
            f"{path}: expected {expected} bytes for a llama2.c checkpoint with dim={header.dim} "
            f"layers={header.n_layers} vocab={header.vocab_size}, found {actual} bytes"
        )
    flat = np.memmap(path, dtype="<f4", mode="r", offset=_HEADER.size)
    return header, _split_tensors(flat, header.tensor_shapes())


def _split_tensors(flat: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Cut the flat float32 payload into owned tensors (copies, so the map can close)."""
    tensors, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        tensors[name] = torch.from_numpy(flat[offset : offset + n].astype(np.float32).reshape(shape))
        offset += n
    return tensors


def llama2c_config(header: Llama2cHeader) -> LlamaConfig:
    """The ``LlamaConfig`` that computes what run.c computes for this header."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=header.vocab_size, hidden_size=header.dim, intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers, num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads, max_position_embeddings=header.seq_len,
        rms_norm_eps=RMS_NORM_EPS, rope_theta=ROPE_THETA, hidden_act="silu",
        attention_bias=False, mlp_bias=False, tie_word_embeddings=header.shared_classifier,
        bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"],
        attn_implementation="eager",  # deterministic on CPU, no SDPA kernel choice
    )


def interleaved_to_half_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from llama2.c's RoPE layout to HF's ``rotate_half`` layout.

    Within a head llama2.c rotates rows ``(2j, 2j+1)`` together (complex view); HF rotates
    ``(j, j + head_size/2)``. Both use frequency ``theta^(-2j/head_size)`` for pair ``j``.
    """
    rows, cols = w.shape  # (n_heads * head_size, dim)
    head_size = rows // n_heads
    # (heads, pair j, re/im, dim) -> (heads, re/im, pair j, dim)
    return w.reshape(n_heads, head_size // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_state_dict(header: Llama2cHeader, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename llama2.c tensors to ``LlamaForCausalLM`` keys (freq tables are recomputed by HF)."""
    state = {"model.embed_tokens.weight": w["tok_embeddings"], "model.norm.weight": w["rms_final"]}
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": w["rms_att"][i],
            p + "self_attn.q_proj.weight": interleaved_to_half_rope(w["wq"][i], header.n_heads),
            p + "self_attn.k_proj.weight": interleaved_to_half_rope(w["wk"][i], header.n_kv_heads),
            p + "self_attn.v_proj.weight": w["wv"][i],
            p + "self_attn.o_proj.weight": w["wo"][i],
            p + "post_attention_layernorm.weight": w["rms_ffn"][i],
            p + "mlp.gate_proj.weight": w["w1"][i],
            p + "mlp.up_proj.weight": w["w3"][i],
            p + "mlp.down_proj.weight": w["w2"][i],
        }
    if not header.shared_classifier:
        state["lm_head.weight"] = w["wcls"]
    return state


def _load_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``state`` into ``model`` key by key, refusing unknown, missing or misshapen keys."""
    target = model.state_dict()
    for key, tensor in state.items():
        if key not in target or target[key].shape != tensor.shape:
            got = tuple(target[key].shape) if key in target else "no such key"
            raise ModelpressError(f"{source}: {key} has shape {tuple(tensor.shape)}, model expects {got}")
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(target) - set(state) - tied)
    if missing:
        raise ModelpressError(f"{source}: checkpoint provides no weights for {missing[:3]}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()


def llama2c_to_hf(path: str | Path) -> LlamaForCausalLM:
    """Convert a llama2.c checkpoint into an eval-mode float32 ``LlamaForCausalLM``.

    Args:
        path: the legacy ``.bin`` checkpoint.
    Returns:
        A model whose logits match run.c's ``forward`` (eager attention, tied or separate
        classifier as the header's vocab sign says).
    Example:
        >>> model = llama2c_to_hf("stories260K.bin")     # doctest: +SKIP
        >>> model.config.num_key_value_heads              # doctest: +SKIP
        4
    """
    from transformers import LlamaForCausalLM

    header, weights = read_llama2c(path)
    model = LlamaForCausalLM(llama2c_config(header))
    _load_checked(model, _hf_state_dict(header, weights), Path(path))
    return model.float().eval()


# ---------------------------------------------------------------------------- tokenizer

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
_MIN_SCORE = float(np.float32(-1e10))  # run.c's initial best_score: merges must beat it
MergeFn = Callable[[int, int], "tuple[float, int] | None"]


def _read_tokenizer_file(path: Path) -> tuple[int, list[bytes], list[float]]:
    """Parse ``int32 max_token_len`` then ``{float32 score, int32 len, bytes}`` per token."""
    raw = path.read_bytes()
    if len(raw) < 4:
        raise ModelpressError(f"{path}: too short for a llama2.c tokenizer ({len(raw)} bytes)")
    (max_len,), offset, pieces, scores = struct.unpack_from("<i", raw), 4, [], []
    while offset < len(raw):
        if offset + 8 > len(raw):
            raise ModelpressError(f"{path}: truncated llama2.c tokenizer at token {len(pieces)}")
        score, n = struct.unpack_from("<fi", raw, offset)
        if n < 0 or offset + 8 + n > len(raw):
            raise ModelpressError(f"{path}: truncated or corrupt llama2.c tokenizer at token {len(pieces)}")
        pieces.append(raw[offset + 8 : offset + 8 + n])
        scores.append(score)
        offset += 8 + n
    if len(pieces) < 259:
        raise ModelpressError(f"{path}: llama2.c tokenizer needs >= 259 tokens (specials + bytes), has {len(pieces)}")
    return max_len, pieces, scores


def _merge_pairs(tokens: list[int], best_merge: MergeFn) -> list[int]:
    """run.c's merge loop in O(n log n): repeatedly merge the best-scoring adjacent pair.

    A heap keyed on ``(-score, original index of the left token)`` pops exactly the pair
    run.c's linear scan picks (highest score, leftmost on ties): merged tokens keep their
    left token's index, so indices stay in sequence order. Stale entries are skipped.
    """
    n = len(tokens)
    toks, nxt, prv, alive = list(tokens), list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n

    def entry(i: int, j: int) -> tuple[float, int, int, int, int, int] | None:
        found = best_merge(toks[i], toks[j])
        return None if found is None else (-found[0], i, j, toks[i], toks[j], found[1])

    heap = [e for i in range(n - 1) if (e := entry(i, i + 1)) is not None]
    heapq.heapify(heap)
    while heap:
        _, i, j, a, b, merged = heapq.heappop(heap)
        if not (alive[i] and alive[j] and nxt[i] == j and toks[i] == a and toks[j] == b):
            continue  # stale: one side was merged into something else since
        toks[i], alive[j], nxt[i] = merged, False, nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
        for left, right in ((prv[i], i), (i, nxt[i])):
            if 0 <= left and right < n and (e := entry(left, right)) is not None:
                heapq.heappush(heap, e)
    return [t for t, live in zip(toks, alive) if live]


class Llama2cTokenizer:
    """llama2.c's tokenizer (``tokenizer.bin`` / ``tok512.bin``), bit-exact with run.c.

    ``encode`` follows run.c's ``encode``: dummy ``" "`` prefix, per-codepoint lookup with
    byte fallback (id = byte + 3), then greedy highest-score pair merges over the whole
    string. For speed, when no vocabulary piece holds a space after its first byte (true of
    SentencePiece vocabularies trained with whitespace splitting, e.g. tok512) no merge can
    cross the point before a space, so the text is merged word by word with a cache; the
    result is identical. Otherwise the whole string is merged at once (still O(n log n)).
    Like C strings, the text ends at its first NUL character.

    Example:
        >>> tok = Llama2cTokenizer("tok512.bin")  # doctest: +SKIP
        >>> tok.decode(tok.encode("Once upon a time"))  # doctest: +SKIP
        'Once upon a time'
    """

    bos_token_id = 1
    eos_token_id = 2
    FILENAME = "tokenizer.bin"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelpressError(f"{self.path}: llama2.c tokenizer not found")
        self.max_token_length, self.pieces, self.scores = _read_tokenizer_file(self.path)
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(self.pieces):
            self._ids.setdefault(piece, i)  # duplicates: first id wins (run.c's bsearch: any)
        if b" " not in self._ids:
            raise ModelpressError(f"{self.path}: llama2.c tokenizer has no ' ' piece for the dummy prefix")
        self._decoded = [_piece_bytes(p) for p in self.pieces]
        self._word_safe = all(p and b" " not in p[1:] for p in self.pieces)
        self._pair_cache: dict[tuple[int, int], tuple[float, int] | None] = {}
        self._word_cache: dict[str, list[int]] = {}

    @classmethod
    def from_dir(cls, directory: str | Path) -> Llama2cTokenizer:
        """Load ``tokenizer.bin`` from a directory written by ``save``."""
        return cls(Path(directory) / cls.FILENAME)

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.bin`` (what modelpress reloads) and the Hugging Face files; returns the first.

        The HF files (:func:`write_hf_tokenizer`) let other tools read the folder with
        ``AutoTokenizer``. A vocabulary SentencePiece cannot hold exactly gets ``tokenizer.bin`` only,
        and a warning that says why, rather than an HF tokenizer that encodes differently.
        """
        target = Path(directory) / self.FILENAME
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.resolve() != self.path.resolve():
            shutil.copyfile(self.path, target)
        try:
            vocab = self.sentencepiece_vocab()
        except ModelpressError as e:
            warnings.warn(f"no Hugging Face tokenizer files written: {e}", stacklevel=2)
        else:
            write_hf_tokenizer(vocab, target.parent)
        return target

    def sentencepiece_vocab(self) -> SentencePieceVocab:
        """This vocabulary as SentencePiece and llama.cpp spell it (same ids and scores).

        Raises ModelpressError when it cannot be written so that SentencePiece encodes like run.c.
        """
        why = sentencepiece_mismatch(self.pieces, self.scores)
        if why is not None:
            raise ModelpressError(f"{self.path}: cannot be written as a SentencePiece vocabulary: {why}")
        types = [_piece_type(i) for i in range(len(self.pieces))]
        texts = [_SPECIAL_TEXT.get(i) or p.decode("utf-8").replace(" ", SPACE) for i, p in enumerate(self.pieces)]
        return SentencePieceVocab(tuple(texts), tuple(self.scores), tuple(types))

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the vocabulary."""
        return len(self.pieces)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids for ``text`` exactly as run.c's ``encode(text, bos, eos)`` returns them."""
        text = text.split("\0", 1)[0]
        body = [self.bos_token_id] if bos else []
        if text and self._word_safe:
            body += [t for word in (" " + text).split(" ")[1:] for t in self._encode_word(" " + word)]
        elif text:
            body = _merge_pairs(body + self._codepoint_ids(" " + text), self._best_merge)
        return body + [self.eos_token_id] if eos else body

    def _encode_word(self, word: str) -> list[int]:
        """Merged ids of one space-led chunk, cached (words repeat a lot in prose)."""
        ids = self._word_cache.get(word)
        if ids is None:
            if len(self._word_cache) > 200_000:
                self._word_cache.clear()
            ids = self._word_cache[word] = _merge_pairs(self._codepoint_ids(word), self._best_merge)
        return ids

    def _codepoint_ids(self, text: str) -> list[int]:
        """One id per UTF-8 codepoint, or one byte-fallback id (byte + 3) per byte if unknown."""
        ids: list[int] = []
        for ch in text:
            raw = ch.encode("utf-8", "surrogatepass")
            found = self._ids.get(raw)
            ids.extend([found] if found is not None else [b + 3 for b in raw])
        return ids

    def _best_merge(self, a: int, b: int) -> tuple[float, int] | None:
        """``(score, id)`` of the piece spelled ``pieces[a] + pieces[b]``, if it may merge."""
        key = (a, b)
        if key not in self._pair_cache:
            merged = self._ids.get(self.pieces[a] + self.pieces[b])
            ok = merged is not None and self.scores[merged] > _MIN_SCORE
            self._pair_cache[key] = (self.scores[merged], merged) if ok else None
        return self._pair_cache[key]

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids`` as run.c prints it.

        Byte pieces ``<0xNN>`` become raw bytes, the leading space of the piece after BOS is
        dropped (SentencePiece's dummy prefix), BOS/EOS themselves print nothing, and invalid
        UTF-8 is replaced with U+FFFD.
        """
        out, prev = bytearray(), -1
        for t in ids:
            if not 0 <= t < len(self.pieces):
                raise ModelpressError(f"token id {t} outside the vocabulary (size {len(self.pieces)})")
            if t not in (self.bos_token_id, self.eos_token_id):
                piece = self._decoded[t]
                out += piece[1:] if prev == self.bos_token_id and piece.startswith(b" ") else piece
            prev = t
        return out.decode("utf-8", errors="replace")


def _piece_bytes(piece: bytes) -> bytes:
    """Printable bytes of one piece: ``<0xNN>`` byte tokens become the raw byte."""
    match = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(match.group(1), 16)]) if match else piece


def find_llama2c_tokenizer(model_path: str | Path) -> Path | None:
    """The tokenizer stored next to a llama2.c checkpoint: ``tokenizer.bin``, else ``tok*.bin``.

    Returns ``None`` when there is none; several ``tok*.bin`` candidates are ambiguous and
    raise, since guessing would silently pair the model with the wrong vocabulary.
    """
    model_path = Path(model_path)
    folder = model_path.parent
    if (folder / Llama2cTokenizer.FILENAME).is_file():
        return folder / Llama2cTokenizer.FILENAME
    found = sorted(p for p in folder.glob("tok*.bin") if p.is_file() and p.resolve() != model_path.resolve())
    if len(found) > 1:
        raise ModelpressError(f"{folder}: several llama2.c tokenizers {[p.name for p in found]}; pass one explicitly")
    return found[0] if found else None


# ---------------------------------------------------------------------------- SentencePiece form

_SPECIAL_TEXT = {0: "<unk>", 1: "<s>", 2: "</s>"}  # the export spelled BOS/EOS "\n<s>\n" / "\n</s>\n"
_N_SPECIAL_AND_BYTES = 3 + 256


def _piece_type(i: int) -> PieceType:
    """llama2.c's fixed layout: unk, BOS, EOS, then the 256 byte pieces, then merged pieces."""
    if i == 0:
        return PieceType.UNKNOWN
    if i < 3:
        return PieceType.CONTROL
    return PieceType.BYTE if i < _N_SPECIAL_AND_BYTES else PieceType.NORMAL


def sentencepiece_mismatch(pieces: list[bytes], scores: list[float]) -> str | None:
    """Why SentencePiece could not encode this llama2.c vocabulary exactly as run.c does, or None.

    run.c looks up and merges into *any* piece; SentencePiece has byte fallback at fixed names,
    unique UTF-8 pieces, and merges only into normal pieces. Vocabularies exported from SentencePiece
    (all llama2.c ones) pass.
    """
    if any(pieces[3 + b] != b"<0x%02X>" % b for b in range(256)):
        return "ids 3..258 are not the byte pieces <0x00>..<0xFF>"
    normal = pieces[_N_SPECIAL_AND_BYTES:]
    try:
        texts = [p.decode("utf-8") for p in normal]
    except UnicodeDecodeError:
        return "a piece is not valid UTF-8"
    if any(not t or SPACE in t for t in texts) or len(set(texts) | set(_SPECIAL_TEXT.values())) != len(texts) + 3:
        return f"a piece is empty, contains {SPACE!r}, or is listed twice"
    if any(len(t) > 1 and s <= _MIN_SCORE for t, s in zip(texts, scores[_N_SPECIAL_AND_BYTES:])):
        return "a piece has a score run.c never merges into (<= -1e10)"
    known = set(pieces)
    if any(p[:k] in known and p[k:] in known for p in pieces[:_N_SPECIAL_AND_BYTES] for k in range(1, len(p))):
        return "a special or byte piece is spelled by two other pieces (run.c would merge into it)"
    return None
