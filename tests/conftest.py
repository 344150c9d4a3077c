"""Shared fixtures: tiny models built in code (no hub), and the offline shared data when present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MODELPRESS_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny test models run fastest on one thread (with two, OpenMP spin-waits dominate on a shared machine).
torch.set_num_threads(1)

SHARED = Path(os.environ.get("MODELPRESS_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"

TEXT = (
    "Once upon a time there was a little robot who liked to count numbers. Every morning it counted "
    "the birds, the trees and the clouds. One day the robot met a cat who could not count at all. "
    "The robot taught the cat to count to ten, and the cat taught the robot to purr. "
) * 40


def shared_file(rel: str) -> Path:
    """Path in ../shared/data, or skip the test with a clear reason."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"shared data {rel} not present at {p} (set MODELPRESS_SHARED)")
    return p


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "text.txt"
    p.write_text(TEXT)
    return p


def make_tokenizer(directory: Path):
    """A byte-level BPE tokenizer trained in code on TEXT (no downloads)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(str(directory))
    return tok


def make_tiny_llama(seed: int = 0, vocab: int = 300, layers: int = 2, hidden: int = 64, inter: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_llama")
    model = make_tiny_llama()
    model.save_pretrained(str(d))
    make_tokenizer(d)
    return d
