"""GGML block codecs: our stored layers and float weights -> GGUF tensor bytes, row by row.

Block layouts (ggml-common.h; checked against ``gguf.quants``' dequantisers in the tests):

* ``Q8_0``  (32 values, 34 B): fp16 ``d`` | 32 x int8 ``q``;                    ``w = d * q``
* ``Q4_0``  (32 values, 18 B): fp16 ``d`` | 16 B nibbles;                     ``w = d * (q - 8)``
* ``Q4_1``  (32 values, 20 B): fp16 ``d`` | fp16 ``m`` | 16 B nibbles;         ``w = d * q + m``
  (byte ``j`` holds value ``j`` in its low nibble and value ``j + 16`` in its high nibble)
* ``Q4_K`` (256 values, 144 B): fp16 ``d`` | fp16 ``dmin`` | 12 B of 6-bit (scale, min) for
  8 sub-blocks of 32 | 128 B nibbles (32-byte chunk ``c``: sub-block ``2c`` low, ``2c+1`` high);
  ``w = d * sc_j * q - dmin * m_j``
* ``Q5_K`` (256 values, 176 B): as Q4_K plus 32 B ``qh`` before the nibbles (bit ``j`` of byte
  ``l`` is bit 4 of element ``l`` of sub-block ``j``)
* ``Q6_K`` (256 values, 210 B): 128 B low nibbles | 64 B high 2-bit pairs | 16 x int8 scales |
  fp16 ``d``; 16 sub-blocks of 16; ``w = d * sc_j * (q - 32)``

Our integer grids carry over exactly where a block format has the same grid: symmetric int with
``b <= 4`` bits is ``Q4_0`` (code ``c`` becomes ``c - 2**(b-1) + 8``), symmetric ``b <= 8`` bits
is ``Q8_0``, and any int ``b <= 4`` is ``Q4_1`` with ``m = -zero * scale`` (exact for symmetric,
rounded to fp16 for asymmetric), whenever groups are whole multiples of 32 values (a group of 64
is two blocks with the same ``d``). gguf-py cannot quantise K-quants, so ``Q4_K``/``Q5_K``/``Q6_K``
are quantised here (a min-max fit per sub-block, 6-bit/8-bit scales under an fp16 super scale;
simpler than llama.cpp's iterative search, same bytes format).
"""
from __future__ import annotations

from typing import Callable, ClassVar

import numpy as np
import torch

from ...core.config import Registry
from ...quant.formats.base import QTensor
from ...quant.granularity import PerChannel, PerGroup

QK = 32
QK_K = 256


class GGUFCodec:
    """One GGML tensor type: ``quantize`` floats (rows, in) to bytes (rows, n_blocks * type_size),
    and optionally carry one of our quantised layers over exactly (``from_qtensor``)."""

    name: ClassVar[str]
    block: ClassVar[int] = QK
    #: which of our quantised layers ``from_qtensor`` carries over exactly (in words, for refusals)
    carries: ClassVar[str] = "none of our formats; it is only ever quantised from float weights"

    def quantize(self, w: np.ndarray) -> np.ndarray:
        import gguf

        return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), self.qtype())

    def from_qtensor(self, qt: QTensor) -> tuple[np.ndarray, float] | None:
        """(bytes, max |Δw| of rounding a derived parameter) if our grid maps exactly, else None."""
        return None

    def carry(self, qt: QTensor) -> tuple[np.ndarray, float] | None:
        """``from_qtensor``, or the carry-over another format's codec module registered for this type
        (:data:`GGUF_CARRY`): what writers call."""
        key = f"{self.name}:{qt.fmt.type_tag}"
        return GGUF_CARRY.get(key)(qt) if key in GGUF_CARRY else self.from_qtensor(qt)

    @classmethod
    def qtype(cls):  # noqa: ANN206 - gguf is imported lazily
        import gguf

        return gguf.GGMLQuantizationType[cls.name]

    def fits(self, in_features: int) -> bool:
        return in_features % self.block == 0


#: GGML type name -> codec class.
GGUF_CODECS: Registry[type[GGUFCodec]] = Registry("GGUF tensor type")

#: ``"<GGML type>:<our format tag>"`` (e.g. ``"Q4_1:int_fz"``) -> a function carrying such a layer over,
#: ``(QTensor) -> (bytes, max |Δw|) | None``. The classes here carry the ``int`` grids themselves; other
#: formats register their carry-overs from their own modules anywhere in ``modelpress.export.codecs``.
GGUF_CARRY: Registry[Callable[[QTensor], "tuple[np.ndarray, float] | None"]] = Registry(
    "GGUF carry-over", packages=("modelpress.export.codecs",))


