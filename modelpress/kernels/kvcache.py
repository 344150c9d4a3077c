"""Static KV cache for our generation loop, optionally quantised to int8 or FP8 E4M3.

Quantised caches store ``round(k / s)`` (int8, clamped to ±127) or ``fp8_e4m3(k / s)`` (clamped to
±448) with one calibrated scale per layer and KV head, ``s = amax / qmax`` over calibration data
(keys after RoPE, as they sit in the cache). Reading multiplies back by ``s`` in the compute dtype.
That is compressed-tensors' ``attn_head`` strategy, so :meth:`KVCacheQuant.kv_cache_scheme` and
:meth:`KVCacheQuant.scale_state_dict` give exactly what a compressed-tensors export writes
(``config.json`` ``quantization_config.kv_cache_scheme`` and ``model.layers.{i}.self_attn.{k,v}_scale``).

Example:
    >>> kvq = KVCacheQuant.calibrate(runner, calib_ids, kind="fp8")     # doctest: +SKIP
    >>> kvq.kv_cache_scheme()                                          # doctest: +SKIP
    {'num_bits': 8, 'type': 'float', 'symmetric': True, 'strategy': 'attn_head', 'dynamic': False}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ..core.errors import ModelpressError

if TYPE_CHECKING:
    from .generate import LlamaRunner

KVKind = Literal["int8", "fp8"]
QMAX = {"int8": 127.0, "fp8": 448.0}
STORE_DTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def quantize_kv(x: torch.Tensor, scale: torch.Tensor, kind: KVKind) -> torch.Tensor:
    """Codes of ``x`` (batch, heads, seq, dim) with per-head ``scale`` (heads, 1, 1)."""
    y = (x.float() / scale).clamp(-QMAX[kind], QMAX[kind])
    return y.round().to(torch.int8) if kind == "int8" else y.to(torch.float8_e4m3fn)


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values of cache ``codes`` (batch, heads, seq, dim) in ``dtype``."""
    return codes.to(dtype) * scale.to(dtype)


@dataclass
class KVCacheQuant:
    """Calibrated per-(layer, KV head) scales for keys and values.

    Attributes:
        kind: ``int8`` or ``fp8`` (E4M3).
        k_scale, v_scale: float32 (layers, kv_heads).
    """

    kind: KVKind
    k_scale: torch.Tensor
    v_scale: torch.Tensor

    @classmethod
    def from_amax(cls, kind: KVKind, k_amax: torch.Tensor, v_amax: torch.Tensor) -> "KVCacheQuant":
        """Scales ``amax / qmax`` (a head never seen non-zero gets scale 1)."""
        if kind not in QMAX:
            raise ModelpressError(f"KV-cache quantisation supports {sorted(QMAX)}, got {kind!r}")
        f = lambda a: torch.where(a > 0, a.float() / QMAX[kind], torch.ones_like(a.float()))  # noqa: E731
        return cls(kind, f(k_amax), f(v_amax))

    @classmethod
    @torch.no_grad()
    def calibrate(cls, runner: "LlamaRunner", ids: torch.Tensor, kind: KVKind = "fp8") -> "KVCacheQuant":
        """Max |k| and |v| per layer and KV head over calibration sequences ``ids`` (n, seq)."""
        k_amax = torch.zeros(runner.n_layers, runner.kv_heads)
        v_amax = torch.zeros_like(k_amax)
        for row in ids:
            cache = runner.new_cache(1, row.numel())
            runner.forward(row[None], cache, 0)
            for i in range(runner.n_layers):
                k_amax[i] = torch.maximum(k_amax[i], cache.k[i].abs().float().amax(dim=(0, 2, 3)))
                v_amax[i] = torch.maximum(v_amax[i], cache.v[i].abs().float().amax(dim=(0, 2, 3)))
        return cls.from_amax(kind, k_amax, v_amax)

    def kv_cache_scheme(self) -> dict[str, object]:
        """compressed-tensors ``QuantizationArgs`` dict for ``quantization_config.kv_cache_scheme``."""
        return {"num_bits": 8, "type": "float" if self.kind == "fp8" else "int", "symmetric": True,
                "strategy": "attn_head", "dynamic": False}

    def scale_state_dict(self, dtype: torch.dtype = torch.float32,
                         prefix: str = "model.layers.{i}.self_attn.") -> dict[str, torch.Tensor]:
        """``{prefix}k_scale`` / ``v_scale`` tensors of shape (kv_heads, 1, 1), as compressed-tensors names them."""
        out = {}
        for i in range(self.k_scale.shape[0]):
            p = prefix.format(i=i)
            out[p + "k_scale"] = self.k_scale[i].reshape(-1, 1, 1).to(dtype)
            out[p + "v_scale"] = self.v_scale[i].reshape(-1, 1, 1).to(dtype)
        return out


class StaticKVCache:
    """Preallocated (batch, kv_heads, max_len, head_dim) key/value tensors per layer.

    With ``quant`` the tensors hold int8 / FP8 codes and :meth:`read` dequantises the valid prefix.
    """

    def __init__(self, n_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, quant: KVCacheQuant | None = None) -> None:
        self.dtype, self.quant, self.max_len = dtype, quant, max_len
        store = STORE_DTYPE[quant.kind] if quant is not None else dtype
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=store) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=store) for _ in range(n_layers)]
        if quant is not None:
            self._ks = quant.k_scale.reshape(n_layers, kv_heads, 1, 1)
            self._vs = quant.v_scale.reshape(n_layers, kv_heads, 1, 1)

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (batch, kv_heads, new, head_dim) at positions ``pos .. pos + new``."""
        end = pos + k.shape[2]
        if end > self.max_len:
            raise ModelpressError(f"KV cache holds {self.max_len} positions, generation needs {end}")
        if self.quant is None:
            self.k[layer][:, :, pos:end] = k
            self.v[layer][:, :, pos:end] = v
        else:
            self.k[layer][:, :, pos:end] = quantize_kv(k, self._ks[layer], self.quant.kind)
            self.v[layer][:, :, pos:end] = quantize_kv(v, self._vs[layer], self.quant.kind)

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions ``0 .. end`` in the compute dtype."""
        k, v = self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        if self.quant is None:
            return k, v
        return dequantize_kv(k, self._ks[layer], self.dtype), dequantize_kv(v, self._vs[layer], self.dtype)

    def nbytes(self) -> int:
        """Bytes the cache tensors hold."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
