"""A table opened for queries: the model and dtype its vectors were made with, and texts, images
and vectors turned into query vectors through the same stages the embed job runs."""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.config import ConfigError, named
from pipeline.decode.fetch import FetchPolicy
from pipeline.decode.images import MAX_IMAGE_PIXELS, preprocess_images
from pipeline.decode.text import tokenize_captions
from pipeline.embed.model import RANDOM_WEIGHTS_NOTE, ModelSpec, resolve_model
from pipeline.embed.towers import ImageEmbedder, TextEmbedder
from pipeline.table.store import open_table, table_provenance
from schemas.embeddings import IMAGE_EMBEDDING, IMAGE_ERROR, TEXT_EMBEDDING, TEXT_ERROR
from schemas.manifest import CAPTION, IMAGE, INLINE_IMAGE
from schemas.table import SEARCH_NPROBES, SEARCH_REFINE_FACTOR

# The towers' dtype of tables written before it was recorded: they were all embedded in float32.
UNRECORDED_DTYPE = "float32"
TEXT_BATCH = 64


@dataclass
class QueryTable:
    """One table and its model; each tower is loaded on first use and kept."""

    table: object  # a LanceDB table
    model: ModelSpec
    dtype: str  # what the towers computed the table's vectors in
    preprocess_mode: str  # exact or fast, as the table's images were preprocessed
    _towers: dict = field(default_factory=dict, repr=False)
    # One query through the towers at a time: torch already spreads one over every core.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _tower(self, kind: str):
        if kind not in self._towers:
            self._towers[kind] = (TextEmbedder if kind == "text" else ImageEmbedder)(self.model, self.dtype)
        return self._towers[kind]

    def load_towers(self) -> None:
        """Both towers now, so that no query waits for one to load."""
        with self._lock:
            self._tower("text")
            self._tower("image")

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(len(texts), D) float32 caption vectors."""
        chunks = []
        for start in range(0, len(texts), TEXT_BATCH):
            batch = tokenize_captions(pa.table({CAPTION: texts[start:start + TEXT_BATCH]}), self.model)
            for text, failure in zip(texts[start:], batch.column(TEXT_ERROR).to_pylist()):
                if failure:
                    raise ConfigError(f"text {text!r}: {failure}")
            with self._lock:
                out = self._tower("text")(batch)
            chunks.append(_vectors(out, TEXT_EMBEDDING, TEXT_ERROR))
        return np.concatenate(chunks)

    def embed_text(self, text: str) -> np.ndarray:
        return self.embed_texts([text])[0]

    def embed_image(self, image: bytes | str, policy: FetchPolicy,
                    max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
        """An image (its bytes, or a path or URI the policy lets through) as a float32 vector,
        decoded and preprocessed the way the table's own images were."""
        inline = isinstance(image, (bytes, bytearray))
        batch = pa.table({IMAGE: pa.array([None if inline else image], pa.string()),
                          INLINE_IMAGE: pa.array([bytes(image) if inline else None], pa.binary())})
        batch = preprocess_images(batch, self.model.preprocessing, policy, self.preprocess_mode,
                                  max_pixels=max_pixels)
        failure = batch.column(IMAGE_ERROR)[0]
        if failure.is_valid:
            raise ConfigError(f"image{'' if inline else ' ' + storage.redact(image)}: {failure}")
        with self._lock:
            out = self._tower("image")(batch)
        return _vectors(out, IMAGE_EMBEDDING, IMAGE_ERROR)[0]

    def read_vector(self, path: str) -> np.ndarray:
        """A query vector from a .npy file or a JSON list, of the table's dimension, normalised."""
        try:
            if path.endswith(".npy"):
                vector = np.load(path)
            else:
                with open(path, encoding="utf-8") as f:
                    vector = np.asarray(json.load(f))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read a vector from it ({exc})") from None
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape != (self.model.dim,):
            raise ConfigError(f"{path}: {vector.shape[0]} values, the table's vectors have "
                              f"{self.model.dim}")
        norm = np.linalg.norm(vector)
        if not np.isfinite(norm) or norm == 0:
            raise ConfigError(f"{path}: a vector of length {norm} has no direction")
        return vector / norm


def nearest(table, vector: np.ndarray, column: str, k: int, where: str | None = None,
            columns: list[str] | None = None, nprobes: int | None = None,
            refine_factor: int | None = None) -> list[dict]:
    """The `k` rows of a LanceDB table nearest `vector` in `column` by cosine, best first, each
    with its `score` (cosine similarity) and `columns` (default: all), filtered by `where` first.

    A vector search never returns a row whose vector is null (indexed, unindexed or exact):
    filtering them out anyway scanned the whole column on every query (about 325 ms against
    8 ms at 100k rows). With an ANN index, refining re-ranks by the exact distance: the index's
    own is a quantized squared L2, not the cosine a score is made from."""
    query = (table.search(vector, vector_column_name=column).distance_type("cosine")
             .nprobes(nprobes or SEARCH_NPROBES).refine_factor(refine_factor or SEARCH_REFINE_FACTOR))
    if where:
        query = query.where(where, prefilter=True)
    if columns is not None:
        query = query.select([*columns, "_distance"])
    rows = query.limit(k).to_list()
    for row in rows:
        row["score"] = round(1.0 - float(row.pop("_distance")), 6)
    return rows


def open_query_table(db: str, name: str, model: str | None = None,
                     storage_options: dict | None = None, log=None) -> QueryTable:
    """The table, and the model it records (or `model`), checked to make vectors of its size.

    A model other than the table's own (another revision) is allowed with a warning through
    `log` (default: stderr): its scores may not be comparable."""
    log = log or (lambda message: print(message, file=sys.stderr))
    table = open_table(db, name, storage_options)
    provenance = table_provenance(table) or {}
    if model is None and "model" not in provenance:
        raise ConfigError(f"the table does not record its model: name it with {named('model')}")
    spec = resolve_model(model or provenance["model"], storage_options)
    if provenance.get("revision") not in (None, spec.revision):
        log(f"warning: the table was built with {provenance['model']}@{provenance['revision']}, "
            f"queries use {spec.label}: scores may not be comparable")
    if provenance.get("random_weights"):
        log(RANDOM_WEIGHTS_NOTE)
    if spec.dim != provenance.get("dim", spec.dim):
        raise ConfigError(f"{named('model')} {spec.ref} makes {spec.dim}-d vectors, the table holds "
                          f"{provenance['dim']}-d ones")
    return QueryTable(table=table, model=spec, dtype=provenance.get("dtype", UNRECORDED_DTYPE),
                      preprocess_mode=(provenance.get("preprocessing") or {}).get("mode", "exact"))


def _vectors(batch: pa.Table, column: str, error_column: str) -> np.ndarray:
    """A tower's vectors as (rows, D) float32; a row the tower failed on is refused."""
    for failure in batch.column(error_column).to_pylist():
        if failure:
            raise ConfigError(f"the query could not be embedded: {failure}")
    array = batch.column(column).combine_chunks()
    return np.asarray(array.values, dtype=np.float32).reshape(len(array), -1)
