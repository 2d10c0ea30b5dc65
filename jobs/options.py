"""Command-line values the `altclip` commands share, parsed in one place."""

from __future__ import annotations

import click


def parse_storage_options(pairs: tuple[str, ...]) -> dict:
    """Repeated `--storage-option KEY=VALUE` -> {KEY: VALUE}."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: write it as KEY=VALUE", param_hint="--storage-option")
        options[key] = value
    return options
