"""llama2.c models through ``modelpress export``: GGUF that llama.cpp tokenizes and runs like run.c,
and HF folders that ``AutoTokenizer`` + ``AutoModelForCausalLM`` read (plain and compressed).

The llama.cpp check uses the prebuilt library ``bash bench/setup_llamacpp.sh`` unpacks (or
llama-cpp-python) through ``bench/peers/llamacpp.py``, and skips when neither is there.
"""
from __future__ import annotations

import importlib.util
import struct
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import modelpress as mp
from modelpress.cli.main import main
from modelpress.export.export import export
from modelpress.models.llama2c import Llama2cTokenizer
from tests.conftest import shared_file

gguf = pytest.importorskip("gguf")

PEER = Path(__file__).resolve().parents[2] / "bench" / "peers" / "llamacpp.py"


@pytest.fixture(scope="module")
def ckpt() -> Path:
    shared_file("stories260k/tok512.bin")
    return shared_file("stories260k/stories260K.bin")


@pytest.fixture(scope="module")
def tok(ckpt: Path) -> Llama2cTokenizer:
    return Llama2cTokenizer(ckpt.parent / "tok512.bin")


@pytest.fixture(scope="module")
def story() -> str:
    return shared_file("tinystories/tinystories_val_head.txt").read_text()[:3000]


@pytest.fixture(scope="module")
def ours(ckpt: Path):
    return mp.load(str(ckpt))


@pytest.fixture(scope="module")
def gguf_f32(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's command: ``modelpress export --model stories260K.bin --format gguf --gguf-type F32``."""
    out = tmp_path_factory.mktemp("gguf") / "stories260K-f32.gguf"
    assert main(["export", "--model", str(ckpt), "--format", "gguf", "--gguf-type", "F32", "--output", str(out)]) == 0
    return out


def test_gguf_holds_the_llama2c_vocabulary_exactly(gguf_f32: Path, tok: Llama2cTokenizer) -> None:
    f = gguf.GGUFReader(str(gguf_f32)).fields
    names = {0: "<unk>", 1: "<s>", 2: "</s>"}  # llama2.c's export wrote BOS/EOS as "\n<s>\n" / "\n</s>\n"
    expected = [names.get(i) or p.decode().replace(" ", "\u2581") for i, p in enumerate(tok.pieces)]
    assert f["tokenizer.ggml.model"].contents() == "llama"
    assert f["tokenizer.ggml.tokens"].contents() == expected
    assert expected[3:259] == [f"<0x{b:02X}>" for b in range(256)] and expected[259] == "\u2581t"
    assert f["tokenizer.ggml.scores"].contents() == tok.scores  # float32 both sides: bit for bit
    assert f["tokenizer.ggml.token_type"].contents() == [2, 3, 3] + [6] * 256 + [1] * (tok.vocab_size - 259)
    ids = {k: f[f"tokenizer.ggml.{k}"].contents() for k in ("bos_token_id", "eos_token_id", "unknown_token_id")}
    assert ids == {"bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0}
    assert f["tokenizer.ggml.add_bos_token"].contents() is True
    assert f["tokenizer.ggml.add_space_prefix"].contents() is True


def test_gguf_weights_read_back_by_transformers(ckpt: Path, ours, tok, tmp_path: Path) -> None:
    """All-F32 file (a float model's weights take --gguf-float-type, F16 unless asked): logits bit for bit."""
    from transformers import AutoModelForCausalLM

    rep = export(str(ckpt), "gguf", tmp_path / "m.gguf", gguf_type="F32", float_type="F32")
    assert rep.counts() == {"copied": 47}
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32,
                                               attn_implementation="eager").eval()
    ids = torch.tensor([tok.encode("Once upon a time, there was a little girl named Lily.")])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, ours.module(ids).logits)


