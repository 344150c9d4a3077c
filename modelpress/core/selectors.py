"""Choosing layers: by exact name, glob, ``re:`` regex, or ``role:<role>``.

A selector that matches nothing is a user error that names it and lists near misses, because a
silently empty selection compresses nothing and reports success.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Callable, Iterable

import torch.nn as nn

from .errors import ModelpressError


def check_selector(sel: str) -> None:
    """Raise ``ValueError`` (turned into a recipe error naming the field) for a malformed selector."""
    if not sel:
        raise ValueError("an empty selector matches nothing")
    if sel.startswith("re:"):
        try:
            re.compile(sel[3:])
        except re.error as e:
            raise ValueError(f"invalid regular expression {sel[3:]!r}: {e}") from None


def _matcher(sel: str, role_fn: Callable[[str], str | None]) -> Callable[[str], bool]:
    if sel.startswith("re:"):
        pat = re.compile(sel[3:])
        return lambda n: pat.match(n) is not None
    if sel.startswith("role:"):
        role = sel[5:]
        return lambda n: (r := role_fn(n)) is not None and (role == "*" or fnmatch.fnmatchcase(r, role))
    if any(c in sel for c in "*?["):
        return lambda n: fnmatch.fnmatchcase(n, sel)
    return lambda n: n == sel or n.endswith("." + sel)


def select(
    candidates: Iterable[tuple[str, nn.Module]],
    targets: list[str],
    ignore: list[str],
    role_fn: Callable[[str], str | None] = lambda n: None,
    *,
    strict_ignore: bool = False,
) -> list[tuple[str, nn.Module]]:
    """Modules among ``candidates`` matched by any target and by no ignore selector.

    Example:
        >>> select(named_linears(model), ["role:down_proj"], [], role_fn)  # doctest: +SKIP
    """
    cands = list(candidates)
    names = [n for n, _ in cands]
    t_match = [(_matcher(s, role_fn), s) for s in targets]
    i_match = [(_matcher(s, role_fn), s) for s in ignore]
    for m, s in t_match + (i_match if strict_ignore else []):
        if not any(m(n) for n in names):
            raise ModelpressError(_no_match_message(s, names, role_fn))
    return [(n, mod) for n, mod in cands if any(m(n) for m, _ in t_match) and not any(m(n) for m, _ in i_match)]


def _no_match_message(sel: str, names: list[str], role_fn: Callable[[str], str | None]) -> str:
    key = sel.split(":", 1)[1] if ":" in sel else sel
    if sel.startswith("role:"):
        roles = sorted({r for n in names if (r := role_fn(n))})
        return f"selector {sel!r} matches no layer; roles in this model: {', '.join(roles) or '(none: unknown architecture)'}"
    pool = sorted(set(names) | {n.rsplit(".", 1)[-1] for n in names})
    near = difflib.get_close_matches(key.strip("*.^$"), pool, n=5, cutoff=0.5)
    hint = f"; near misses: {', '.join(near)}" if near else f"; e.g. {', '.join(names[:3])}"
    return f"selector {sel!r} matches no layer{hint}"
