"""The search job: a text or image query against the table, nearest rows first."""

from __future__ import annotations

from pipeline.config import SearchConfig
from pipeline.search import search


def run_search(config: SearchConfig) -> list[dict]:
    return search(config)
