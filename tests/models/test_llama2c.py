"""llama2.c import: the converted HF model must compute what run.c computes.

The reference below is a fresh transcription of run.c's ``forward`` (one token at a time, KV
cache, interleaved-pair RoPE) and ``encode`` (linear-scan BPE merges); nothing in it calls the
code under test, so agreement means the conversion (including the q/k row permutation) is
right rather than consistently wrong.
"""
from __future__ import annotations

import math
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.core.errors import ModelpressError
from modelpress.models import llama2c
from modelpress.models.llama2c import (
    Llama2cTokenizer,
    find_llama2c_tokenizer,
    llama2c_to_hf,
    read_llama2c,
)

DATA = Path("/work/shared/data")
CKPT = DATA / "stories260k" / "stories260K.bin"
TOK = DATA / "stories260k" / "tok512.bin"
SAMPLE = DATA / "tinystories" / "tinystories_sample.txt"
VAL_HEAD = DATA / "tinystories" / "tinystories_val_head.txt"

needs_ckpt = pytest.mark.skipif(not CKPT.is_file(), reason=f"stories260K checkpoint not staged at {CKPT}")
needs_tok = pytest.mark.skipif(not TOK.is_file(), reason=f"tok512 tokenizer not staged at {TOK}")

# karpathy/llama2.c README: `./run stories260K/stories260K.bin -z stories260K/tok512.bin -t 0.0`
# (256 greedy steps from BOS alone).
README_SAMPLE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. "
    "She said, \"I want to play with your ball, but I can't find it.\"\n"
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she said, \"I'm sorry, mom. I didn't know what to do.\" "
    "Her mom said, \"Don't worry, Lily. We can help you."
)

