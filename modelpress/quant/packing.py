"""Bit packing of quantisation codes.

Layout: each row is one little-endian bit stream. Code ``i`` of a row occupies bits
``[i*bits, (i+1)*bits)`` of that stream, and byte ``j`` holds stream bits ``[8j, 8j+8)`` with the
lowest bit first. So 4-bit codes go low nibble first, 2-bit codes lowest bits first, and eight
3-bit codes fill exactly three bytes. A row of ``n`` codes takes ``ceil(n * bits / 8)`` bytes; the
unused high bits of the last byte are zero.

Rows are packed independently so a weight (out, in) can be sliced by output channel without
unpacking. 8, 4 and 2 bits use shifts on the byte grid; every other width (1, 3, 5, 6, 7) goes
through one 64-bit word per eight codes, which is still one vectorised pass.
"""
from __future__ import annotations

import torch

_SUPPORTED = range(1, 9)


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes taken by one row of ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``.

    Example:
        >>> packed_nbytes(10, 3)
        4
    """
    _check_bits(bits)
    return -(-n * bits // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (rows, n), each in ``[0, 2**bits)``, into uint8 (rows, packed_nbytes(n, bits)).

    Codes out of range are refused rather than silently truncated: a wrong code width is a bug
    upstream, and truncation would hide it until a model produced garbage.

    Args:
        codes: uint8 tensor of shape (rows, n).
        bits: code width, 1..8.

    Returns:
        uint8 tensor of shape (rows, ceil(n * bits / 8)).

    Example:
        >>> pack_codes(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4)
        tensor([[33,  3]], dtype=torch.uint8)
    """
    _check_bits(bits)
    _check_codes(codes, bits)
    rows, n = codes.shape
    nbytes = packed_nbytes(n, bits)
    if bits == 8:
        return codes.contiguous()
    if bits in (2, 4):
        return _pack_per_byte(codes, bits)[:, :nbytes].contiguous()
    return _pack_words(codes, bits)[:, :nbytes].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 (rows, nbytes) -> uint8 codes (rows, n).

    Args:
        packed: uint8 tensor from :func:`pack_codes`.
        bits: code width used when packing.
        n: number of codes per row (the packed width alone is ambiguous).

    Returns:
        uint8 tensor of shape (rows, n).

    Example:
        >>> unpack_codes(torch.tensor([[33, 3]], dtype=torch.uint8), 4, 3)
        tensor([[1, 2, 3]], dtype=torch.uint8)
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed codes must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_nbytes(n, bits):
        raise ValueError(
            f"{n} codes of {bits} bits take {packed_nbytes(n, bits)} bytes per row, got {packed.shape[1]}"
        )
    if bits == 8:
        return packed.contiguous()
    if bits in (2, 4):
        return _unpack_per_byte(packed, bits)[:, :n].contiguous()
    return _unpack_words(packed, bits)[:, :n].contiguous()


# ---- byte-aligned widths (2, 4): 8 // bits codes per byte ------------------------------------
def _pack_per_byte(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    c = _pad_cols(codes, per)
    c = c.reshape(c.shape[0], c.shape[1] // per, per)  # (rows, nbytes, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (per,)
    # Fields never overlap, so a sum of shifted codes is their bitwise OR.
    return (c << shifts).sum(dim=-1, dtype=torch.uint8)  # (rows, nbytes)


def _unpack_per_byte(packed: torch.Tensor, bits: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (per,)
    c = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (rows, nbytes, per)
    return c.reshape(packed.shape[0], packed.shape[1] * shifts.numel())


# ---- any width: eight codes -> one int64 word -> ``bits`` bytes --------------------------------
def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    c = _pad_cols(codes, 8)
    rows, words = c.shape[0], c.shape[1] // 8
    c = c.reshape(rows, words, 8).to(torch.int64)  # (rows, words, 8)
    code_shift = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=codes.device)  # (8,)
    word = (c << code_shift).sum(dim=-1, keepdim=True)  # (rows, words, 1), at most 56 bits
    byte_shift = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=codes.device)  # (bits,)
    out = (word >> byte_shift) & 0xFF  # (rows, words, bits)
    return out.to(torch.uint8).reshape(rows, words * bits)


def _unpack_words(packed: torch.Tensor, bits: int) -> torch.Tensor:
    b = _pad_cols(packed, bits)
    rows, words = b.shape[0], b.shape[1] // bits
    b = b.reshape(rows, words, bits).to(torch.int64)  # (rows, words, bits)
    byte_shift = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=packed.device)  # (bits,)
    word = (b << byte_shift).sum(dim=-1, keepdim=True)  # (rows, words, 1)
    code_shift = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=packed.device)  # (8,)
    out = (word >> code_shift) & ((1 << bits) - 1)  # (rows, words, 8)
    return out.to(torch.uint8).reshape(rows, words * 8)


# ---- helpers -----------------------------------------------------------------------------------
def _pad_cols(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dim of (rows, n) up to a multiple of ``multiple``."""
    pad = (-t.shape[1]) % multiple
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def _check_bits(bits: int) -> None:
    if bits not in _SUPPORTED:
        raise ValueError(f"code width must be 1..8 bits, got {bits}")


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if bits < 8 and codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
