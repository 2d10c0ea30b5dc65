"""Search the table: embed a query with the table's own model, then nearest rows by cosine."""

from __future__ import annotations

import sys

from pipeline.config import ConfigError, SearchConfig, named
from pipeline.decode.fetch import FetchPolicy
from pipeline.query.query_table import open_query_table
from pipeline.table.store import full_text_index, full_text_index_is_current, full_text_query
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
from schemas.table import SEARCH_COLUMNS, SEARCH_NPROBES, SEARCH_REFINE_FACTOR

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
        else:
            # A vector search never returns a row whose vector is null (indexed, unindexed or
            # exact); filtering them out anyway scanned the whole column on every query (about
            # 325 ms against 8 ms at 100k rows).
            query = (table.search(vector, vector_column_name=column)
                     .nprobes(config.nprobes or SEARCH_NPROBES)
                     .refine_factor(config.refine_factor or SEARCH_REFINE_FACTOR))
            where = user_where
        query = query.distance_type("cosine")
        if where:
            query = query.where(where, prefilter=True)
        rows = query.limit(config.k).to_list()
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
    # Cosine similarity for vector search; the fused relevance for hybrid search.
    score = row["_relevance_score"] if "_relevance_score" in row else 1.0 - float(row["_distance"])
    hit = {ID: row[ID], "score": round(float(score), 6), CAPTION: row.get(CAPTION), IMAGE: row.get(IMAGE)}
    hit.update({k: v for k, v in row.items() if k not in _HIDDEN and k not in hit})
    return hit