@GGUF_CODECS.register("F32")
class F32(GGUFCodec):
    name, block = "F32", 1

    def quantize(self, w: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(w, dtype=np.float32)


@GGUF_CODECS.register("F16")
class F16(GGUFCodec):
    name, block = "F16", 1

    def quantize(self, w: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(w, dtype=np.float16)


# ---- 32-value blocks: exact carry-over of our integer grids --------------------------------------
def block_params(qt: QTensor) -> dict[str, torch.Tensor] | None:
    """Per-32-block ``scale`` (and ``zero``) of an int QTensor whose groups are whole blocks, else None."""
    fmt, (out_f, in_f) = qt.fmt, qt.shape
    if fmt.type_tag != "int" or in_f % QK:
        return None
    g = fmt.granularity
    if isinstance(g, PerGroup) and g.size % QK == 0:
        rep = g.size // QK
    elif isinstance(g, PerChannel):
        rep = in_f // QK
    else:
        return None
    n_blocks = in_f // QK
    return {k: v.reshape(out_f, -1).repeat_interleave(rep, dim=1)[:, :n_blocks] for k, v in qt.params.items()}


def _fp16_exact(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.to(torch.float16).to(t.dtype), t)) and bool(torch.isfinite(t.to(torch.float16)).all())


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) values 0..15 -> (n, 16) bytes: value j low nibble, value j + 16 high nibble."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16).reshape(-1, 1)).view(np.uint8)


@GGUF_CODECS.register("Q8_0")
class Q8_0(GGUFCodec):
    name = "Q8_0"
    carries = "symmetric int <= 8 bits per channel or in groups of a multiple of 32, fp16-exact scales"

    def from_qtensor(self, qt: QTensor) -> tuple[np.ndarray, float] | None:
        p = block_params(qt)
        if p is None or not qt.fmt.symmetric or not _fp16_exact(p["scale"]):  # type: ignore[attr-defined]
            return None
        out_f, in_f = qt.shape
        q = (qt.codes.to(torch.int16) - qt.fmt.mid).to(torch.int8).numpy().reshape(-1, QK)  # type: ignore[attr-defined]
        d = p["scale"].numpy().reshape(-1)
        blocks = np.concatenate([_fp16_bytes(d), q.view(np.uint8)], axis=1)
        return blocks.reshape(out_f, -1), 0.0


@GGUF_CODECS.register("Q4_0")
class Q4_0(GGUFCodec):
    name = "Q4_0"
    carries = "symmetric int <= 4 bits per channel or in groups of a multiple of 32, fp16-exact scales"

    def from_qtensor(self, qt: QTensor) -> tuple[np.ndarray, float] | None:
        p = block_params(qt)
        if p is None or not qt.fmt.symmetric or qt.fmt.bits > 4 or not _fp16_exact(p["scale"]):  # type: ignore[attr-defined]
            return None
        out_f, _ = qt.shape
        q = (qt.codes.to(torch.int16) - qt.fmt.mid + 8).to(torch.uint8).numpy().reshape(-1, QK)  # type: ignore[attr-defined]
        blocks = np.concatenate([_fp16_bytes(p["scale"].numpy().reshape(-1)), _nibbles(q)], axis=1)
        return blocks.reshape(out_f, -1), 0.0


@GGUF_CODECS.register("Q4_1")
class Q4_1(GGUFCodec):
    name = "Q4_1"
    carries = "int <= 4 bits per channel or in groups of a multiple of 32, fp16-exact scales"

    def from_qtensor(self, qt: QTensor) -> tuple[np.ndarray, float] | None:
        p = block_params(qt)
        if p is None or qt.fmt.bits > 4 or not _fp16_exact(p["scale"]):  # type: ignore[attr-defined]
            return None
        out_f, _ = qt.shape
        s = p["scale"].to(torch.float32)
        zero = torch.full_like(s, qt.fmt.mid) if qt.fmt.symmetric else p["zero"].to(torch.float32)  # type: ignore[attr-defined]
        m = -zero * s  # (out, n_blocks), exact in float32
        m16 = m.to(torch.float16)
        err = float((m16.to(torch.float32) - m).abs().max()) if m.numel() else 0.0
        q = qt.codes.numpy().reshape(-1, QK)
        blocks = np.concatenate([_fp16_bytes(s.numpy().reshape(-1)), _fp16_bytes(m16.numpy().reshape(-1)), _nibbles(q)],
                                axis=1)
        return blocks.reshape(out_f, -1), err


@GGUF_CODECS.register("Q5_0")
class Q5_0(GGUFCodec):
    """Only a fallback (llama.cpp uses it where Q4_K does not tile a row); gguf-py quantises it."""

    name = "Q5_0"


@GGUF_CODECS.register("Q5_1")
class Q5_1(GGUFCodec):
    """Only a fallback (for Q5_K); gguf-py quantises it."""

    name = "Q5_1"


# ---- K-quants (256-value super-blocks), quantised here ---------------------------------------------
def _round(x: np.ndarray) -> np.ndarray:
    return np.round(x).astype(np.int32)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(b == 0, 0.0, a / np.where(b == 0, 1.0, b))


