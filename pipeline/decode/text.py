"""Tokenize captions with the model's own tokenizer: text -> token ids the text tower takes."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time

import pyarrow as pa

from pipeline.decode.barrier import per_row
from pipeline.timing import add_stage_record
from schemas.embeddings import CAPTION_SHA256, CAPTION_TRUNCATED, TEXT_ERROR, error
from schemas.manifest import CAPTION, INTERNAL_PREFIX

INPUT_IDS = INTERNAL_PREFIX + "input_ids"  # list<int32>, between the tokenize stage and the text tower
# A caption longer than this many characters per allowed token is tokenized from its start
# only (a 1 MB caption costs the tokenizer 32 KB for a 512-token model), cut at a space so no
# word is split; when that start holds fewer tokens than the limit (long runs of spaces, which
# the tokenizer drops) the whole caption is tokenized. Either way the ids are those of the
# whole caption (tested).
CHARACTERS_PER_TOKEN = 64


@functools.lru_cache(maxsize=2)
def load_tokenizer(model_dir: str):
    """The tokenizer saved with the model; loaded once per worker process.

    A folder with `tokenizer.json` (what save_pretrained writes for XLM-R's fast tokenizer) is
    read by `tokenizers` alone: importing transformers brings torch, 2.3 s of a core and some
    hundred MB in every decode worker, which needs neither. tests/test_fidelity.py holds its ids
    equal to transformers' tokenizer's."""
    eos_token = _eos_token(model_dir)
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")) and eos_token is not None:
        tokenizer = CaptionTokenizer(os.path.join(model_dir, "tokenizer.json"), eos_token)
        if tokenizer.eos_token_id is not None:
            return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _eos_token(model_dir: str) -> str | None:
    """The end-of-sequence token the saved tokenizer's configuration names (None: not said)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            with open(os.path.join(model_dir, name), encoding="utf-8") as f:
                token = json.load(f).get("eos_token")
        except (OSError, ValueError, AttributeError):
            continue
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            return token
    return None


class CaptionTokenizer:
    """A `tokenizers` tokenizer answering what token_ids asks of transformers' one: the ids of
    a list of texts, special tokens added, cut at `max_length`; and `eos_token_id`."""

    def __init__(self, path: str, eos_token: str):
        from tokenizers import Tokenizer

        self.path = path
        tokenizer = Tokenizer.from_file(path)
        self.eos_token_id = tokenizer.token_to_id(eos_token)
        # One tokenizer per length: truncation is a setting of the tokenizer, and threads (the
        # server's queries) share this object. The one read here serves the first length asked
        # for (a run asks for one), so the file (17 MB for XLM-R) is read once.
        self._unset: object | None = tokenizer
        self._by_length: dict[int | None, object] = {}
        self._lock = threading.Lock()

    def _truncating(self, max_length: int | None):
        with self._lock:
            if max_length not in self._by_length:
                from tokenizers import Tokenizer

                tokenizer = self._unset if self._unset is not None else Tokenizer.from_file(self.path)
                self._unset = None
                if max_length is not None:
                    tokenizer.enable_truncation(max_length=max_length)
                self._by_length[max_length] = tokenizer
            return self._by_length[max_length]

    def __call__(self, texts: list[str], truncation: bool = False, max_length: int | None = None) -> dict:
        tokenizer = self._truncating(max_length if truncation else None)
        return {"input_ids": [encoding.ids for encoding in tokenizer.encode_batch(texts)]}


def _start_of(caption: str, limit: int) -> str:
    if len(caption) <= limit:
        return caption
    start = caption[:limit]
    space = max(start.rfind(" "), start.rfind("\n"), start.rfind("\t"))
    return start[:space] if space > limit // 2 else start


def token_ids(tokenizer, captions: list[str], max_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids per caption, at most `max_tokens` with `<s>`/`</s>` kept, and which were cut."""
    limit = (max_tokens + 1) * CHARACTERS_PER_TOKEN
    starts = [_start_of(c, limit) for c in captions]
    # One token past the limit tells a caption that fits exactly from one that was cut.
    encoded = tokenizer(starts, truncation=True, max_length=max_tokens + 1)["input_ids"]
    for i, (caption, start) in enumerate(zip(captions, starts)):
        if start is not caption and len(encoded[i]) <= max_tokens:
            encoded[i] = tokenizer([caption], truncation=True, max_length=max_tokens + 1)["input_ids"][0]
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
    """Ray Data stage: caption -> token ids; empty captions become `text_error`.

    A batch the tokenizer fails on is tokenized row by row: the captions it fails on alone get
    `invalid_caption`. If it fails on every caption alone the fault is not the captions' and
    the stage fails.
    """
    started = time.perf_counter()
    captions = batch.column(CAPTION).to_pylist()
    hashes = caption_hashes(captions)
    known = (batch.column(TEXT_ERROR).to_pylist() if TEXT_ERROR in batch.column_names
             else [None] * batch.num_rows)
    errors = [
        known[i] if known[i] is not None
        else error("empty_caption", "caption is null" if c is None else "caption is empty or whitespace")
        if c is None or not c.strip()
        else None
        for i, c in enumerate(captions)
    ]
    todo = [i for i, e in enumerate(errors) if e is None]
    ids = [None] * batch.num_rows
    truncated = [None] * batch.num_rows
    if todo:
        tokenizer = load_tokenizer(model.local_dir())
        try:
            got = list(zip(*token_ids(tokenizer, [captions[i] for i in todo], model.max_tokens)))
        except Exception:
            got = _one_by_one(tokenizer, [captions[i] for i in todo], model.max_tokens)
        for i, result in zip(todo, got):
            if isinstance(result, str):
                errors[i] = result
            else:
                ids[i], truncated[i] = result
    table = batch
    for name, values in ((INPUT_IDS, pa.array(ids, pa.list_(pa.int32()))),
                         (CAPTION_SHA256, pa.array(hashes, pa.string())),
                         (TEXT_ERROR, pa.array(errors, pa.string())),
                         (CAPTION_TRUNCATED, pa.array(truncated, pa.bool_()))):
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, values)
        else:
            table = table.append_column(name, values)
    return add_stage_record(table, "tokenize", time.perf_counter() - started)


def _one_by_one(tokenizer, captions: list[str], max_tokens: int) -> list:
    def tokenize(caption: str) -> tuple[list[int], bool]:
        ids, cut = token_ids(tokenizer, [caption], max_tokens)
        return ids[0], cut[0]

    return per_row(tokenize, captions, "invalid_caption", "the tokenizer")
