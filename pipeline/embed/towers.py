"""The tower actors: `ImageEmbedder` (pixels -> image_embedding), `TextEmbedder` (ids -> text_embedding),
and `TowersEmbedder` (both, for CPUs)."""

from __future__ import annotations

import collections
import time

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pipeline.decode.barrier import per_row
from pipeline.decode.images import PIXELS
from pipeline.decode.text import INPUT_IDS
from pipeline.embed.model import ModelSpec, load_tower, pick_device
from pipeline.progress import report_progress, report_started
from pipeline.timing import add_stage_record
from schemas.embeddings import (
    DEFAULT_VECTOR_DTYPE,
    IMAGE_EMBEDDING,
    IMAGE_ERROR,
    IMAGE_SHA256,
    TEXT_EMBEDDING,
    TEXT_ERROR,
    error,
    vector_type,
)


def vector_column(vectors: np.ndarray, rows: list[int], num_rows: int, dim: int,
                  vector_dtype: str = DEFAULT_VECTOR_DTYPE) -> pa.FixedSizeListArray:
    """`fixed_size_list<float32 | float16>[D]` with the given rows filled (unit vectors, in
    float32) and every other row null.

    A plain fixed-size list, not Ray's tensor extension type, which LanceDB does not take.
    Rounded to float16 here, in the tower's actor, when the vectors are stored so: half the
    bytes then cross the object store to the writer.
    """
    arrow_type = vector_type(dim, vector_dtype)
    full = np.zeros((num_rows, dim), dtype=arrow_type.value_type.to_pandas_dtype())
    full[rows] = vectors
    is_null = np.ones(num_rows, dtype=bool)
    is_null[rows] = False
    return pa.FixedSizeListArray.from_arrays(
        pa.array(full.reshape(-1)), dim, mask=pa.array(is_null)
    )


def with_errors(batch: pa.Table, column: str, errors: dict[int, str]) -> pa.Table:
    """`batch` with `errors` (row -> error) set in `column` where the row had none."""
    if not errors:
        return batch
    values = batch.column(column).to_pylist()
    for i, message in errors.items():
        values[i] = values[i] or message
    return batch.set_column(batch.column_names.index(column), column, pa.array(values, pa.string()))


def accelerator_stats(device: torch.device) -> dict:
    """What the accelerator says about itself: memory from torch.cuda, utilisation from NVML
    (through torch, when `nvidia-ml-py` is installed). A CPU reports nothing."""
    if device.type != "cuda":
        return {}
    gib = 2 ** 30
    free, total = torch.cuda.mem_get_info(device)
    stats = {
        "name": torch.cuda.get_device_name(device),
        "memory_peak_gib": round(torch.cuda.max_memory_allocated(device) / gib, 2),
        "memory_reserved_gib": round(torch.cuda.memory_reserved(device) / gib, 2),
        "memory_used_gib": round((total - free) / gib, 2),  # by every process on the device
        "memory_total_gib": round(total / gib, 2),
    }
    try:
        # The share of the last sample period (1/6 s to 1 s) in which a kernel ran.
        stats["utilisation_percent"] = torch.cuda.utilization(device)
    except Exception:  # no nvidia-ml-py, or NVML not available in this container
        pass
    return stats


