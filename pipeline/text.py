"""Tokenize captions with the model's own tokenizer: text -> token ids the text tower takes."""

from __future__ import annotations

import functools
import hashlib
import time

import pyarrow as pa

from pipeline.timing import add_stage_seconds
from schemas.embeddings import CAPTION_SHA256, CAPTION_TRUNCATED, TEXT_ERROR, error
from schemas.manifest import CAPTION

INPUT_IDS = "input_ids"  # list<int32>, between the tokenize stage and the text tower


@functools.lru_cache(maxsize=2)
def load_tokenizer(model_dir: str):
    """The tokenizer saved with the model; loaded once per worker process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def token_ids(tokenizer, captions: list[str], max_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids per caption, at most `max_tokens` with `<s>`/`</s>` kept, and which were cut."""
    # One token past the limit tells a caption that fits exactly from one that was cut.
    encoded = tokenizer(captions, truncation=True, max_length=max_tokens + 1)["input_ids"]
    ids, truncated = [], []
    for row in encoded:
        cut = len(row) > max_tokens
        ids.append(row[: max_tokens - 1] + [tokenizer.eos_token_id] if cut else row)
        truncated.append(cut)
    return ids, truncated


def caption_hashes(captions: list[str | None]) -> list[str | None]:
    """sha256 of each caption's UTF-8 bytes: what change detection compares."""
    return [None if c is None else hashlib.sha256(c.encode("utf-8")).hexdigest() for c in captions]


def tokenize_captions(batch: pa.Table, model) -> pa.Table:
    """Ray Data stage: caption -> token ids; empty captions become `text_error`."""
    started = time.perf_counter()
    captions = batch.column(CAPTION).to_pylist()
    hashes = caption_hashes(captions)
    errors = [
        error("empty_caption", "caption is null" if c is None else "caption is empty or whitespace")
        if c is None or not c.strip()
        else None
        for c in captions
    ]
    todo = [i for i, e in enumerate(errors) if e is None]
    ids = [None] * batch.num_rows
    truncated = [None] * batch.num_rows
    if todo:
        got_ids, got_cut = token_ids(load_tokenizer(model.local_dir()), [captions[i] for i in todo],
                                     model.max_tokens)
        for i, row_ids, cut in zip(todo, got_ids, got_cut):
            ids[i], truncated[i] = row_ids, cut
    table = batch.append_column(INPUT_IDS, pa.array(ids, pa.list_(pa.int32())))
    table = table.append_column(CAPTION_SHA256, pa.array(hashes, pa.string()))
    table = table.append_column(TEXT_ERROR, pa.array(errors, pa.string()))
    table = table.append_column(CAPTION_TRUNCATED, pa.array(truncated, pa.bool_()))
    return add_stage_seconds(table, "tokenize", time.perf_counter() - started)
