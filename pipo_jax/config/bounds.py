"""Declared ranges of numeric config fields, checked by one mechanism.

Every ``int`` or ``float`` field of a config section (and every item of a ``tuple[int, ...]`` /
``tuple[float, ...]`` field) is declared with ``number(default, ...)``, which records its range
in the field's metadata; ``check_fields`` (called first in each section's ``__post_init__``)
checks all of them, floats for finiteness too. A numeric field declared without a range is a
programming error raised when the section is first built (at import, for the defaults), so a
new field cannot be added without its bounds. Checks that relate several fields stay in the
sections' ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any

from pipo_jax.errors import ConfigError

_KEY = "pipo_jax.bounds"


@dataclasses.dataclass(frozen=True)
class Bounds:
    """``lo ≤ v ≤ hi`` (strict where ``lo_open`` / ``hi_open``; None: unbounded on that side),
    finite, or one of ``also`` (values with a meaning of their own, e.g. -1 = "all the rest");
    ``why`` is added to the error, e.g. "0 turns it off"."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple[float, ...] = ()
    why: str = ""

    def admits(self, value: float) -> bool:
        if value in self.also:
            return True
        if not math.isfinite(value):  # NaN compares False with everything; inf is never meant
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def describe(self) -> str:
        lo, hi = _show(self.lo), _show(self.hi)
        if self.lo is not None and self.hi is not None:
            rule = f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            rule = f"{'>' if self.lo_open else '>='} {lo}"
        elif self.hi is not None:
            rule = f"{'<' if self.hi_open else '<='} {hi}"
        else:
            rule = "a finite number"
        if self.also:
            rule += " or " + " or ".join(_show(v) for v in self.also)
        return rule + (f" ({self.why})" if self.why else "")


def _show(v: float | None) -> str:
    """A bound as written in a config: ``4294967295``, not ``4.29497e+09``."""
    return "" if v is None else str(int(v)) if float(v).is_integer() else repr(float(v))


def number(default: Any, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None, also: tuple[float, ...] = (),
           why: str = "") -> Any:
    """A numeric dataclass field with its range: ``number(0.9, ge=0, lt=1)``. For a tuple field
    the range applies to each item. Give at most one of ``ge``/``gt`` and of ``le``/``lt``;
    none at all means "any finite number"."""
    if (ge is not None and gt is not None) or (le is not None and lt is not None):
        raise TypeError("give at most one lower (ge/gt) and one upper (le/lt) bound")
    bounds = Bounds(lo=gt if gt is not None else ge, hi=lt if lt is not None else le,
                    lo_open=gt is not None, hi_open=lt is not None, also=also, why=why)
    return dataclasses.field(default=default, metadata={_KEY: bounds})


def bounds_of(field: dataclasses.Field) -> Bounds | None:
    return field.metadata.get(_KEY)


class FieldError(ConfigError):
    """A numeric field outside its declared range. ``str()`` names it ``<section>.<field>``;
    the loader re-raises it with the key's full path (``teacher.clip_norm``, ``ar.lora.rank``),
    since one section class serves several keys."""

    def __init__(self, section: str, field: str, rule: str, value: Any) -> None:
        self.field, self.rule, self.value = field, rule, value
        super().__init__(self.message(f"{section}." if section else ""))

    def message(self, prefix: str) -> str:
        return f"{prefix}{self.field} must be {self.rule}, got {self.value!r}"


def _numeric_kind(tp: Any) -> type | None:
    """``int`` / ``float`` for a numeric annotation (or a tuple of them), else None."""
    if typing.get_origin(tp) is tuple:
        tp = typing.get_args(tp)[0]
    return tp if tp in (int, float) else None


@functools.cache
def _numeric_fields(cls: type) -> tuple[tuple[str, Bounds, bool], ...]:
    """``(name, bounds, is_tuple)`` of ``cls``'s numeric fields; raises if one has no bounds."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if _numeric_kind(hints[f.name]) is None:
            continue
        b = bounds_of(f)
        if b is None:
            raise TypeError(f"{cls.__name__}.{f.name} is numeric but declares no range: declare "
                            "it with pipo_jax.config.bounds.number(default, ge=…, le=…)")
        out.append((f.name, b, typing.get_origin(hints[f.name]) is tuple))
    return tuple(out)


def check_fields(obj: Any, section: str) -> None:
    """Raises ``FieldError`` for the first numeric field of ``obj`` outside its range."""
    for name, b, is_tuple in _numeric_fields(type(obj)):
        value = getattr(obj, name)
        for i, v in enumerate(value if is_tuple else (value,)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not b.admits(v):
                where = f"{name}[{i}]" if is_tuple else name
                raise FieldError(section, where, b.describe(), v)
