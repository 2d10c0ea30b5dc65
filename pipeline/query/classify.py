"""Zero-shot classification: label prompts -> text vectors (averaged over templates and
languages, as in CLIP's recipe) -> the nearest label per image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline.config import ConfigError, named
from schemas.embeddings import IMAGE_EMBEDDING
from schemas.manifest import ID

if TYPE_CHECKING:  # the towers' module imports torch: not for `altclip classify -h`
    from pipeline.query.query_table import QueryTable

LABEL, LABEL_SCORE, TOP_LABELS, TOP_SCORES = "label", "label_score", "top_labels", "top_scores"


@dataclass(frozen=True)
class LabelSet:
    names: list[str]  # what is written out: the first file's label per class
    prompts: list[list[str]]  # per class: every template x language filled in


def read_labels(label_files: list[str], templates: list[str]) -> LabelSet:
    """One label per line; several files are the same classes in other languages, line by line."""
    columns = []
    for path in label_files:
        try:
            with open(path, encoding="utf-8") as f:
                columns.append([line.strip() for line in f if line.strip()])
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{named('labels')} {path}: cannot read it ({exc.strerror or exc})") from None
    if not columns or not columns[0]:
        raise ConfigError(f"{named('labels')} {label_files[0] if label_files else ''}: no labels in it")
    if any(len(c) != len(columns[0]) for c in columns):
        raise ConfigError(f"{named('labels')}: the files name the same classes line by line, so they need "
                          f"the same number of lines (got {[len(c) for c in columns]})")
    for template in templates:
        if "{}" not in template:
            raise ConfigError(f"{named('templates')} {template!r}: put {{}} where the label goes")
    prompts = [[t.format(c[i]) for c in columns for t in templates] for i in range(len(columns[0]))]
    return LabelSet(names=columns[0], prompts=prompts)


def label_vectors(opened: QueryTable, labels: LabelSet) -> np.ndarray:
    """(classes, D): each class's prompt vectors averaged, then normalised (computed once)."""
    flat = [p for prompts in labels.prompts for p in prompts]
    vectors = opened.embed_texts(flat)
    per_class = vectors.reshape(len(labels.names), -1, vectors.shape[1]).mean(axis=1)
    return per_class / np.linalg.norm(per_class, axis=1, keepdims=True)


def classify_batch(batch: pa.Table, classes: np.ndarray, names: list[str], top_k: int) -> pa.Table:
    """id + image vectors -> id, label, label_score (cosine) and the top k of both."""
    vectors = np.asarray(batch.column(IMAGE_EMBEDDING).combine_chunks().values, dtype=np.float32)
    vectors = vectors.reshape(batch.num_rows, classes.shape[1])
    scores = vectors @ classes.T
    order = np.argsort(-scores, axis=1)[:, :top_k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    return pa.table({
        ID: batch.column(ID),
        LABEL: pa.array([names[i] for i in order[:, 0]], pa.string()),
        LABEL_SCORE: pa.array(top_scores[:, 0], pa.float32()),
        TOP_LABELS: pa.array([[names[i] for i in row] for row in order], pa.list_(pa.string())),
        TOP_SCORES: pa.array(top_scores.tolist(), pa.list_(pa.float32())),
    })
