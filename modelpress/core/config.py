"""Typed configs and registries.

Every config is a frozen pydantic model: validated on construction, serialisable to a plain
dict / JSON / YAML and back. A registry maps a tag (the ``type`` of a format, the ``method`` of a
recipe stage) to its config class, so a recipe file names a tag and gets a typed object.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ModelpressError

T = TypeVar("T")
_NESTED_SEP = "\x1f"  # joins nested errors inside a ValueError message; never in user text


class Config(BaseModel):
    """Base of all configs: frozen, unknown keys rejected.

    Example:
        >>> class C(Config):
        ...     bits: int = 4
        >>> C(bits=3).to_dict()
        {'bits': 3}
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (tags included) that ``from_dict`` reads back."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        """Validate ``data`` into this class (raises pydantic ``ValidationError``)."""
        return cls.model_validate(data)


class Registry(Generic[T]):
    """Name -> object table with explicit registration.

    ``packages``: the family's built-in packages. Asking for a name the table does not hold, or for
    all names, first imports them and the installed plugins once (:mod:`modelpress.core.plugins`),
    so every extension registers with one decorator in its own module and nowhere else.

    Example:
        >>> formats = Registry("format")
        >>> @formats.register("int")
        ... class IntFormat: ...
    """

    def __init__(self, kind: str, packages: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.packages = packages
        self._items: dict[str, T] = {}
        self._discovered = False

    def discover(self) -> None:
        """Import the family's built-in modules and the installed plugins (once)."""
        if not self._discovered:
            self._discovered = True
            from .plugins import discover

            discover(self.packages)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a duplicate name is a programming error."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def holds(self, name: str) -> bool:
        """Whether ``name`` is registered already (no discovery: importing a family is not free)."""
        return name in self._items

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a throw-away extension clean up with this)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        """Look up ``name``; an unknown name is a user error listing what exists."""
        if name not in self._items:
            self.discover()
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise ModelpressError(f"unknown {self.kind} {name!r}; registered: {known}")
        return self._items[name]

    def names(self) -> list[str]:
        """Every registered name (the family's built-ins and plugins included)."""
        self.discover()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """(name, object) for every registered name, sorted."""
        return [(n, self._items[n]) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is registered (discovering the family first when it is not yet)."""
        if not isinstance(name, str):
            return False
        if name not in self._items:
            self.discover()
        return name in self._items


def format_validation_error(err: ValidationError, prefix: str = "", sep: str = "; ") -> str:
    """Turn a pydantic error into one line: ``stages[0].format.bits: <what was expected>``."""
    parts = []
    for e in err.errors():
        path = prefix
        for loc in e["loc"]:
            path += f"[{loc}]" if isinstance(loc, int) else (f".{loc}" if path else str(loc))
        msg = e["msg"]
        if msg.startswith("Value error, @"):
            # a nested error from ``tagged``: "sub.path: message" (possibly several, ';'-joined)
            inner = msg[len("Value error, @"):]
            parts.extend(f"{path}{item}" if item.startswith("[") else f"{path}.{item}" if path else item
                         for item in inner.split(_NESTED_SEP))
            continue
        msg = msg.removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        got_s = "" if e["type"] in ("missing", "extra_forbidden") or "got" in msg else f" (got {got!r})"
        parts.append(f"{path or '<root>'}: {msg}{got_s}")
    return sep.join(parts)


def tagged(registry: "Registry[Any]", key: str, to_cls: Callable[[Any], type] = lambda x: x) -> Callable[[Any], Any]:
    """Before-validator turning ``{key: tag, ...}`` into the registered class's instance.

    Nested validation errors keep their path: the message is prefixed ``@sub.path:`` and
    :func:`format_validation_error` splices it into the outer path.
    """

    def validate(v: Any) -> Any:
        if isinstance(v, BaseModel):
            return v
        if not isinstance(v, dict):
            raise ValueError(f"expected a mapping with a {key!r} key, got {type(v).__name__}")
        if key not in v:
            raise ValueError(f"missing {key!r}; one of: {', '.join(registry.names())}")
        tag = v[key]
        if not isinstance(tag, str):
            raise ValueError(f"{key!r} must be a name, one of: {', '.join(registry.names())} (got {tag!r})")
        if tag not in registry:
            raise ValueError(f"unknown {registry.kind} {tag!r}; registered: {', '.join(registry.names())}")
        cls = to_cls(registry.get(tag))
        try:
            return cls.model_validate(v)
        except ValidationError as e:
            raise nested_error(e) from None

    return validate


def nested_error(err: ValidationError) -> ValueError:
    """``err`` re-raised from inside a validator, keeping its paths: :func:`format_validation_error`
    splices them into the outer path (``stages[0]`` + ``losses[0].alpha``)."""
    return ValueError("@" + format_validation_error(err, sep=_NESTED_SEP))
