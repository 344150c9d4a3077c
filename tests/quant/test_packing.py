"""Bit packing: exact round trips, exact sizes, and the documented little-endian bit layout."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.quant.packing import pack_codes, packed_nbytes, unpack_codes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_codes(rows: int, n: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.uint8)


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Slow spec: each row is one integer, code i at bit i*bits, read out as little-endian bytes."""
    rows = []
    for row in codes.tolist():
        word = sum(c << (i * bits) for i, c in enumerate(row))
        rows.append([(word >> (8 * j)) & 0xFF for j in range(packed_nbytes(len(row), bits))])
    return torch.tensor(rows, dtype=torch.uint8).reshape(codes.shape[0], -1)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]),
    rows=st.integers(0, 5),
    n=st.integers(0, 77),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_and_size(bits: int, rows: int, n: int, seed: int) -> None:
    codes = random_codes(rows, n, bits, seed)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, -(-n * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]), n=st.integers(1, 41), seed=st.integers(0, 2**31 - 1))
def test_layout_matches_bit_stream_spec(bits: int, n: int, seed: int) -> None:
    codes = random_codes(3, n, bits, seed)
    assert torch.equal(pack_codes(codes, bits), reference_pack(codes, bits))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_large_round_trip(bits: int) -> None:
    codes = random_codes(64, 4099, bits, seed=bits)  # width not a multiple of 8
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 4099), codes)


def test_documented_layouts() -> None:
    four = torch.tensor([[0x1, 0x2, 0xF]], dtype=torch.uint8)
    assert pack_codes(four, 4).tolist() == [[0x21, 0x0F]]  # low nibble first
    two = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert pack_codes(two, 2).tolist() == [[0b00111001, 0b11]]  # lowest bits first
    three = torch.arange(8, dtype=torch.uint8).reshape(1, 8)  # 8 codes -> 3 bytes
    word = sum(i << (3 * i) for i in range(8))
    assert pack_codes(three, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]
    assert torch.equal(pack_codes(three, 8), three)


def test_sizes() -> None:
    assert [packed_nbytes(n, 3) for n in (8, 16, 24)] == [3, 6, 9]
    assert packed_nbytes(576, 4) == 288
    assert packed_nbytes(5, 2) == 2
    assert packed_nbytes(0, 3) == 0


def test_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_codes(torch.tensor([[8]], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="1..8 bits"):
        pack_codes(torch.zeros(1, 4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(torch.zeros(1, 4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="take 2 bytes"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.uint8), 4, 4)