@pytest.fixture(scope="module")
def gguf_via_hf(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama2.c -> HF folder -> GGUF: the tokenizer reaches GGUF through tokenizer.json, not tokenizer.bin."""
    d = tmp_path_factory.mktemp("via_hf")
    export(str(ckpt), "hf", d / "hf")
    rep = export(str(d / "hf"), "gguf", d / "m.gguf", gguf_type="F32", float_type="F32")
    assert any("llama vocabulary of 512 tokens from tokenizer.json" in n for n in rep.notes)
    return d / "m.gguf"


def test_gguf_from_an_hf_folder_ranks_merges_as_tokenizer_json(gguf_via_hf: Path, tok) -> None:
    """Scores come from tokenizer.json's merge ranks (gguf-py's placeholder is -1000 for every token)."""
    f = gguf.GGUFReader(str(gguf_via_hf)).fields
    assert f["tokenizer.ggml.token_type"].contents()[3:] == [6] * 256 + [1] * (tok.vocab_size - 259)
    scores = f["tokenizer.ggml.scores"].contents()
    merged = [i for i in range(259, tok.vocab_size) if len(tok.pieces[i].decode()) > 1]
    assert sorted(merged, key=lambda i: -scores[i]) == sorted(merged, key=lambda i: -tok.scores[i])
    assert len({scores[i] for i in merged}) == len(merged)


# ---------------------------------------------------------------------------- llama.cpp itself


@pytest.fixture(scope="module")
def peers() -> ModuleType:
    """bench/peers/llamacpp.py, loaded by path (bench/ on sys.path would shadow the ``kernels`` package);
    skips before any export when neither llama.cpp route is installed."""
    if not PEER.is_file():
        pytest.skip(f"{PEER} not present")
    spec = importlib.util.spec_from_file_location("modelpress_bench_llamacpp", PEER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    prebuilt = module.LIB_DIR / "_llama_cpp_cpu.cpython-311-x86_64-linux-gnu.so"
    if importlib.util.find_spec("llama_cpp") is None and not prebuilt.is_file():
        pytest.skip(f"llama.cpp not set up: no llama_cpp module and no {prebuilt} (run bash bench/setup_llamacpp.sh)")
    return module


def _open(peers: ModuleType, path: Path):
    peer, why = peers.open_llamacpp(str(path), n_threads=1, n_ctx=512)
    if peer is None:
        pytest.skip(f"llama.cpp did not start: {why}")
    return peer


def _llamacpp_tokenize(peers: ModuleType, peer, text: str, add_special: bool) -> list[int]:
    """llama.cpp's tokenizer; special-token text is not parsed (run.c reads it as characters too)."""
    raw = text.encode()
    if isinstance(peer, peers._PyLlama):
        return list(peer.llm.tokenize(raw, add_bos=add_special, special=False))
    vocab = peer.lib.llama_model_get_vocab(peer.model)
    buf = peer.ffi.new("int32_t[]", len(raw) + 8)
    n = peer.lib.llama_tokenize(vocab, raw, len(raw), buf, len(raw) + 8, add_special, False)
    assert n >= 0, f"llama_tokenize returned {n}"
    return list(buf[0:n])


