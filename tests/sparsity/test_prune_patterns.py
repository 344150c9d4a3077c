"""Masks have exactly the requested pattern; bad patterns and sparsities are one-line errors."""
from __future__ import annotations

import pytest
import torch

from modelpress.core.errors import ModelpressError
from modelpress.pipeline.recipe import parse_recipe
from modelpress.sparsity.masks import PruningMask, cubic_sparsity, global_masks, mask_from_scores, pack_mask, unpack_mask
from modelpress.sparsity.patterns import NM, Block, Structured, Unstructured, pattern_from_dict


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_every_group_has_exactly_m_minus_n_zeros(n: int, m: int) -> None:
    torch.manual_seed(0)
    W = torch.randn(24, 64)
    keep = mask_from_scores(W.abs(), NM(n, m))
    zeros_per_group = (~keep).reshape(24, 64 // m, m).sum(-1)
    assert bool((zeros_per_group == m - n).all())
    # the kept ones are the n largest of each group (brute force, no ties in random data)
    g = W.abs().reshape(-1, m)
    ref = g >= g.sort(dim=1, descending=True).values[:, n - 1 : n]
    assert torch.equal(keep.reshape(-1, m), ref)


def test_unstructured_exact_counts_row_and_layer() -> None:
    torch.manual_seed(1)
    W = torch.randn(10, 30)
    per_row = mask_from_scores(W.abs(), Unstructured(), 0.3)
    assert ((~per_row).sum(1) == 9).all()  # round(0.3 * 30)
    whole = mask_from_scores(W.abs(), Unstructured(), 0.37, per_output=False)
    assert int((~whole).sum()) == round(0.37 * 300)
    thresh = W.abs().flatten().sort().values[round(0.37 * 300) - 1]
    assert torch.equal(~whole, W.abs() <= thresh)  # brute-force threshold
    # ties (all-equal scores) still give the exact count
    assert int((~mask_from_scores(torch.ones(7, 9), Unstructured(), 0.5, per_output=False)).sum()) == 32


def test_block_tiles_all_or_nothing_and_exact_count() -> None:
    torch.manual_seed(2)
    W = torch.randn(16, 24)
    keep = mask_from_scores(W.abs(), Block(4, 6), 0.5)
    tiles = keep.reshape(4, 4, 4, 6).permute(0, 2, 1, 3).reshape(16, 24)
    assert bool(((tiles.sum(1) == 0) | (tiles.sum(1) == 24)).all())
    assert int((tiles.sum(1) == 0).sum()) == 8
    # the zeroed tiles have the smallest L1 norms
    l1 = W.abs().reshape(4, 4, 4, 6).sum(dim=(1, 3)).flatten()
    zeroed = (tiles.sum(1) == 0)
    assert l1[zeroed].max() < l1[~zeroed].min()


def test_conv_weight_viewed_as_out_by_in_kh_kw() -> None:
    W = torch.randn(8, 3, 2, 2)  # 12 columns per output
    keep = mask_from_scores(W.abs(), NM(2, 4))
    assert keep.shape == W.shape and ((~keep).reshape(8, 3, 4).sum(-1) == 2).all()


def test_global_masks_exact_count_with_ties() -> None:
    scores = {"a": torch.tensor([[1.0, 2.0, 2.0]]), "b": torch.tensor([[2.0, 3.0, 0.5]])}
    masks = global_masks(scores, 0.5)
    assert sum(int((~m).sum()) for m in masks.values()) == 3
    assert not masks["b"][0, 2] and not masks["a"][0, 0] and masks["b"][0, 1]


def test_pruning_mask_tightens_monotonically_and_accumulates() -> None:
    torch.manual_seed(3)
    pm = PruningMask((8, 16), Unstructured())
    prev = pm.mask.clone()
    for step in range(0, 101, 25):
        pm.accumulate(torch.randn(8, 16))  # e.g. movement scores: new random each step
        mask = pm.update(sparsity=cubic_sparsity(step, final=0.75, end=100))
        assert bool((mask <= prev).all())  # a pruned weight never comes back
        prev = mask.clone()
    assert pm.sparsity == pytest.approx(0.75)
    assert cubic_sparsity(0, final=0.75, end=100) == 0.0 and cubic_sparsity(100, final=0.75, end=100) == 0.75


def test_bitmask_pack_roundtrip() -> None:
    m = torch.rand(5, 13) > 0.5
    packed = pack_mask(m)
    assert packed.shape == (5, 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_mask(packed, (5, 13)), m)
    assert int(pack_mask(torch.tensor([[True, False, False, False, False, False, False, False]]))[0, 0]) == 1


@pytest.mark.parametrize("s", [1.0, -0.1, 1.5])
def test_sparsity_outside_range_names_layer(s: float) -> None:
    with pytest.raises(ModelpressError, match=r"^model\.q_proj: sparsity must lie in \[0, 1\)"):
        mask_from_scores(torch.ones(4, 4), Unstructured(), s, layer="model.q_proj")


def test_bad_patterns_are_one_line_errors() -> None:
    with pytest.raises(ModelpressError, match="N <= M, got 5:4"):
        pattern_from_dict("5:4")
    with pytest.raises(ModelpressError, match=r"^layers\.0\.up: block 4x4 does not tile the 8x6 weight"):
        mask_from_scores(torch.ones(8, 6), Block(4, 4), 0.5, layer="layers.0.up")
    with pytest.raises(ModelpressError, match=r"^down: 2:4 sparsity needs the input width to be a multiple of 4"):
        mask_from_scores(torch.ones(8, 6), NM(2, 4), layer="down")
    with pytest.raises(ModelpressError, match="structured"):
        mask_from_scores(torch.ones(8, 8), Structured(kind="heads"), 0.5)
    with pytest.raises(ModelpressError, match="implies sparsity 0.5"):
        mask_from_scores(torch.ones(8, 8), NM(2, 4), 0.3)


def test_recipe_errors_name_the_field() -> None:
    with pytest.raises(ModelpressError, match=r"stages\[0\]\.sparsity: sparsity must lie in \[0, 1\)"):
        parse_recipe({"stages": [{"method": "magnitude", "sparsity": 1.0}]})
    with pytest.raises(ModelpressError, match=r"stages\[0\]\.pattern.*N:M sparsity needs N <= M"):
        parse_recipe({"stages": [{"method": "wanda", "pattern": {"type": "nm", "n": 8, "m": 4}}]})
    with pytest.raises(ModelpressError, match="structured pruning method"):
        parse_recipe({"stages": [{"method": "sparsegpt", "pattern": "heads"}]})
    r = parse_recipe({"stages": [{"method": "sparsegpt", "pattern": "2:4"}]})
    assert r.stages[0].pattern == NM(2, 4) and parse_recipe(r.to_dict()) == r  # JSON round trip
