"""User filters on a table's scalar columns, checked against their Arrow types before any SQL is
written (quoted by pipeline/table/sql_text.py).

A user's filter never reaches LanceDB as user text: each names one of the table's own columns,
each value is converted to that column's Arrow type, and the SQL is written here from those
validated pieces (identifiers in backticks, strings in single quotes with quotes doubled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa

from pipeline.config import ConfigError
from pipeline.table.sql_text import sql_equals, sql_identifier, sql_literal

MAX_FILTER_VALUES = 100
RANGE_OPERATORS = {"min": ">=", "max": "<="}
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


# ----------------------------------------------------------------------------- typed filtering


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    kind: str  # "metadata" (the manifest's own) or "contract" (id, caption, width, ...)

    @property
    def family(self) -> str | None:
        """What a filter on it takes: string, integer, number, boolean; None: not filterable."""
        t = self.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "string"
        if pa.types.is_integer(t):
            return "integer"
        if pa.types.is_floating(t):
            return "number"
        if pa.types.is_boolean(t):
            return "boolean"
        return None


def typed_value(column: Column, value, what: str):
    """A user's value as the column's Arrow type, or a ConfigError that says why not."""
    family = column.family
    try:
        if family == "string":
            if not isinstance(value, str):
                raise ValueError("expected a string")
            converted = value
        elif family == "boolean":
            if isinstance(value, bool):
                converted = value
            elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                converted = value.strip().lower() in _TRUE
            else:
                raise ValueError("expected true or false")
        elif family == "integer":
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError("expected an integer")
            converted = int(value.strip()) if isinstance(value, str) else int(value)
        elif family == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError("expected a number")
            converted = float(value.strip()) if isinstance(value, str) else float(value)
            if not math.isfinite(converted):
                raise ValueError("expected a finite number")
        else:
            raise ValueError(f"{column.type} columns cannot be filtered on")
        # The column's own type decides the range (int8, uint32, ...) and the precision.
        return pa.scalar(converted, type=column.type).as_py()
    except (ValueError, TypeError, OverflowError, pa.ArrowInvalid) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{what}: {value!r} is not a valid {column.type} value ({reason})") from None


@dataclass
class Filters:
    """column -> {"eq": [values], "min": value, "max": value}, as the user gave them (unchecked)."""

    terms: dict

    @classmethod
    def from_query(cls, pairs: list[tuple[str, str]]) -> "Filters":
        """`filter.<column>=v` (repeat for any of several), `min.<column>=v`, `max.<column>=v`."""
        terms: dict = {}
        for key, value in pairs:
            for prefix, op in (("filter.", "eq"), ("min.", "min"), ("max.", "max")):
                if key.startswith(prefix) and len(key) > len(prefix):
                    term = terms.setdefault(key[len(prefix):], {})
                    if op == "eq":
                        term.setdefault("eq", []).append(value)
                    elif value != "":
                        term[op] = value
        return cls(terms)

    @classmethod
    def from_json(cls, filters) -> "Filters":
        """{"lang": "de"} or {"lang": ["de", "es"]} or {"rank": {"min": 1, "max": 5}}."""
        if filters is None:
            return cls({})
        if not isinstance(filters, dict):
            raise ConfigError("filters: expected an object of column -> value")
        terms = {}
        for name, spec in filters.items():
            if isinstance(spec, dict):
                unknown = set(spec) - {"eq", *RANGE_OPERATORS}
                if unknown:
                    raise ConfigError(f"filters.{name}: unknown keys {sorted(unknown)} "
                                      "(use eq, min, max)")
                eq = spec.get("eq")
                term = {k: spec[k] for k in RANGE_OPERATORS if spec.get(k) is not None}
                if eq is not None:
                    term["eq"] = eq if isinstance(eq, list) else [eq]
            else:
                term = {"eq": spec if isinstance(spec, list) else [spec]}
            terms[str(name)] = term
        return cls(terms)

    def where(self, columns: dict[str, Column]) -> str | None:
        """The SQL filter, from checked pieces only; unknown columns and bad values are refused."""
        clauses = []
        for name, term in self.terms.items():
            column = columns.get(name)
            if column is None:
                known = ", ".join(sorted(columns)) or "none"
                raise ConfigError(f"unknown filter column {name!r} (filterable: {known})")
            values = term.get("eq") or []
            if len(values) > MAX_FILTER_VALUES:
                raise ConfigError(f"filter.{name}: at most {MAX_FILTER_VALUES} values")
            if values:
                clauses.append(sql_equals(column.name, [typed_value(column, v, f"filter.{name}")
                                                        for v in values]))
            for op, sign in RANGE_OPERATORS.items():
                if op in term:
                    if column.family not in ("integer", "number"):
                        raise ConfigError(f"{op}.{name}: ranges apply to numeric columns only")
                    bound = typed_value(column, term[op], f"{op}.{name}")
                    clauses.append(f"{sql_identifier(column.name)} {sign} {sql_literal(bound)}")
        return " AND ".join(f"({c})" for c in clauses) if clauses else None
