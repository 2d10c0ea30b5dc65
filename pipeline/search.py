"""Search the table: embed a query with the table's own model, then nearest rows by cosine."""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa

from pipeline.config import ConfigError, SearchConfig
from pipeline.embedders import ImageEmbedder, TextEmbedder
from pipeline.fetch import FetchPolicy
from pipeline.images import preprocess_images
from pipeline.model import ModelSpec, resolve_model
from pipeline.table import (
    full_text_index,
    full_text_index_is_current,
    full_text_query,
    open_table,
    table_provenance,
)
from pipeline.text import tokenize_captions
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
from schemas.manifest import CAPTION, ID, IMAGE, INLINE_IMAGE
from schemas.table import SEARCH_COLUMNS, SEARCH_NPROBES, SEARCH_REFINE_FACTOR

# Columns a hit leaves out: vectors and bookkeeping; what remains is the row and its metadata.
_HIDDEN = {IMAGE_EMBEDDING, TEXT_EMBEDDING, IMAGE_SHA256, CAPTION_SHA256, IMAGE_ERROR,
           TEXT_ERROR, CAPTION_TRUNCATED, MODEL, "_distance", "_relevance_score", "_score"}


def embed_texts(model: ModelSpec, dtype: str, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """(len(texts), D) caption vectors through the same stages the embed job runs."""
    embedder = TextEmbedder(model, dtype)
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenize_captions(pa.table({CAPTION: texts[start:start + batch_size]}), model)
        for text, failure in zip(texts[start:], batch.column(TEXT_ERROR).to_pylist()):
            if failure:
                raise ConfigError(f"{text!r}: {failure}")
        out = embedder(batch).column(TEXT_EMBEDDING).combine_chunks()
        chunks.append(np.asarray(out.values, dtype=np.float32).reshape(len(out), -1))
    return np.concatenate(chunks)


def embed_text_query(model: ModelSpec, dtype: str, text: str) -> np.ndarray:
    return embed_texts(model, dtype, [text])[0]


def embed_image_query(model: ModelSpec, dtype: str, uri: str, storage_options=None) -> np.ndarray:
    """An image's vector through the same stages the embed job runs (the user's own query may
    name any file or URL)."""
    batch = pa.table({IMAGE: [uri], INLINE_IMAGE: pa.nulls(1, pa.binary())})
    policy = FetchPolicy(storage_options or {}, allow_local_paths=True, allow_private_urls=True)
    batch = preprocess_images(batch, model.preprocessing, policy)
    if batch.column(IMAGE_ERROR)[0].is_valid:
        raise ConfigError(f"--image {uri}: {batch.column(IMAGE_ERROR)[0]}")
    out = ImageEmbedder(model, dtype)(batch)
    return np.asarray(out.column(IMAGE_EMBEDDING)[0].as_py(), dtype=np.float32)


def search(config: SearchConfig) -> list[dict]:
    """Nearest rows, best first, each as {id, score, caption, image, metadata...}."""
    table = open_table(config.db, config.table_name, config.storage_options)
    origin = table_provenance(table) or {}
    if config.model is None and "model" not in origin:
        raise ConfigError("the table does not record its model: name it with --model")
    model = resolve_model(config.model or origin["model"], config.storage_options)
    if origin.get("revision") not in (None, model.revision):
        print(
            f"warning: the table was built with {origin['model']}@{origin['revision']}, "
            f"the query uses {model.label}: scores may not be comparable",
            file=sys.stderr,
        )
    if model.dim != origin.get("dim", model.dim):
        raise ConfigError(
            f"--model {model.ref} makes {model.dim}-d vectors, the table holds {origin['dim']}-d ones"
        )
    dtype = origin.get("dtype", "float32")
    if config.text is not None:
        vector = embed_text_query(model, dtype, config.text)
    elif config.image is not None:
        vector = embed_image_query(model, dtype, config.image, config.storage_options)
    else:
        vector = _read_vector(config.vector, model.dim)
    if config.hybrid:
        _warn_if_full_text_index_is_old(table, config.db)
    column = SEARCH_COLUMNS[config.against or "image"]
    where = f"{column} IS NOT NULL" + (f" AND ({config.where})" if config.where else "")
    try:
        if config.hybrid:
            # Reciprocal-rank fusion of the vector ranking and the captions' full-text ranking.
            query = (table.search(query_type="hybrid", vector_column_name=column)
                     .vector(vector).text(full_text_query(config.text)))
        else:
            query = (table.search(vector, vector_column_name=column)
                     .nprobes(config.nprobes or SEARCH_NPROBES)
                     .refine_factor(config.refine_factor or SEARCH_REFINE_FACTOR))
        rows = query.distance_type("cosine").where(where, prefilter=True).limit(config.k).to_list()
    except Exception as exc:  # LanceDB reports a bad filter as a generic error
        if not config.where:
            raise
        raise ConfigError(f"--where {config.where!r}: {exc}") from exc
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


def _read_vector(path: str, dim: int) -> np.ndarray:
    try:
        if path.endswith(".npy"):
            vector = np.load(path)
        else:
            with open(path, encoding="utf-8") as f:
                vector = np.asarray(json.load(f))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--vector {path}: cannot read a vector from it ({exc})") from None
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if vector.shape != (dim,):
        raise ConfigError(f"--vector {path}: {vector.shape[0]} values, the table's vectors have {dim}")
    return vector / np.linalg.norm(vector)


def _hit(row: dict) -> dict:
    # Cosine similarity for vector search; the fused relevance for hybrid search.
    score = row["_relevance_score"] if "_relevance_score" in row else 1.0 - float(row["_distance"])
    hit = {ID: row[ID], "score": round(float(score), 6), CAPTION: row.get(CAPTION), IMAGE: row.get(IMAGE)}
    hit.update({k: v for k, v in row.items() if k not in _HIDDEN and k not in hit})
    return hit
