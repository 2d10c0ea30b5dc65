"""The embeddings contract: the Arrow schema of the embed job's Parquet output."""

from __future__ import annotations

import json

import pyarrow as pa

from schemas.manifest import CAPTION, ID, IMAGE, INTERNAL_PREFIX

IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
VECTOR_COLUMNS = (IMAGE_EMBEDDING, TEXT_EMBEDDING)
IMAGE_SHA256 = "image_sha256"
CAPTION_SHA256 = "caption_sha256"
WIDTH = "width"
HEIGHT = "height"
IMAGE_ERROR = "image_error"
TEXT_ERROR = "text_error"
CAPTION_TRUNCATED = "caption_truncated"
MODEL = "model"

# Key of the provenance JSON in the Parquet footer (Arrow schema metadata).
PROVENANCE_KEY = b"altclip.provenance"

# Error kinds: the text before the colon of `image_error` / `text_error`.
ERROR_KINDS = (
    "not_found",  # the image URI does not exist
    "read_error",  # the bytes could not be read (permissions, not a file, a malformed URL, a
    # server answering garbage); an unforeseen error while reading is this kind too
    "decode_error",  # the bytes are not an image PIL can decode; an unforeseen error while
    # decoding or preprocessing is this kind too, with the exception's type in the message
    "truncated",  # an image file that ends early
    "too_large",  # more pixels than the decompression-bomb limit, or a download over the cap
    "timeout",  # a fetch that got no answer in time, after retries; a decode that did not end
    "forbidden",  # a scheme the job does not allow, a local path from a remote manifest, or a
    # URL (or a redirect) to a non-public address
    "no_image",  # the row has neither an image URI nor inline bytes
    "opted_out",  # the server's X-Robots-Tag says its images are not for this use (noai, ...)
    "worker_crash",  # the process decoding the image died on it (a crash, killed for memory)
    "empty_caption",  # null, empty or whitespace-only caption
    "invalid_caption",  # a caption that is not text (a list, a number's absence of text,
    # bytes that are not UTF-8), or one the tokenizer failed on
    "embed_error",  # the tower failed on this row alone (its other rows were embedded)
)
# Kinds that may succeed when tried again (`embed --retry-errors`); the others need the input
# to change first.
TRANSIENT_ERROR_KINDS = ("timeout", "read_error", "worker_crash")


# The stored vectors' value type (`--vector-dtype`), whatever the towers computed in (they are
# normalised in float32, then rounded). float16 halves the vectors' bytes (20,000 rows of two
# 768-d vectors: shards 58.2 -> 29.0 MB, table data 123 -> 62 MB); each vector's cosine to its
# float32 value stays above 0.99999997, and exact search's recall@10 against float32 is 0.999
# (random and CLIP-like vectors; the ANN index's recall is unchanged). Provenance records it as
# `vector_dtype`; an output or a table holds one type only.
VECTOR_VALUE_TYPES = {"float32": pa.float32(), "float16": pa.float16()}
DEFAULT_VECTOR_DTYPE = "float32"


def vector_type(dim: int, vector_dtype: str = DEFAULT_VECTOR_DTYPE) -> pa.DataType:
    return pa.list_(VECTOR_VALUE_TYPES[vector_dtype], dim)


def vector_dtype_of(schema: pa.Schema) -> str:
    """The `--vector-dtype` of a schema's vector columns (float32 where it has none)."""
    for name in VECTOR_COLUMNS:
        if name in schema.names:
            value_type = schema.field(name).type.value_type
            return next((k for k, v in VECTOR_VALUE_TYPES.items() if v == value_type), str(value_type))
    return DEFAULT_VECTOR_DTYPE


def embeddings_schema(
    dim: int, metadata_fields: list[pa.Field], provenance: dict | None = None
) -> pa.Schema:
    """The output schema: contract columns around the manifest's own metadata columns.

    The vectors are of the provenance's `vector_dtype` (float32 without one): the footer and the
    columns cannot disagree."""
    vector_dtype = (provenance or {}).get("vector_dtype", DEFAULT_VECTOR_DTYPE)
    fields = [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(IMAGE, pa.string()),
        pa.field(CAPTION, pa.string()),
        *metadata_fields,
        pa.field(IMAGE_EMBEDDING, vector_type(dim, vector_dtype)),
        pa.field(TEXT_EMBEDDING, vector_type(dim, vector_dtype)),
        pa.field(IMAGE_SHA256, pa.string()),
        pa.field(CAPTION_SHA256, pa.string()),
        pa.field(WIDTH, pa.int32()),
        pa.field(HEIGHT, pa.int32()),
        pa.field(IMAGE_ERROR, pa.string()),
        pa.field(TEXT_ERROR, pa.string()),
        pa.field(CAPTION_TRUNCATED, pa.bool_()),
        pa.field(MODEL, pa.string()),
    ]
    metadata = {PROVENANCE_KEY: json.dumps(provenance, sort_keys=True)} if provenance else None
    return pa.schema(fields, metadata=metadata)


def contract_column_names() -> set[str]:
    """Output column names a manifest's metadata column may not take."""
    return set(embeddings_schema(1, []).names)


def is_reserved(name: str) -> bool:
    """Whether a manifest's metadata column must be renamed: an output or internal name."""
    return name in contract_column_names() or name.startswith(INTERNAL_PREFIX)


def provenance_of(schema: pa.Schema) -> dict | None:
    """The provenance in a schema's metadata (an output's footer, a table's schema). Outputs and
    tables made before `vector_dtype` was recorded say it through their columns' type."""
    raw = (schema.metadata or {}).get(PROVENANCE_KEY)
    if not raw:
        return None
    return {"vector_dtype": vector_dtype_of(schema), **json.loads(raw)}


def error(kind: str, message: str) -> str:
    """An error value in the `kind: message` form that the summary counts by kind."""
    assert kind in ERROR_KINDS, kind
    return f"{kind}: {message}"


def error_kind(value: str) -> str:
    return value.split(":", 1)[0]