class _TowerActor:
    kind: str
    stage: str  # its name in stage records and in the RowCounter

    def __init__(self, model: ModelSpec, dtype: str, num_threads: int | None = None, counter=None,
                 reports_rows: bool = True, vector_dtype: str = DEFAULT_VECTOR_DTYPE):
        # The job's RowCounter hears when this actor is ready and, from the plan's last actor,
        # the rows it finishes.
        self.progress = counter if reports_rows else None
        # The towers compute in `dtype`; their vectors are normalised in float32, then stored
        # as `vector_dtype` (queries keep float32).
        self.vector_dtype = vector_dtype
        self.device = pick_device()
        if self.device.type == "cpu" and num_threads:
            # Leave the other cores to the decode and tokenize tasks.
            torch.set_num_threads(num_threads)
        self.dtype = dtype
        self.tower = load_tower(self.kind, model.local_dir(), dtype, self.device)
        self.dim = self.tower.projection.out_features
        report_started(counter, self.stage)

    def _finish(self, out: pa.Table, started: float, **counts: int) -> pa.Table:
        out = add_stage_record(out, self.stage, time.perf_counter() - started,
                               device=accelerator_stats(self.device) or None, counts=counts or None)
        report_progress(self.progress, out)
        return out

    def _embed_groups(self, groups: list, inputs_of) -> list:
        """The tower on each group of rows (`inputs_of(group)` makes its tensors): a tensor per
        group. A group the tower fails on is retried row by row: a list of row tensors, or for
        a row that fails alone its `embed_error` (see barrier.per_row)."""
        out: list = []
        for group in groups:
            try:
                out.append(self._forward(inputs_of(group)))
            except torch.OutOfMemoryError:
                raise  # one row too large for the device: a job-level problem
            except Exception:
                out.append(None)
        succeeded = any(result is not None for result in out)
        for n, group in enumerate(groups):
            if out[n] is None:
                out[n] = per_row(lambda row: self._forward(inputs_of([row]))[0], group,
                                 "embed_error", f"the {self.kind} tower", others_succeeded=succeeded)
        return out

    def _call_tower(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.tower(**inputs)

    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tower on a batch; out of accelerator memory, the batch is halved and retried, so
        a batch size too large for the device costs time, never rows."""
        try:
            return self._call_tower(inputs)
        except torch.OutOfMemoryError:
            size = next(iter(inputs.values())).shape[0]
            if size == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = size // 2
            return torch.cat([self._forward({k: v[:half] for k, v in inputs.items()}),
                              self._forward({k: v[half:] for k, v in inputs.items()})])


# Image vectors an actor keeps by the image's content hash (about 30 MB at 768-d): an image that
# recurs in a corpus (re-posts, placeholders, one picture under many captions) goes through the
# tower once per actor while it stays among the most recent this many.
IMAGE_CACHE_ENTRIES = 10_000


class PixelStaging:
    """The host buffer a batch's uint8 pixels are gathered into on their way to the device, kept
    from batch to batch. On a GPU it is pinned (page-locked), so the copy to the device runs
    without blocking the actor, which goes on queueing the tower's kernels behind it; pinning
    costs far more than a copy, hence one buffer for the actor's life, grown when a batch needs
    more. Before the buffer is written again, the last copy out of it must have finished: a
    CUDA event recorded after each copy says when."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned = device.type == "cuda"
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.copied = None  # the event after the last copy out of the buffer (GPU only)

    def to_device(self, images: np.ndarray | list[bytes], shape: tuple[int, int, int]) -> torch.Tensor:
        """(N, *shape) uint8 on the device, from an array or from each image's bytes."""
        size = int(np.prod(shape))
        rows = len(images)
        if self.copied is not None:
            self.copied.synchronize()
        if self.buffer.numel() < rows * size:
            self.buffer = torch.empty(rows * size, dtype=torch.uint8, pin_memory=self.pinned)
        staged = self.buffer[: rows * size]
        view = staged.numpy()
        if isinstance(images, np.ndarray):
            view[:] = images.reshape(-1)
        else:
            for i, data in enumerate(images):
                view[i * size:(i + 1) * size] = np.frombuffer(data, dtype=np.uint8)
        staged = staged.view(rows, *shape)
        if not self.pinned:
            # The caller's next step copies it (the normalisation), before the buffer is reused.
            return staged.to(self.device)
        on_device = staged.to(self.device, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        return on_device


class ImageEmbedder(_TowerActor):
    """Holds the vision tower only; normalises uint8 pixels on its device; embeds each distinct
    image once (see IMAGE_CACHE_ENTRIES)."""

    kind = "image"
    stage = "image_tower"

    def __init__(self, model: ModelSpec, dtype: str, num_threads: int | None = None, counter=None,
                 reports_rows: bool = True, vector_dtype: str = DEFAULT_VECTOR_DTYPE,
                 compile_batch: int = 0):
        super().__init__(model, dtype, num_threads, counter, reports_rows, vector_dtype)
        self.height, self.width = model.preprocessing.output_hw()
        self.table = model.preprocessing.normalization_table()
        self.lookup = torch.from_numpy(self.table).to(self.device)
        self.staging = PixelStaging(self.device)
        self.channels = torch.arange(3, device=self.device)[None, :, None, None]
        self.recent: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.compiled, self.compile_batch = None, compile_batch
        self.images_compiled = 0  # images through the compiled tower (blank padding not counted)
        if compile_batch:
            self.compiled = torch.compile(self.tower, dynamic=False)
            # Compiled here, before the first batch: the actor's start pays for it, not the
            # first batch's rows, and the busy rates stay the tower's own.
            with torch.inference_mode():
                self._call_tower({"pixel_values": self.pixel_values(
                    np.zeros((compile_batch, self.height, self.width, 3), np.uint8))})

    def _call_tower(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The compiled tower runs batches of `compile_batch` images only (another shape would
        compile it again): a smaller batch of more than half that is padded with blank images;
        smaller ones (a batch of repeats, a halved or row-by-row retry) run the tower as it is."""
        pixels = inputs["pixel_values"]
        rows = pixels.shape[0]
        if self.compiled is None or not self.compile_batch // 2 < rows <= self.compile_batch:
            return self.tower(pixel_values=pixels)
        if rows < self.compile_batch:
            pixels = torch.cat([pixels, pixels.new_zeros((self.compile_batch - rows, *pixels.shape[1:]))])
        self.images_compiled += rows
        # Contiguous always: the compiled code is specialised to its input's strides.
        return self.compiled(pixel_values=pixels.contiguous())[:rows]

    def pixel_values(self, pixels: np.ndarray | list[bytes]) -> torch.Tensor:
        """(N, H, W, 3) uint8 (an array, or each image's bytes) -> (N, 3, H, W) normalised, in
        the tower's dtype, on the tower's device."""
        x = self.staging.to_device(pixels, (self.height, self.width, 3))
        dtype = self.tower.projection.weight.dtype
        if self.device.type == "cpu":
            # numpy's take, a channel at a time with the uint8 values as indices: the same values
            # at four times the speed of torch's gather through int64 indices, which took half
            # the tiny model's actor time on CPUs.
            values = x.numpy()
            out = np.empty((len(values), 3, self.height, self.width), np.float32)
            for channel in range(3):
                np.take(self.table[channel], values[..., channel], out=out[:, channel])
            return torch.from_numpy(out).to(dtype)
        return self.lookup[self.channels, x.permute(0, 3, 1, 2).long()].to(dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        started, compiled_before = time.perf_counter(), self.images_compiled
        pixels = batch.column(PIXELS).to_pylist()
        size = self.height * self.width * 3
        errors = {i: error("decode_error", f"{len(p)} bytes of pixels, not {size}")
                  for i, p in enumerate(pixels) if p is not None and len(p) != size}
        # decode_images hashes the bytes of every row it gives pixels to.
        hashes = batch.column(IMAGE_SHA256).to_pylist()
        new = {}  # the first row of each image this actor holds no vector for
        for i, p in enumerate(pixels):
            if p is not None and i not in errors and hashes[i] not in self.recent:
                new.setdefault(hashes[i], i)
        if new:
            def inputs_of(keys: list[str]) -> dict[str, torch.Tensor]:
                return {"pixel_values": self.pixel_values([pixels[new[k]] for k in keys])}

            with torch.inference_mode():
                embedded = self._embed_groups([list(new)], inputs_of)[0]
            if isinstance(embedded, torch.Tensor):
                embedded = list(F.normalize(embedded.float(), dim=-1).cpu().numpy())
            else:
                embedded = [v if isinstance(v, str) else F.normalize(v.float(), dim=-1).cpu().numpy()
                            for v in embedded]
            for key, vector in zip(new, embedded):
                if isinstance(vector, str):
                    errors[new[key]] = vector
                else:
                    self.recent[key] = vector
        rows = [i for i, p in enumerate(pixels) if p is not None and i not in errors
                and hashes[i] in self.recent]
        for i, p in enumerate(pixels):  # a repeat of an image that failed fails the same way
            if p is not None and i not in errors and hashes[i] not in self.recent:
                errors[i] = errors[new[hashes[i]]]
        vectors = np.zeros((0, self.dim), dtype=np.float32)
        if rows:
            for i in rows:
                self.recent.move_to_end(hashes[i])
            vectors = np.stack([self.recent[hashes[i]] for i in rows])
        while len(self.recent) > IMAGE_CACHE_ENTRIES:
            self.recent.popitem(last=False)
        out = with_errors(batch.drop_columns([PIXELS]), IMAGE_ERROR, errors).append_column(
            IMAGE_EMBEDDING, vector_column(vectors, rows, batch.num_rows, self.dim, self.vector_dtype)
        )
        return self._finish(out, started, images_reused=len(rows) - len(new),
                            images_compiled=self.images_compiled - compiled_before)


# Captions per forward pass of the text tower, by device: a batch is sorted by length and cut
# into groups of this many, each padded to its own longest caption, not the batch's. On CPUs
# small groups cost nothing and save the padding (bench: batches of 32 captions of 10 to 172
# tokens took 7.7 s padded whole, 5.9 s in groups of 16, 4.1 s in groups of 8); a GPU needs
# larger groups to stay busy.
TEXT_GROUP_ROWS = {"cpu": 8, "cuda": 64}


class TextEmbedder(_TowerActor):
    """Holds the text tower only; embeds each batch's captions in groups of similar length."""

    kind = "text"
    stage = "text_tower"

    def __init__(self, model: ModelSpec, dtype: str, num_threads: int | None = None, counter=None,
                 reports_rows: bool = True, vector_dtype: str = DEFAULT_VECTOR_DTYPE):
        super().__init__(model, dtype, num_threads, counter, reports_rows, vector_dtype)
        self.pad_token_id = model.pad_token_id
        self.vocab_size = self.tower.vocab_size
        self.group_rows = TEXT_GROUP_ROWS.get(self.device.type, 64)

    def _inputs(self, token_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        longest = max(len(t) for t in token_ids)
        input_ids = np.full((len(token_ids), longest), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(token_ids), longest), dtype=np.int64)
        for j, t in enumerate(token_ids):
            input_ids[j, : len(t)] = t
            attention_mask[j, : len(t)] = 1
        return {"input_ids": torch.from_numpy(input_ids).to(self.device),
                "attention_mask": torch.from_numpy(attention_mask).to(self.device)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        ids = batch.column(INPUT_IDS).to_pylist()
        errors = {i: error("invalid_caption", "token ids outside the model's vocabulary")
                  for i, row in enumerate(ids) if row and not all(0 <= t < self.vocab_size for t in row)}
        rows = sorted((i for i, row in enumerate(ids) if row and i not in errors), key=lambda i: len(ids[i]))
        done, vectors = [], []
        if rows:
            groups = [rows[g: g + self.group_rows] for g in range(0, len(rows), self.group_rows)]
            with torch.inference_mode():
                embedded = self._embed_groups(groups, lambda group: self._inputs([ids[i] for i in group]))
            for group, result in zip(groups, embedded):
                for i, vector in zip(group, result):
                    if isinstance(vector, str):
                        errors[i] = vector
                    else:
                        done.append(i)
                        vectors.append(F.normalize(vector.float(), dim=-1).cpu().numpy())
        stacked = np.stack(vectors) if vectors else np.zeros((0, self.dim), dtype=np.float32)
        out = with_errors(batch.drop_columns([INPUT_IDS]), TEXT_ERROR, errors).append_column(
            TEXT_EMBEDDING,  # back in row order
            vector_column(stacked, done, batch.num_rows, self.dim, self.vector_dtype)
        )
        return self._finish(out, started)


class TowersEmbedder:
    """Both towers in one actor, the image tower then the text tower on each batch: how the
    towers share CPUs. As two actors they would split the cores evenly, although the image
    tower needs two to three times the text tower's compute, so the text actor would idle while
    the image actor, on half the cores, held the job back."""

    stage = "towers"

    def __init__(self, model: ModelSpec, dtype: str, num_threads: int | None = None, counter=None,
                 reports_rows: bool = True, vector_dtype: str = DEFAULT_VECTOR_DTYPE,
                 compile_batch: int = 0):
        self.image = ImageEmbedder(model, dtype, num_threads, vector_dtype=vector_dtype,
                                   compile_batch=compile_batch)
        self.text = TextEmbedder(model, dtype, num_threads, vector_dtype=vector_dtype)
        self.progress = counter if reports_rows else None
        report_started(counter, self.stage)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = self.text(self.image(batch))
        report_progress(self.progress, out)
        return out