def _cosines(theirs: np.ndarray, ours: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(torch.from_numpy(theirs).double(), ours.double(), dim=-1)


def test_llamacpp_tokenizes_like_run_c(peers, gguf_f32: Path, tok, story: str) -> None:
    peer = _open(peers, gguf_f32)
    for text in [story, *story.split("\n\n"), "  Hi  there ", "naïve café — 中文 🙂", "a <s> b\n\n", " "]:
        assert _llamacpp_tokenize(peers, peer, text, False) == tok.encode(text, bos=False), text[:60]
    assert _llamacpp_tokenize(peers, peer, "Once upon a time", True) == tok.encode("Once upon a time")  # BOS first


def test_llamacpp_tokenizes_a_gguf_made_from_the_hf_folder_like_run_c(peers, gguf_via_hf: Path, tok, story) -> None:
    peer = _open(peers, gguf_via_hf)
    assert _llamacpp_tokenize(peers, peer, story, False) == tok.encode(story, bos=False)


@pytest.mark.parametrize("gguf_type, float_type, floor", [("F32", "F32", 0.9999), ("Q4_0", "F16", 0.99)])
def test_llamacpp_logits_match_ours(peers, ckpt: Path, ours, tok, story: str, tmp_path: Path, gguf_type: str,
                                    float_type: str, floor: float) -> None:
    """F32 file: llama.cpp's arithmetic alone; the default export (a float model: F16 weights) adds fp16 rounding."""
    out = tmp_path / "m.gguf"
    assert main(["--quiet", "export", "--model", str(ckpt), "--format", "gguf", "--gguf-type", gguf_type,
                 "--gguf-float-type", float_type, "--output", str(out)]) == 0
    peer = _open(peers, out)
    ids = _llamacpp_tokenize(peers, peer, story.split("\n\n")[0], True)[:64]
    assert ids == tok.encode(story.split("\n\n")[0])[:64]
    with torch.no_grad():
        expected = ours.module(torch.tensor([ids])).logits[0]  # (T, vocab)
    theirs = peer.logits(ids)
    cos = _cosines(theirs, expected)
    print(f"llama.cpp vs transformers, stories260K {gguf_type}/{float_type}, {len(ids)} tokens: cos min "
          f"{cos.min():.7f} mean {cos.mean():.7f}, max |dlogit| {np.abs(theirs - expected.numpy()).max():.3g}")
    assert cos.min() > floor
    assert (theirs.argmax(-1) == expected.numpy().argmax(-1)).all()


# ---------------------------------------------------------------------------- HF folders


def _check_hf_folder(folder: Path, lm, text: str) -> None:
    """AutoTokenizer gives modelpress's ids (BOS first) and AutoModelForCausalLM its logits, bit for bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), attn_implementation=lm.module.config._attn_implementation).eval()
    ids = hf_tok(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [lm.tokenizer.bos_token_id, *lm.tokenizer.encode(text)]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, lm.module(ids).logits)
    assert hf_tok.decode(ids[0], skip_special_tokens=True) == text


def test_hf_export_of_a_llama2c_model_reads_with_auto_classes(ckpt: Path, ours, story: str, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    assert main(["--quiet", "export", "--model", str(ckpt), "--format", "hf", "--output", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "tokenizer.bin"} <= names
    _check_hf_folder(out, ours, story[:600])


def test_hf_export_of_a_compressed_llama2c_folder(ckpt: Path, story: str, tmp_path: Path) -> None:
    saved = tmp_path / "w8"
    assert main(["--quiet", "compress", "--model", str(ckpt), "--recipe", "rtn-w8", "--output", str(saved)]) == 0
    manifest = (saved / "modelpress.json").read_text()
    assert '"tokenizer.json"' in manifest and '"tokenizer.model"' in manifest  # hashed like every file
    out = tmp_path / "hf"
    assert main(["--quiet", "export", "--model", str(saved), "--format", "hf", "--output", str(out)]) == 0
    _check_hf_folder(out, mp.load(str(saved)), story[:600])


def test_vocabulary_sentencepiece_cannot_hold_is_said_not_faked(tok, tmp_path: Path) -> None:
    """A llama2.c vocabulary with a piece SentencePiece cannot spell: GGUF notes it has no tokenizer,
    the HF folder keeps tokenizer.bin only (with a warning), the weights export either way."""
    from tests.models.test_llama2c import _write_checkpoint

    piece = "a\u2581".encode()
    (tmp_path / "tok513.bin").write_bytes(tok.path.read_bytes() + struct.pack("<fi", -999.0, len(piece)) + piece)
    _write_checkpoint(tmp_path / "m.bin", (32, 64, 1, 4, 2, 513, 32), True, seed=0)
    rep = export(str(tmp_path / "m.bin"), "gguf", tmp_path / "m.gguf", gguf_type="F32")
    assert any(n.startswith("tokenizer: none written") and "\u2581" in n for n in rep.notes)
    assert "tokenizer.ggml.tokens" not in gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    with pytest.warns(UserWarning, match="no Hugging Face tokenizer files written"):
        export(str(tmp_path / "m.bin"), "hf", tmp_path / "hf")
    assert not (tmp_path / "hf" / "tokenizer.json").exists() and (tmp_path / "hf" / "tokenizer.bin").exists()
