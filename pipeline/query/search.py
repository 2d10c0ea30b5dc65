"""Search the table: embed a query with the table's own model, then nearest rows by cosine."""

from __future__ import annotations

import sys

from pipeline.config import ConfigError, SearchConfig, named
from pipeline.decode.fetch import FetchPolicy
from pipeline.query.query_table import nearest, open_query_table
from pipeline.table.indexes import full_text_index, full_text_index_is_current, full_text_query
from schemas.embeddings import (
    CAPTION_SHA256,
    CAPTION_TRUNCATED,
    IMAGE_EMBEDDING,
    IMAGE_ERROR,
    IMAGE_SHA256,
    MODEL,
    TEXT_EMBEDDING,
    TEXT_ERROR,
)
from schemas.manifest import CAPTION, ID, IMAGE
from schemas.table import SEARCH_COLUMNS

# Columns a hit leaves out: vectors and bookkeeping; what remains is the row and its metadata.
_HIDDEN = {IMAGE_EMBEDDING, TEXT_EMBEDDING, IMAGE_SHA256, CAPTION_SHA256, IMAGE_ERROR,
           TEXT_ERROR, CAPTION_TRUNCATED, MODEL, "_distance", "_relevance_score", "_score"}


def search(config: SearchConfig) -> list[dict]:
    """Nearest rows, best first, each as {id, score, caption, image, metadata...}."""
    opened = open_query_table(config.db, config.table_name, config.model, config.storage_options)
    table = opened.table
    if config.text is not None:
        vector = opened.embed_text(config.text)
    elif config.image is not None:
        # The user's own query may name any file or URL.
        policy = FetchPolicy(config.storage_options, allow_local_paths=True, allow_private_urls=True)
        vector = opened.embed_image(config.image, policy)
    else:
        vector = opened.read_vector(config.vector)
    if config.hybrid:
        _warn_if_full_text_index_is_old(table, config.db)
    column = SEARCH_COLUMNS[config.against or "image"]
    user_where = f"({config.where})" if config.where else None
    try:
        if config.hybrid:
            # Reciprocal-rank fusion of the vector ranking and the captions' full-text ranking.
            # The full-text side finds rows by caption alone: those without this vector are
            # filtered out.
            query = (table.search(query_type="hybrid", vector_column_name=column)
                     .vector(vector).text(full_text_query(config.text)))
            where = f"{column} IS NOT NULL" + (f" AND {user_where}" if user_where else "")
            rows = query.distance_type("cosine").where(where, prefilter=True).limit(config.k).to_list()
            for row in rows:  # the fused relevance
                row["score"] = round(float(row["_relevance_score"]), 6)
        else:
            rows = nearest(table, vector, column, config.k, user_where, nprobes=config.nprobes,
                           refine_factor=config.refine_factor)
    except Exception as exc:  # LanceDB reports a bad filter as a generic error
        if not config.where:
            raise
        raise ConfigError(f"{named('where')} {config.where!r}: {exc}") from exc
    return [_hit(row) for row in rows]


def _warn_if_full_text_index_is_old(table, db: str) -> None:
    index = full_text_index(table)
    if index is not None and not full_text_index_is_current(index):
        print(
            "warning: the table's full-text index was built before captions were indexed as "
            "n-grams: it splits them on spaces, so a word inside Chinese, Japanese or Thai text is "
            f"not found; rebuild it with `altclip table index {db}`",
            file=sys.stderr,
        )


def _hit(row: dict) -> dict:
    hit = {ID: row[ID], "score": row["score"], CAPTION: row.get(CAPTION), IMAGE: row.get(IMAGE)}
    hit.update({k: v for k, v in row.items() if k not in _HIDDEN and k not in hit})
    return hit
