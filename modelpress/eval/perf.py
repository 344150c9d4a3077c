"""Operational measurements: latency, throughput, memory, size, cost and the memory roofline.

Each model is measured in its own fresh process (``measure_in_subprocess``) so that its peak RSS is
its own and not the maximum of everything measured before it in the same run.

Definitions (all wall-clock, fixed thread count):
  * time to first token (TTFT): the prefill forward of a batch-1 prompt plus picking its first token;
  * per-token decode latency: median time of one decode step at batch 1;
  * decode tokens/s at batch B: ``B * steps / sum(step times)``; prefill tokens/s: ``B * prompt / prefill time``;
  * cost per million tokens: ``price_per_hour / (3600 * tokens_per_s) * 1e6``;
  * roofline: bytes of weights read per decode step (every linear's stored weight, its scales, and
    the output embedding; the input embedding reads one row) against the measured read bandwidth of
    a large ``tensor.sum()``: ``bandwidth / bytes`` is the fastest batch-1 decode the memory allows.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn


def measure_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` memory bandwidth (bytes/s) of a sum (read only) and a copy (read + write)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    best_sum = best_copy = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        src.sum()
        best_sum = max(best_sum, nbytes / (time.perf_counter() - t))
        t = time.perf_counter()
        dst.copy_(src)
        best_copy = max(best_copy, 2 * nbytes / (time.perf_counter() - t))
    return {"read_bytes_per_s": best_sum, "copy_bytes_per_s": best_copy, "buffer_bytes": float(nbytes)}


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every leaf module's tensors except the input embedding.

    The input embedding is a lookup (one row per token) and is not counted, unless it is tied to the
    output head, which reads all of it (counted once through the head).
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for m in model.modules():
        if m is emb or isinstance(m, nn.Embedding) or list(m.children()):
            continue
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            key = (t.untyped_storage().data_ptr(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def roofline(weight_bytes: int, bandwidth: float, measured_tokens_per_s: float) -> dict[str, float]:
    """Batch-1 decode ceiling from bandwidth and the share of it reached."""
    ceiling = bandwidth / weight_bytes if weight_bytes else float("inf")
    return {"weight_bytes_per_token": weight_bytes, "bandwidth_bytes_per_s": bandwidth,
            "max_tokens_per_s": ceiling, "fraction_of_roofline": measured_tokens_per_s / ceiling}


def cost_per_million(price_per_hour: float | None, tokens_per_s: float) -> float | None:
    """Dollars (or whatever the price is in) per million generated tokens."""
    if price_per_hour is None or tokens_per_s <= 0:
        return None
    return price_per_hour / (3600.0 * tokens_per_s) * 1e6


def measure_generation(runner: Any, vocab: int, batches: tuple[int, ...], prompt_len: int, new_tokens: int,
                       seed: int = 0) -> dict[str, Any]:
    """TTFT, decode latency and tokens/s per batch size for a :class:`LlamaRunner` (random prompts)."""
    g = torch.Generator().manual_seed(seed)
    runner.generate(torch.randint(0, vocab, (1, 8), generator=g), 4)  # warm-up (allocations, compile)
    per_batch: dict[str, dict[str, float]] = {}
    for b in batches:
        ids = torch.randint(0, vocab, (b, prompt_len), generator=g)
        res = runner.generate(ids, new_tokens)
        steps = res.decode_s[1:] or res.decode_s  # the first decode step can still pay one-off costs
        per_batch[str(b)] = {
            "decode_tokens_per_s": b * len(steps) / sum(steps),
            "prefill_tokens_per_s": b * prompt_len / res.prefill_s,
            "ttft_s": res.prefill_s,
            "decode_latency_ms": 1e3 * statistics.median(steps),
        }
    first = per_batch[str(batches[0])]
    return {"batches": per_batch, "decode_tokens_per_s": first["decode_tokens_per_s"],
            "prefill_tokens_per_s": first["prefill_tokens_per_s"], "ttft_s": first["ttft_s"],
            "decode_latency_ms": first["decode_latency_ms"]}


def profile_model(model: str, *, threads: int, batches: tuple[int, ...] = (1, 4, 16), prompt_len: int = 128,
                  new_tokens: int = 64, dtype: str = "bfloat16", kernel: str | None = None, compile: bool = False,
                  bandwidth: float | None = None, price_per_hour: float | None = None) -> dict[str, Any]:
    """Load ``model``, install kernels, and measure it (run this in a fresh process for peak RSS)."""
    torch.set_num_threads(threads)
    from .. import api
    from ..kernels import cast_float_parts, install_kernels
    from ..kernels.generate import LlamaRunner
    from .size import count_params, memory_bytes, peak_rss_bytes

    t0 = time.perf_counter()
    lm = api.load(model)
    dt = getattr(torch, dtype)
    plan = install_kernels(lm.module, prefer=kernel, dtype=dt)
    cast_float_parts(lm.module, dt)
    load_s = time.perf_counter() - t0
    runner = LlamaRunner(lm.module, max_len=prompt_len + new_tokens + 8, compile=compile)
    vocab = lm.module.config.vocab_size
    out = measure_generation(runner, vocab, batches, prompt_len, new_tokens)
    wb = weight_bytes_per_token(lm.module)
    bw = bandwidth if bandwidth is not None else measure_bandwidth()["read_bytes_per_s"]
    out.update(
        model=model, dtype=dtype, threads=threads, prompt_len=prompt_len, new_tokens=new_tokens, load_s=load_s,
        kernels=plan.to_dict(), params=count_params(lm.module), memory_bytes=memory_bytes(lm.module),
        size_bytes=api.model_disk_bytes(lm),
        roofline=roofline(wb, bw, out["decode_tokens_per_s"]),
        cost_per_million_tokens={b: cost_per_million(price_per_hour, r["decode_tokens_per_s"])
                                 for b, r in out["batches"].items()},
        peak_rss_bytes=peak_rss_bytes(),
    )
    return out


def _child(queue: Any, fn: Callable[..., dict[str, Any]], kwargs: dict[str, Any]) -> None:
    try:
        queue.put(("ok", fn(**kwargs)))
    except BaseException as e:  # report any failure to the parent instead of hanging it
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_in_subprocess(fn: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """``fn(**kwargs)`` in a fresh spawned process (its own peak RSS); ModelpressError on failure."""
    import multiprocessing as mp

    from ..core.errors import ModelpressError

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, fn, kwargs))
    p.start()
    status, payload = q.get()
    p.join()
    if status != "ok":
        raise ModelpressError(f"measuring {kwargs.get('model', fn.__name__)} failed: {payload}")
    return payload


def measure_in_subprocess(**kwargs: Any) -> dict[str, Any]:
    """:func:`profile_model` in a fresh process."""
    return run_in_subprocess(profile_model, **kwargs)


class RunnerLM(nn.Module):
    """A :class:`LlamaRunner` seen as a model (``forward(input_ids) -> logits``), each call on a fresh cache.

    Lets :func:`modelpress.eval.perplexity.perplexity` score what our generation computes, quantised
    KV cache included (a prefill writes the keys and values and attends to what it reads back).
    """

    def __init__(self, runner: Any) -> None:
        super().__init__()
        self.runner, self.model = runner, runner.model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (batch, seq) -> (batch, seq, vocab)
        return self.runner.forward(ids, self.runner.new_cache(ids.shape[0], ids.shape[1]), 0)


def machine_info() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "node": os.uname().nodename,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
