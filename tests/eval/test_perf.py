"""Operational benchmark: the measuring helpers and ``modelpress bench`` on a tiny model."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from modelpress.eval.perf import cost_per_million, measure_bandwidth, roofline, weight_bytes_per_token


def test_cost_and_roofline_arithmetic() -> None:
    assert cost_per_million(3.6, 1000.0) == pytest.approx(1.0)  # $3.6/h at 1000 tok/s: 3.6M tokens/h
    assert cost_per_million(None, 10.0) is None
    r = roofline(1_000_000, 2e9, 1000.0)
    assert r["max_tokens_per_s"] == pytest.approx(2000.0) and r["fraction_of_roofline"] == pytest.approx(0.5)


def test_bandwidth_is_plausible() -> None:
    bw = measure_bandwidth(1 << 24, repeats=2)
    assert 1e8 < bw["read_bytes_per_s"] < 1e12 and bw["copy_bytes_per_s"] > 1e8


def test_weight_bytes_count_tied_head_once_and_skip_embedding_lookup() -> None:
    from tests.conftest import make_tiny_llama

    m = make_tiny_llama(layers=1)  # tied: lm_head reads the whole embedding once per token
    linears = sum(p.numel() * 4 for n, p in m.named_parameters() if "proj" in n)
    norms = sum(p.numel() * 4 for n, p in m.named_parameters() if "norm" in n)
    emb = m.model.embed_tokens.weight.numel() * 4
    buffers = sum(b.numel() * b.element_size() for b in m.buffers())
    assert weight_bytes_per_token(m) == linears + norms + emb + buffers


def _bench(model_dir, out, *extra: str) -> dict:
    from modelpress.cli.main import main

    rc = main(["--quiet", "bench", "--model", str(model_dir), "--json", str(out), "--threads", "1", "--batches", "1", "2",
               "--prompt-len", "8", "--new-tokens", "4", "--price-per-hour", "1.0", "--dtype", "float32", "--bandwidth-mib", "16", *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_bench_cli_writes_json_keys(tiny_llama_dir, tmp_path) -> None:
    d = _bench(tiny_llama_dir, tmp_path / "bench.json", "--same-process")
    for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_bytes", "size_bytes"):
        assert d[k] > 0, k
    m = d["model"]
    assert set(m["batches"]) == {"1", "2"} and m["ttft_s"] > 0 and m["decode_latency_ms"] > 0
    assert m["cost_per_million_tokens"]["1"] == pytest.approx(1e6 / (3600 * m["batches"]["1"]["decode_tokens_per_s"]))
    assert m["roofline"]["weight_bytes_per_token"] > 0 and d["bandwidth"]["read_bytes_per_s"] > 0
    assert d["baseline"] is None


@pytest.mark.slow
def test_bench_cli_with_baseline(tiny_llama_dir, tmp_path) -> None:
    d = _bench(tiny_llama_dir, tmp_path / "bench.json", "--baseline", str(tiny_llama_dir))
    assert d["baseline"]["size_bytes"] == d["model"]["size_bytes"] and d["size_ratio"] == 1.0
    assert d["speedup_decode"] > 0


def test_bench_cli_rejects_unknown_kernel(tiny_llama_dir, capsys) -> None:
    from modelpress.cli.main import main

    assert main(["bench", "--model", str(tiny_llama_dir), "--kernel", "nope"]) == 2
    assert "unknown kernel 'nope'" in capsys.readouterr().err
