"""Greedy / sampling generation for Llama-family models with a static (optionally quantised) KV cache.

Why our own loop: on a small model per-token overhead, not weight bytes, dominates decoding
(SmolLM2-135M: ~0.5 GB of fp32 weights would allow ~85 tokens/s at 46 GB/s, while
``transformers.generate`` manages ~16). The runner calls the HF model's own submodules (norms,
projections, so kernel-backed linears are used) but does the attention, RoPE and cache handling
in a few tensor ops with a preallocated cache and no per-step Python objects. Optionally the decode
step goes through ``torch.compile``.

Supported: HF ``llama``, ``mistral`` (without a sliding window shorter than the generation) and
``qwen2`` models; batches of equal-length prompts (no padding).

Example:
    >>> runner = LlamaRunner(lm.module)                               # doctest: +SKIP
    >>> out = runner.generate(ids, max_new_tokens=32)                  # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import ModelpressError
from .kvcache import KVCacheQuant, StaticKVCache

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass
class GenerationResult:
    """Token ids (batch, prompt + new) and timings (seconds)."""

    ids: torch.Tensor
    prefill_s: float
    decode_s: list[float] = field(default_factory=list)  # one entry per decoded token after the first

    @property
    def new_tokens(self) -> int:
        return len(self.decode_s) + 1


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class LlamaRunner:
    """Forward passes of a Llama-family HF model against a :class:`StaticKVCache`."""

    def __init__(self, model: nn.Module, max_len: int | None = None, kv_quant: KVCacheQuant | None = None,
                 compile: bool = False) -> None:
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise ModelpressError(f"our generation loop supports {', '.join(SUPPORTED)} models, not {cfg.model_type!r}")
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False \
                and cfg.model_type == "mistral":
            raise ModelpressError("mistral models with a sliding window are not supported by our generation loop")
        self.model, self.kv_quant = model, kv_quant
        self.layers = list(model.model.layers)
        self.n_layers = len(self.layers)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.max_len = max_len or cfg.max_position_embeddings
        self.dtype = model.model.embed_tokens.weight.dtype
        self.cos, self.sin = self._rope_tables(self.max_len)  # (max_len, head_dim)
        self.step: Callable[[torch.Tensor, StaticKVCache, int], torch.Tensor] = self.forward
        if compile:
            self.step = torch.compile(self.forward, dynamic=True)

    @torch.no_grad()
    def _rope_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions 0..n-1 from the model's own rotary module (any RoPE scaling it has)."""
        pos = torch.arange(n)[None]  # (1, n)
        x = torch.zeros(1, dtype=self.dtype)
        cos, sin = self.model.model.rotary_emb(x, pos)
        return cos[0].to(self.dtype), sin[0].to(self.dtype)

    def new_cache(self, batch: int, max_len: int | None = None) -> StaticKVCache:
        return StaticKVCache(self.n_layers, batch, self.kv_heads, max_len or self.max_len, self.head_dim,
                             self.dtype, self.kv_quant)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: StaticKVCache, pos: int) -> torch.Tensor:
        """Logits (batch, new, vocab) of tokens ``ids`` (batch, new) placed at ``pos .. pos + new``."""
        b, n = ids.shape
        x = self.model.model.embed_tokens(ids)  # (b, n, hidden)
        cos, sin = self.cos[pos:pos + n], self.sin[pos:pos + n]  # (n, head_dim)
        for i, layer in enumerate(self.layers):
            x = x + self._attention(layer.self_attn, layer.input_layernorm(x), cache, i, pos, cos, sin)
            h = layer.post_attention_layernorm(x)
            mlp = layer.mlp
            if hasattr(mlp, "gate_up_fused"):  # see kernels.install.fuse_projections
                gate, up = mlp.gate_up_fused(h).split(mlp.gate_up_fused_sizes, dim=-1)
            else:
                gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            x = x + mlp.down_proj(F.silu(gate) * up)
        return self.model.lm_head(self.model.model.norm(x))

    def _attention(self, attn: nn.Module, h: torch.Tensor, cache: StaticKVCache, i: int, pos: int,
                   cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = h.shape
        if hasattr(attn, "qkv_fused"):  # see kernels.install.fuse_projections
            q, k, v = attn.qkv_fused(h).split(attn.qkv_fused_sizes, dim=-1)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = q.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)  # (b, H, n, d)
        k = k.reshape(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # (b, Hkv, n, d)
        v = v.reshape(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        cache.write(i, pos, k, v)
        keys, values = cache.read(i, pos + n)  # (b, Hkv, pos + n, d)
        if n == 1:
            o = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
        elif pos == 0:
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
        else:  # a chunk after earlier tokens: causal within the chunk, everything before it visible
            mask = torch.ones(n, pos + n, dtype=torch.bool).tril(diagonal=pos)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return attn.o_proj(o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None) -> GenerationResult:
        """Greedy (``temperature == 0``) or sampled continuation of prompts ``ids`` (batch, prompt).

        Stops early only when every row has produced ``eos_token_id``.
        """
        b, p = ids.shape
        cache = self.new_cache(b, p + max_new_tokens)
        t0 = time.perf_counter()
        logits = self.forward(ids, cache, 0)[:, -1]  # prefill is never compiled (one shape per prompt)
        tok = _pick(logits, temperature, top_k, generator)  # (b,)
        res = GenerationResult(ids, time.perf_counter() - t0)
        out, done = [tok], (tok == eos_token_id) if eos_token_id is not None else None
        for step in range(1, max_new_tokens):
            if done is not None and bool(done.all()):
                break
            t = time.perf_counter()
            logits = self.step(tok[:, None], cache, p + step - 1)[:, -1]
            tok = _pick(logits, temperature, top_k, generator)
            res.decode_s.append(time.perf_counter() - t)
            out.append(tok)
            if done is not None:
                done |= tok == eos_token_id
        res.ids = torch.cat([ids, torch.stack(out, dim=1)], dim=1)
        return res


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row: argmax, or a sample from softmax(logits / T) over the top k."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=gen)[:, 0]
