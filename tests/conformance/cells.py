"""The cells of the matrix and the sampling rule (see ``tests/conformance/README.md``).

Sampling rule (deterministic, from the registries):

* on ``llama`` (GQA, untied) the full method x format / pattern product: every primary variant
  of every method; the secondary format variants (per-tensor, the bool / ``Literal``
  alternatives) with every data-free method and, shared round-robin, one calibrated method each
  (``_shared_secondaries``); a method that prunes and quantises in one pass (a config with both
  ``pattern`` and ``format``: SparseGPT) keeps one representative per format type, its formats
  going through the OBS column loop GPTQ shares;
* on ``gpt2`` (HF Conv1D, tied) the same without the secondary format variants;
* on every other architecture, the i-th of them in ``ARCHS`` order: every method with its
  defaults, plus half of the groups (format types, pattern types, ``dense`` storage): group j
  (in name order) when ``k = i + j`` is even, as the representative (first variant) of the
  ``(k // 2 mod n)``-th of the n methods that have the group, in name order. Every group thus runs
  on 7 of these 14 architectures, with the next method each time (so every method that has the
  group meets some of them).

Variants a method refuses when the recipe is loaded are not run: they are the "refused at load"
rows of ``test_refusals.py``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

from .archs import ARCHS, BY_NAME
from .rows import Variant, all_variants, is_calibrated, validates

FULL_ARCHS = ("llama", "gpt2")  # the reference architectures (every group of every method runs there)
FULL_PRODUCT_ARCH = "llama"  # every primary variant, the secondary ones shared (``_shared_secondaries``)
LAYOUT_ARCH = "gpt2"  # every primary variant
ROTATION = 2  # other architectures: one group in ROTATION each


@dataclass(frozen=True)
class Cell:
    """One (architecture, method variant) of the matrix; ``order`` keeps its tests together."""

    order: int
    arch: str
    variant: Variant

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.variant.method}-{self.variant.vid}"

    @property
    def encoder(self) -> bool:
        return BY_NAME[self.arch].encoder


@cache
def accepted_variants() -> tuple[Variant, ...]:
    """Variants whose stage validates at recipe load (what each method says it accepts)."""
    return tuple(v for v in all_variants() if validates(v.stage) is None)


@cache
def refused_variants() -> tuple[tuple[Variant, str], ...]:
    return tuple((v, msg) for v in all_variants() if (msg := validates(v.stage)) is not None)


@cache
def cells() -> tuple[Cell, ...]:
    variants = accepted_variants()
    rotation = _rotation(variants)
    out: list[Cell] = []
    others = [a.name for a in ARCHS if a.name not in FULL_ARCHS]
    for arch in ARCHS:
        if arch.name == FULL_PRODUCT_ARCH:
            shared = _shared_secondaries(variants)
            picked = [v for v in variants if v.representative
                      or (not _joint(v) and (v.primary or not is_calibrated(v.method) or v.key() in shared))]
        elif arch.name == LAYOUT_ARCH:
            picked = [v for v in variants if v.representative or (v.primary and not _joint(v))]
        else:
            i = others.index(arch.name)
            chosen = {g: ms[(i + j) // ROTATION % len(ms)] for j, (g, ms) in enumerate(rotation.items())
                      if (i + j) % ROTATION == 0}
            picked = [v for v in variants if v.group == "defaults"
                      or (v.representative and chosen.get(v.group) == v.method)]
        base = len(out)  # (not inside the generator: extend appends while it iterates, so len(out) moves)
        out.extend(Cell(base + k, arch.name, v) for k, v in enumerate(picked))
    return tuple(out)


def _shared_secondaries(variants: tuple[Variant, ...]) -> set[str]:
    """Stage keys of the calibrated methods' secondary format variants that run: the k-th secondary format config
    (in order of first appearance) with the (k mod n)-th of the n calibrated methods accepting it.
    The data-free methods run every secondary config (its path through quantise, pack, save, load
    and export); each calibrated method's maths meets a share of them."""
    by_fmt: dict[str, list[Variant]] = {}
    for v in variants:
        if not v.primary and is_calibrated(v.method) and not _joint(v):
            by_fmt.setdefault(json.dumps(v.fmt, sort_keys=True), []).append(v)
    return {vs[k % len(vs)].key() for k, vs in enumerate(by_fmt.values())}


def _joint(v: Variant) -> bool:
    """A format variant of a method that also prunes (SparseGPT's joint pass): its formats go through
    the same OBS column loop as GPTQ's, whose full format product runs, so it keeps representatives."""
    from modelpress.core.method import METHODS

    return v.axis == "format" and "pattern" in METHODS.get(v.method).config.model_fields


def _rotation(variants: tuple[Variant, ...]) -> dict[str, list[str]]:
    """Group (format type, pattern type, dense storage) -> the methods that have a representative of it."""
    rot: dict[str, list[str]] = {}
    for v in variants:
        if v.representative and v.group != "defaults":
            rot.setdefault(v.group, []).append(v.method)
    return {g: sorted(set(ms)) for g, ms in sorted(rot.items())}


def first_variant(method: str) -> Variant:
    """The method's first accepted variant (its reference: if it runs on an architecture, the
    architecture is not why a sibling variant fails)."""
    return next(v for v in accepted_variants() if v.method == method)
