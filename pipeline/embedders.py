"""The tower actors: `ImageEmbedder` (pixels -> image_embedding), `TextEmbedder` (ids -> text_embedding)."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pipeline.images import PIXELS
from pipeline.model import ModelSpec, load_tower, pick_device
from pipeline.text import INPUT_IDS
from pipeline.timing import add_device_stats, add_stage_seconds
from schemas.embeddings import IMAGE_EMBEDDING, TEXT_EMBEDDING


def vector_column(vectors: np.ndarray, rows: list[int], num_rows: int, dim: int) -> pa.FixedSizeListArray:
    """`fixed_size_list<float32>[D]` with the given rows filled and every other row null.

    A plain fixed-size list, not Ray's tensor extension type, which LanceDB does not take.
    """
    full = np.zeros((num_rows, dim), dtype=np.float32)
    full[rows] = vectors
    is_null = np.ones(num_rows, dtype=bool)
    is_null[rows] = False
    return pa.FixedSizeListArray.from_arrays(
        pa.array(full.reshape(-1)), dim, mask=pa.array(is_null)
    )


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

    def __init__(self, model: ModelSpec, dtype: str, num_threads: int | None = None):
        self.device = pick_device()
        if self.device.type == "cpu" and num_threads:
            # Leave the other cores to the decode and tokenize tasks.
            torch.set_num_threads(num_threads)
        self.dtype = dtype
        self.tower = load_tower(self.kind, model.local_dir(), dtype, self.device)
        self.dim = self.tower.projection.out_features

    def _vectors(self, inputs: dict[str, torch.Tensor] | None, rows: list[int], num_rows: int):
        vectors = np.zeros((0, self.dim), dtype=np.float32)
        if rows:
            with torch.inference_mode():
                embedded = self._forward(inputs)
            vectors = F.normalize(embedded.float(), dim=-1).cpu().numpy()
        return vector_column(vectors, rows, num_rows, self.dim)

    def _finish(self, out: pa.Table, started: float) -> pa.Table:
        stage = f"{self.kind}_tower"
        out = add_stage_seconds(out, stage, time.perf_counter() - started)
        stats = accelerator_stats(self.device)
        return add_device_stats(out, stage, stats) if stats else out

    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tower on a batch; out of accelerator memory, the batch is halved and retried, so
        a batch size too large for the device costs time, never rows."""
        try:
            return self.tower(**inputs)
        except torch.OutOfMemoryError:
            size = next(iter(inputs.values())).shape[0]
            if size == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = size // 2
            return torch.cat([self._forward({k: v[:half] for k, v in inputs.items()}),
                              self._forward({k: v[half:] for k, v in inputs.items()})])


class ImageEmbedder(_TowerActor):
    """Holds the vision tower only; normalises uint8 pixels on its device."""

    kind = "image"

    def __init__(self, model: ModelSpec, dtype: str, num_threads: int | None = None):
        super().__init__(model, dtype, num_threads)
        self.height, self.width = model.preprocessing.output_hw()
        self.lookup = torch.from_numpy(model.preprocessing.normalization_table()).to(self.device)
        self.channels = torch.arange(3, device=self.device)[None, :, None, None]

    def pixel_values(self, pixels: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) normalised, in the tower's dtype."""
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True).permute(0, 3, 1, 2).long()
        return self.lookup[self.channels, x].to(self.tower.projection.weight.dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        pixels = batch.column(PIXELS).to_pylist()
        rows = [i for i, p in enumerate(pixels) if p is not None]
        inputs = None
        if rows:
            stacked = np.frombuffer(bytearray(b"".join(pixels[i] for i in rows)), dtype=np.uint8)
            stacked = stacked.reshape(len(rows), self.height, self.width, 3)
            inputs = {"pixel_values": self.pixel_values(stacked)}
        out = batch.drop_columns([PIXELS]).append_column(
            IMAGE_EMBEDDING, self._vectors(inputs, rows, batch.num_rows)
        )
        return self._finish(out, started)


class TextEmbedder(_TowerActor):
    """Holds the text tower only; pads each batch to its longest caption."""

    kind = "text"

    def __init__(self, model: ModelSpec, dtype: str, num_threads: int | None = None):
        super().__init__(model, dtype, num_threads)
        self.pad_token_id = model.pad_token_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        ids = batch.column(INPUT_IDS).to_pylist()
        rows = [i for i, row in enumerate(ids) if row is not None]
        inputs = None
        if rows:
            longest = max(len(ids[i]) for i in rows)
            input_ids = np.full((len(rows), longest), self.pad_token_id, dtype=np.int64)
            attention_mask = np.zeros((len(rows), longest), dtype=np.int64)
            for j, i in enumerate(rows):
                input_ids[j, : len(ids[i])] = ids[i]
                attention_mask[j, : len(ids[i])] = 1
            inputs = {
                "input_ids": torch.from_numpy(input_ids).to(self.device),
                "attention_mask": torch.from_numpy(attention_mask).to(self.device),
            }
        out = batch.drop_columns([INPUT_IDS]).append_column(
            TEXT_EMBEDDING, self._vectors(inputs, rows, batch.num_rows)
        )
        return self._finish(out, started)