def _kquant_asym(x: np.ndarray, nmax: int) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K fit of super-blocks x (n, 8, 32): codes (n, 8, 32), d, dmin (n,) fp16, sc, mn (n, 8).

    Per sub-block ``w ≈ S q - M`` with ``M = -min(x, 0)`` and ``S = (max - min) / nmax``; the eight
    S and M are stored as 6-bit multiples of fp16 super scales ``d = max S / 63``, ``dmin = max M / 63``.
    """
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = np.maximum(x.max(axis=-1), 0.0)
    scale, mins = (hi - lo) / nmax, -lo  # (n, 8)
    d = (scale.max(axis=-1) / 63).astype(np.float16)
    dmin = (mins.max(axis=-1) / 63).astype(np.float16)
    sc = np.clip(_round(_safe_div(scale, d.astype(np.float32)[:, None])), 0, 63)
    mn = np.clip(_round(_safe_div(mins, dmin.astype(np.float32)[:, None])), 0, 63)
    S = d.astype(np.float32)[:, None] * sc  # (n, 8), what the file really holds
    M = dmin.astype(np.float32)[:, None] * mn
    q = np.clip(_round(_safe_div(x + M[..., None], S[..., None])), 0, nmax)
    return q.astype(np.uint8), d, dmin, sc.astype(np.uint8), mn.astype(np.uint8)


def _pack_scale_min(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins (n, 8) -> the 12-byte K_SCALE layout (n, 12)."""
    b = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    b[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    b[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    b[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    return b


def _k_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 8, 32) codes -> (n, 128) bytes: chunk c holds sub-block 2c (low) and 2c + 1 (high)."""
    q = q & 0xF
    return (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(q.shape[0], 128).astype(np.uint8)


@GGUF_CODECS.register("Q4_K")
class Q4_K(GGUFCodec):
    name, block = "Q4_K", QK_K

    def quantize(self, w: np.ndarray) -> np.ndarray:
        rows = w.shape[0]
        q, d, dmin, sc, mn = _kquant_asym(w.astype(np.float32).reshape(-1, 8, 32), 15)
        out = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scale_min(sc, mn), _k_nibbles(q)], axis=1)
        return out.reshape(rows, -1)


@GGUF_CODECS.register("Q5_K")
class Q5_K(GGUFCodec):
    name, block = "Q5_K", QK_K

    def quantize(self, w: np.ndarray) -> np.ndarray:
        rows = w.shape[0]
        q, d, dmin, sc, mn = _kquant_asym(w.astype(np.float32).reshape(-1, 8, 32), 31)
        qh = ((q >> 4) & 1).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]  # (n, 8, 32)
        qh = np.bitwise_or.reduce(qh, axis=1)  # (n, 32): bit j <- sub-block j
        out = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scale_min(sc, mn), qh, _k_nibbles(q)], axis=1)
        return out.reshape(rows, -1)


@GGUF_CODECS.register("Q6_K")
class Q6_K(GGUFCodec):
    name, block = "Q6_K", QK_K

    def quantize(self, w: np.ndarray) -> np.ndarray:
        rows = w.shape[0]
        x = w.astype(np.float32).reshape(-1, 16, 16)  # (n, sub-block, value)
        idx = np.abs(x).argmax(axis=-1)[..., None]
        sub = np.take_along_axis(x, idx, axis=-1)[..., 0] / -32.0  # (n, 16): signed max -> code -32
        big = np.take_along_axis(sub, np.abs(sub).argmax(axis=-1)[:, None], axis=-1)[:, 0]  # (n,)
        d = (big / -128.0).astype(np.float16)
        sc = np.clip(_round(_safe_div(sub, d.astype(np.float32)[:, None])), -128, 127)
        S = d.astype(np.float32)[:, None] * sc  # (n, 16)
        q = (np.clip(_round(_safe_div(x, S[..., None])), -32, 31) + 32).astype(np.uint8)  # (n, 16, 16)
        Q = q.reshape(-1, 2, 4, 32)  # (n, half, segment, l): element = half*128 + segment*32 + l
        ql = np.concatenate([(Q[:, :, 0] & 0xF) | ((Q[:, :, 2] & 0xF) << 4),
                             (Q[:, :, 1] & 0xF) | ((Q[:, :, 3] & 0xF) << 4)], axis=-1)  # (n, 2, 64)
        qh = (Q[:, :, 0] >> 4) | ((Q[:, :, 1] >> 4) << 2) | ((Q[:, :, 2] >> 4) << 4) | ((Q[:, :, 3] >> 4) << 6)
        out = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64).astype(np.uint8),
                              sc.astype(np.int8).view(np.uint8), _fp16_bytes(d)], axis=1)
        return out.reshape(rows, -1)


#: What llama.cpp writes where a K-quant does not tile a row (``llama_tensor_get_type``).
KQUANT_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def codec(name: str) -> GGUFCodec:
    return GGUF_CODECS.get(name.upper())()
