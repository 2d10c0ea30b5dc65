"""LanceDB SQL text: the one quoting of identifiers (in backticks) and values (strings in single
quotes with quotes doubled)."""

from __future__ import annotations

import math

from pipeline.config import ConfigError


def sql_identifier(name: str) -> str:
    if "`" in name:  # no way to escape one inside backticks in LanceDB's SQL
        raise ConfigError(f"column name {name!r} cannot be used in a filter")
    return f"`{name}`"


def sql_literal(value) -> str:
    """A Python value (bool, int, finite float, str) as a SQL literal."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float) and math.isfinite(value):
        return repr(float(value))
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise ConfigError(f"{value!r} cannot be a filter value (a string, a number or true/false)")


def sql_equals(column: str, values: list) -> str:
    """`column` = the value, or IN (the values)."""
    literals = [sql_literal(v) for v in values]
    if len(literals) == 1:
        return f"{sql_identifier(column)} = {literals[0]}"
    return f"{sql_identifier(column)} IN ({', '.join(literals)})"
