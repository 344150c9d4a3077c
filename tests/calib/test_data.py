"""Calibration sources: text, JSONL, pre-tokenised; clear errors for too little text or no chat template."""
import json

import pytest
import torch

from modelpress.calib.data import calibration_tokens, sample_windows
from modelpress.core.errors import ModelpressError
from modelpress.models.tokenizers import HFTokenizer
from tests.conftest import TEXT, make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return HFTokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


def test_text_and_jsonl_give_seeded_windows(tok, tmp_path):
    (tmp_path / "c.txt").write_text(TEXT)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": TEXT[i:i + 500]}) for i in range(0, len(TEXT), 500)))
    a = calibration_tokens(tok, tmp_path / "c.txt", 8, 32, seed=3)
    b = calibration_tokens(tok, tmp_path / "c.txt", 8, 32, seed=3)
    assert a.shape == (8, 32) and torch.equal(a, b)
    assert not torch.equal(a, calibration_tokens(tok, tmp_path / "c.txt", 8, 32, seed=4))
    assert calibration_tokens(tok, tmp_path / "c.jsonl", 4, 32).shape == (4, 32)
    ids = torch.tensor(tok.encode(TEXT))
    row = a[0]
    # every window is a contiguous slice of the token stream
    assert any(torch.equal(ids[s:s + 32], row) for s in range(ids.numel() - 31))


def test_too_little_text_says_how_much(tok, tmp_path):
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(ModelpressError, match=r"has \d+ tokens; 4 x 128 = 512 asked"):
        calibration_tokens(tok, tmp_path / "short.txt", 4, 128)


def test_chat_template_missing_is_an_error(tok, tmp_path):
    (tmp_path / "c.txt").write_text(TEXT)
    with pytest.raises(ModelpressError, match="chat template"):
        calibration_tokens(tok, tmp_path / "c.txt", 2, 16, chat=True)


def test_jsonl_without_field(tok, tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ModelpressError, match=r"c\.jsonl:1: no 'text' field"):
        calibration_tokens(tok, tmp_path / "c.jsonl", 2, 16)


def test_pretokenised_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"calib": torch.arange(64).reshape(4, 16)}, str(tmp_path / "t.safetensors"))
    out = calibration_tokens(None, tmp_path / "t.safetensors", 2, 8)
    assert torch.equal(out, torch.arange(64).reshape(4, 16)[:2, :8])
    with pytest.raises(ModelpressError, match="fewer than"):
        calibration_tokens(None, tmp_path / "t.safetensors", 8, 8)


def test_sample_windows_bounds():
    ids = torch.arange(100)
    w = sample_windows(ids, 50, 10, seed=0)
    assert w.shape == (50, 10) and int(w.max()) <= 99
    assert torch.equal(w[:, 1:] - w[:, :-1], torch.ones(50, 9, dtype=torch.long))