ORDER = ["tok_embeddings", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
         "rms_final", "freq_cis_real", "freq_cis_imag", "wcls"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matmuls are dominated by thread hand-off on shared CPUs; one thread is ~10x faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------- run.c reference


def _rmsnorm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return weight * (x / np.sqrt(np.mean(x * x) + 1e-5))


def _rope(vec: np.ndarray, pos: int, head_size: int) -> np.ndarray:
    """run.c: rotate pairs (i, i+1) by pos * 10000^(-(i % head_size) / head_size)."""
    i = np.arange(0, vec.size, 2)
    val = pos * (1.0 / 10000.0 ** ((i % head_size) / head_size))
    fcr, fci = np.cos(val), np.sin(val)
    out = np.empty_like(vec)
    out[0::2] = vec[0::2] * fcr - vec[1::2] * fci
    out[1::2] = vec[0::2] * fci + vec[1::2] * fcr
    return out


class RunC:
    """run.c's ``forward(token, pos)`` in float64 numpy, with the same KV cache layout."""

    def __init__(self, cfg: tuple[int, ...], w: dict[str, np.ndarray]) -> None:
        self.dim, self.hidden, self.n_layers, self.n_heads, self.n_kv, self.vocab, self.seq = cfg
        self.w = {k: v.astype(np.float64) for k, v in w.items()}
        self.hs = self.dim // self.n_heads
        kv_dim = self.n_kv * self.hs
        self.key_cache = np.zeros((self.n_layers, self.seq, kv_dim))  # (layer, pos, kv_dim)
        self.value_cache = np.zeros((self.n_layers, self.seq, kv_dim))

    def _attention(self, layer: int, q: np.ndarray, pos: int) -> np.ndarray:
        kv_mul, hs, out = self.n_heads // self.n_kv, self.hs, np.zeros(self.dim)
        for h in range(self.n_heads):
            kvh = slice((h // kv_mul) * hs, (h // kv_mul + 1) * hs)
            keys = self.key_cache[layer, : pos + 1, kvh]  # (pos+1, hs)
            att = keys @ q[h * hs : (h + 1) * hs] / math.sqrt(hs)
            att = np.exp(att - att.max())
            att /= att.sum()
            out[h * hs : (h + 1) * hs] = att @ self.value_cache[layer, : pos + 1, kvh]
        return out

    def forward(self, token: int, pos: int) -> np.ndarray:
        w, x = self.w, self.w["tok_embeddings"][token].copy()  # (dim,)
        for l in range(self.n_layers):
            xb = _rmsnorm(x, w["rms_att"][l])
            q = _rope(w["wq"][l] @ xb, pos, self.hs)  # (dim,)
            self.key_cache[l, pos] = _rope(w["wk"][l] @ xb, pos, self.hs)  # (kv_dim,)
            self.value_cache[l, pos] = w["wv"][l] @ xb
            x = x + w["wo"][l] @ self._attention(l, q, pos)
            xb = _rmsnorm(x, w["rms_ffn"][l])
            hb, hb2 = w["w1"][l] @ xb, w["w3"][l] @ xb  # (hidden,)
            x = x + w["w2"][l] @ (hb / (1.0 + np.exp(-hb)) * hb2)
        x = _rmsnorm(x, w["rms_final"])
        return w.get("wcls", w["tok_embeddings"]) @ x  # (vocab,)

    def logits(self, tokens: list[int]) -> np.ndarray:
        return np.stack([self.forward(t, pos) for pos, t in enumerate(tokens)])  # (T, vocab)

    def greedy(self, prompt: list[int], n_new: int) -> list[int]:
        """run.c generate() at temperature 0: feed the prompt, then argmax; stop on BOS."""
        tokens = list(prompt)
        for pos in range(len(prompt) + n_new - 1):
            logits = self.forward(tokens[pos], pos)
            if pos >= len(prompt) - 1:
                nxt = int(np.argmax(logits))
                if nxt == 1:
                    break
                tokens.append(nxt)
        return tokens


def _parse_checkpoint(path: Path) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    """Independent reader for the reference: header, then tensors in run.c order."""
    cfg = struct.unpack("<7i", path.read_bytes()[:28])
    dim, hidden, n_l, n_h, n_kv, vocab, seq = cfg
    hs, v = dim // n_h, abs(vocab)
    shapes = [(v, dim), (n_l, dim), (n_l, dim, dim), (n_l, n_kv * hs, dim), (n_l, n_kv * hs, dim),
              (n_l, dim, dim), (n_l, dim), (n_l, hidden, dim), (n_l, dim, hidden), (n_l, hidden, dim),
              (dim,), (seq, hs // 2), (seq, hs // 2)] + ([] if vocab > 0 else [(v, dim)])
    flat, out, off = np.fromfile(path, dtype="<f4", offset=28), {}, 0
    for name, shape in zip(ORDER, shapes):
        out[name] = flat[off : off + math.prod(shape)].reshape(shape)
        off += math.prod(shape)
    assert off == flat.size
    return (dim, hidden, n_l, n_h, n_kv, v, seq), out


def _write_checkpoint(path: Path, cfg: tuple[int, ...], shared: bool, seed: int) -> None:
    """A random llama2.c checkpoint in the legacy layout (freq tables as export.py writes them)."""
    dim, hidden, n_l, n_h, n_kv, vocab, seq = cfg
    hs, rng = dim // n_h, np.random.default_rng(seed)
    shapes = {"tok_embeddings": (vocab, dim), "rms_att": (n_l, dim), "wq": (n_l, dim, dim),
              "wk": (n_l, n_kv * hs, dim), "wv": (n_l, n_kv * hs, dim), "wo": (n_l, dim, dim),
              "rms_ffn": (n_l, dim), "w1": (n_l, hidden, dim), "w2": (n_l, dim, hidden),
              "w3": (n_l, hidden, dim), "rms_final": (dim,)}
    w = {k: rng.normal(0, 0.3, s) + (1.0 if k.startswith("rms") else 0.0) for k, s in shapes.items()}
    angles = np.outer(np.arange(seq), 1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs))  # (seq, hs/2)
    w["freq_cis_real"], w["freq_cis_imag"] = np.cos(angles), np.sin(angles)
    if not shared:
        w["wcls"] = rng.normal(0, 0.3, (vocab, dim))
    header = struct.pack("<7i", dim, hidden, n_l, n_h, n_kv, vocab if shared else -vocab, seq)
    path.write_bytes(header + b"".join(w[k].astype("<f4").tobytes() for k in ORDER if k in w))


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def real_model() -> torch.nn.Module:
    if not CKPT.is_file():
        pytest.skip(f"stories260K checkpoint not staged at {CKPT}")
    return llama2c_to_hf(CKPT)


@pytest.fixture(scope="module")
def real_reference() -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    if not CKPT.is_file():
        pytest.skip(f"stories260K checkpoint not staged at {CKPT}")
    return _parse_checkpoint(CKPT)


@pytest.fixture(scope="module")
def tok() -> Llama2cTokenizer:
    if not TOK.is_file():
        pytest.skip(f"tok512 tokenizer not staged at {TOK}")
    return Llama2cTokenizer(TOK)


def _hf_logits(model: torch.nn.Module, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()  # (T, vocab)


# ---------------------------------------------------------------------------- checkpoint reading

TINY = {  # (dim, hidden, layers, heads, kv_heads, vocab, seq_len), shared classifier
    "gqa-shared": ((32, 40, 2, 4, 2, 48, 24), True),
    "gqa-separate": ((32, 40, 2, 4, 2, 48, 24), False),
    "mqa-separate": ((48, 64, 3, 6, 1, 37, 20), False),
    "mha-shared": ((16, 24, 1, 2, 2, 30, 16), True),
}


@needs_ckpt
def test_reads_stories260k_header_and_shapes() -> None:
    header, w = read_llama2c(CKPT)
    assert (header.dim, header.hidden_dim, header.n_layers, header.n_heads, header.n_kv_heads,
            header.vocab_size, header.seq_len) == (64, 172, 5, 8, 4, 512, 512)
    assert header.shared_classifier and "wcls" not in w
    assert tuple(w["wk"].shape) == (5, 32, 64) and w["wq"].dtype == torch.float32
    params = sum(t.numel() for k, t in w.items() if not k.startswith("freq"))
    assert params == 260_032  # SOURCES.md


@needs_ckpt
def test_stored_rope_tables_match_theta_10000(real_reference) -> None:
    """The checkpoint's own freq_cis tables confirm theta=10000 and the per-pair layout."""
    (dim, _, _, n_heads, _, _, seq), w = real_reference
    hs = dim // n_heads
    angles = np.outer(np.arange(seq), 1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs))
    np.testing.assert_allclose(w["freq_cis_real"], np.cos(angles), atol=1e-4)
    np.testing.assert_allclose(w["freq_cis_imag"], np.sin(angles), atol=1e-4)


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_checkpoint_round_trips_through_reader(tmp_path: Path, name: str) -> None:
    cfg, shared = TINY[name]
    _write_checkpoint(tmp_path / "m.bin", cfg, shared, seed=0)
    header, w = read_llama2c(tmp_path / "m.bin")
    _, ref = _parse_checkpoint(tmp_path / "m.bin")
    assert header.shared_classifier == shared and header.vocab_size == cfg[5]
    assert list(w) == [k for k in ORDER if k in ref]
    for k in ref:
        assert torch.equal(w[k], torch.from_numpy(ref[k].astype(np.float32)))


# ---------------------------------------------------------------------------- logits parity


@pytest.mark.parametrize("name", list(TINY))
def test_hf_logits_match_run_c_on_tiny_checkpoint(tmp_path: Path, name: str) -> None:
    cfg, shared = TINY[name]
    _write_checkpoint(tmp_path / "m.bin", cfg, shared, seed=1)
    model = llama2c_to_hf(tmp_path / "m.bin")
    tokens = np.random.default_rng(2).integers(0, cfg[5], cfg[6]).tolist()  # full context
    expected = RunC(*_parse_checkpoint(tmp_path / "m.bin")).logits(tokens)
    assert np.abs(_hf_logits(model, tokens) - expected).max() < 1e-4
    assert model.config.tie_word_embeddings == shared
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == shared


def test_rope_permutation_is_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verify, not assume: without the q/k row permutation the logits are clearly wrong."""
    cfg, shared = TINY["gqa-separate"]
    _write_checkpoint(tmp_path / "m.bin", cfg, shared, seed=3)
    tokens = list(range(1, 17))
    expected = RunC(*_parse_checkpoint(tmp_path / "m.bin")).logits(tokens)
    monkeypatch.setattr(llama2c, "interleaved_to_half_rope", lambda w, n_heads: w)
    unpermuted = _hf_logits(llama2c_to_hf(tmp_path / "m.bin"), tokens)
    assert np.abs(unpermuted - expected).max() > 1e-2


@needs_ckpt
def test_hf_logits_match_run_c_on_stories260k(real_model, real_reference, tok) -> None:
    tokens = tok.encode(SAMPLE.read_text()[:700])[:128]
    expected = RunC(*real_reference).logits(tokens)
    diff = np.abs(_hf_logits(real_model, tokens) - expected).max()
    assert diff < 1e-4, diff


@needs_ckpt
def test_converted_model_is_eval_float32_eager(real_model) -> None:
    cfg = real_model.config
    assert not real_model.training
    assert all(p.dtype == torch.float32 for p in real_model.parameters())
    assert cfg._attn_implementation == "eager" and cfg.hidden_act == "silu"
    assert (cfg.rms_norm_eps, cfg.bos_token_id, cfg.eos_token_id, cfg.max_position_embeddings) == (1e-5, 1, 2, 512)


@needs_ckpt
def test_converted_model_survives_save_pretrained(real_model, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    real_model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = [1, 403, 407, 261, 378]
    assert np.array_equal(_hf_logits(reloaded, tokens), _hf_logits(real_model, tokens))


# ---------------------------------------------------------------------------- generation


@needs_ckpt
def test_greedy_sample_matches_karpathy_readme(real_model, tok) -> None:
    with torch.no_grad():
        out = real_model.generate(torch.tensor([[1]]), max_new_tokens=256, do_sample=False,
                                  eos_token_id=1, pad_token_id=0)
    assert tok.decode(out[0].tolist()) == README_SAMPLE


@needs_ckpt
def test_greedy_from_prompt_matches_run_c(real_model, real_reference, tok) -> None:
    prompt = tok.encode("Once upon a time")
    expected = RunC(*real_reference).greedy(prompt, 50)
    with torch.no_grad():
        out = real_model.generate(torch.tensor([prompt]), max_new_tokens=50, do_sample=False,
                                  eos_token_id=1, pad_token_id=0)
    assert out[0].tolist() == expected and len(expected) == len(prompt) + 50
    assert tok.decode(expected).startswith("Once upon a time, there was a little girl named Lily.")


# ---------------------------------------------------------------------------- tokenizer


def naive_encode(pieces: list[bytes], scores: list[float], text: str, bos: bool, eos: bool) -> list[int]:
    """run.c ``encode`` transcribed byte by byte, including its O(n^2) merge scan."""
    lookup: dict[bytes, int] = {}
    for i, p in enumerate(pieces):
        lookup.setdefault(p, i)
    raw = text.encode("utf-8", "surrogatepass").split(b"\0")[0]  # a C string ends at NUL
    tokens = ([1] if bos else []) + ([lookup[b" "]] if raw else [])
    buf = b""
    for idx, c in enumerate(raw):
        if c & 0xC0 != 0x80:
            buf = b""
        buf += bytes([c])
        following = raw[idx + 1] if idx + 1 < len(raw) else 0
        if following & 0xC0 == 0x80 and len(buf) < 4:
            continue
        tokens += [lookup[buf]] if buf in lookup else [b + 3 for b in buf]
        buf = b""
    while True:
        best_score, best_id, best_idx = np.float32(-1e10), -1, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]], -1)
            if merged != -1 and scores[merged] > best_score:
                best_score, best_id, best_idx = scores[merged], merged, i
        if best_idx == -1:
            break
        tokens[best_idx : best_idx + 2] = [best_id]
    return tokens + ([2] if eos else [])


_CHARS = list("abehilnorst TOLy.,!?'\"\n-<>0x") + ["é", "â", "€", "™", "中", "🙂", "  ", "the ", "\0"]
_TEXTS = st.one_of(st.lists(st.sampled_from(_CHARS), max_size=40).map("".join), st.text(max_size=30))


@settings(max_examples=300, deadline=None)
@given(text=_TEXTS, bos=st.booleans(), eos=st.booleans())
def test_fast_encode_equals_naive_run_c(tok: Llama2cTokenizer, text: str, bos: bool, eos: bool) -> None:
    assert tok.encode(text, bos=bos, eos=eos) == naive_encode(tok.pieces, tok.scores, text, bos, eos)


@pytest.fixture(scope="module")
def inner_space_tok(tmp_path_factory: pytest.TempPathFactory) -> Llama2cTokenizer:
    """tok512 plus pieces with inner spaces and tied scores: forces the whole-string merge path."""
    if not TOK.is_file():
        pytest.skip(f"tok512 tokenizer not staged at {TOK}")
    extra = [(0.0, b"e t"), (0.0, b"  "), (-1.0, b"he "), (-1.0, b"e  "), (-3.0, b". T")]
    path = tmp_path_factory.mktemp("tok") / "tok_inner.bin"
    path.write_bytes(TOK.read_bytes() + b"".join(struct.pack("<fi", s, len(p)) + p for s, p in extra))
    return Llama2cTokenizer(path)


@settings(max_examples=200, deadline=None)
@given(text=_TEXTS, bos=st.booleans())
def test_whole_string_merge_equals_naive(inner_space_tok: Llama2cTokenizer, text: str, bos: bool) -> None:
    tok = inner_space_tok
    assert not tok._word_safe
    assert tok.encode(text, bos=bos) == naive_encode(tok.pieces, tok.scores, text, bos, False)


@needs_tok
def test_fast_encode_equals_naive_on_tinystories(tok, inner_space_tok) -> None:
    text = SAMPLE.read_text()[:1500]
    for t in (tok, inner_space_tok):
        assert t.encode(text) == naive_encode(t.pieces, t.scores, text, True, False)


@needs_tok
def test_round_trip_on_tinystories(tok) -> None:
    text = SAMPLE.read_text()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and max(ids) < tok.vocab_size == 512
    assert len(ids) < len(text) / 2  # BPE actually merged
    assert tok.decode(ids) == text


@needs_tok
def test_encodes_800kb_quickly(tok) -> None:
    text = VAL_HEAD.read_text()
    start = time.perf_counter()
    ids = Llama2cTokenizer(TOK).encode(text)  # fresh tokenizer: cold caches
    assert time.perf_counter() - start < 20.0
    assert tok.decode(ids) == text


@needs_tok
def test_byte_fallback_for_non_ascii(tok) -> None:
    ids = tok.encode("中 🙂", bos=False)
    assert [0xE4 + 3, 0xB8 + 3, 0xAD + 3] == ids[1:4]  # 中 = E4 B8 AD, not in the vocab
    assert all(3 <= i <= 258 for i in ids[-4:])  # 🙂 = four byte tokens
    assert tok.decode(tok.encode("naïve café — 中文 🙂")) == "naïve café — 中文 🙂"


@needs_tok
def test_special_tokens_and_dummy_prefix(tok) -> None:
    assert tok.encode("") == [1] and tok.encode("", bos=False) == []
    assert tok.encode("Hi", eos=True)[-1] == tok.eos_token_id
    assert tok.decode(tok.encode("Hi", bos=False)) == " Hi"  # no BOS: run.c keeps the space
    assert tok.decode(tok.encode("Hi", eos=True)) == "Hi"
    with pytest.raises(ModelpressError, match="outside the vocabulary"):
        tok.decode([512])


@needs_tok
def test_save_and_load_from_dir(tok, tmp_path: Path) -> None:
    saved = tok.save(tmp_path / "out")
    assert saved.name == "tokenizer.bin" and saved.read_bytes() == TOK.read_bytes()
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):  # for AutoTokenizer, see
        assert (tmp_path / "out" / name).is_file()                            # test_llama2c_export_tokenizer.py
    again = Llama2cTokenizer.from_dir(tmp_path / "out")
    assert again.encode("Once upon a time") == tok.encode("Once upon a time")


def test_find_tokenizer_next_to_checkpoint(tmp_path: Path) -> None:
    model = tmp_path / "stories.bin"
    model.write_bytes(b"")
    assert find_llama2c_tokenizer(model) is None
    (tmp_path / "tok512.bin").write_bytes(b"x")
    assert find_llama2c_tokenizer(model) == tmp_path / "tok512.bin"
    (tmp_path / "tok1024.bin").write_bytes(b"x")
    with pytest.raises(ModelpressError, match="several"):
        find_llama2c_tokenizer(model)
    (tmp_path / "tokenizer.bin").write_bytes(b"x")
    assert find_llama2c_tokenizer(model) == tmp_path / "tokenizer.bin"


# ---------------------------------------------------------------------------- bad input


def test_truncated_checkpoint_names_file_and_sizes(tmp_path: Path) -> None:
    path = tmp_path / "cut.bin"
    _write_checkpoint(path, *TINY["gqa-shared"], seed=0)
    full = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelpressError, match=rf"cut\.bin.*expected {full} bytes.*found {full - 10}"):
        read_llama2c(path)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x00" * 10, "too short"),
        (struct.pack("<7i", 30, 8, 1, 4, 2, 16, 8) + b"\x00" * 64, "implausible header"),  # 30 % 4
        (struct.pack("<7i", 32, 8, 1, 4, 3, 16, 8) + b"\x00" * 64, "implausible header"),  # 4 % 3
        (struct.pack("<7i", 0x616B3432, 1, 1, 1, 1, 1, 1), "versioned"),
        (struct.pack("<7i", 32, 8, 1, 4, 2, 16, 8) + b"\x00" * 64, "expected"),
    ],
)
def test_bad_checkpoints_raise(tmp_path: Path, payload: bytes, message: str) -> None:
    (tmp_path / "bad.bin").write_bytes(payload)
    with pytest.raises(ModelpressError, match=message):
        llama2c_to_hf(tmp_path / "bad.bin")


def test_missing_files_raise(tmp_path: Path) -> None:
    with pytest.raises(ModelpressError, match="not found"):
        read_llama2c(tmp_path / "nope.bin")
    with pytest.raises(ModelpressError, match="not found"):
        Llama2cTokenizer(tmp_path / "nope.bin")


@needs_tok
def test_truncated_tokenizer_raises(tmp_path: Path) -> None:
    (tmp_path / "tok.bin").write_bytes(TOK.read_bytes()[:-3])
    with pytest.raises(ModelpressError, match="truncated"):
        Llama2cTokenizer(tmp_path / "tok.bin")


# ---------------------------------------------------------------------------- perplexity


@pytest.mark.slow
@needs_ckpt
def test_tinystories_perplexity_matches_sources(real_model, tok) -> None:
    """SOURCES.md: PPL 4.88 on the first 200k chars, 256-token windows (BOS + 255 tokens)."""
    ids = tok.encode(VAL_HEAD.read_text()[:200_000], bos=False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 255):
            window = torch.tensor([[1] + ids[start : start + 255]])  # (1, <=256)
            logits = real_model(window).logits[0, :-1]  # (T-1, vocab)
            nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    assert math.exp(nll / count) == pytest.approx(4.88, abs=0.1)
