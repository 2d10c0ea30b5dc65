"""The embed job: manifest -> AltCLIP towers on Ray -> Parquet shards + summary (-> LanceDB)."""

from __future__ import annotations

import time

from pipeline import __version__, storage
from jobs.load import run_load
from pipeline.config import ConfigError, EmbedConfig, LoadConfig
from pipeline.manifest import open_manifest, read_manifest
from pipeline.model import ModelSpec, resolve_dtype, resolve_model
from pipeline.plan import embed_dataset, ensure_ray, plan_placement
from pipeline.writer import ParquetShardSink, list_shards, summarize, write_summary
from schemas.embeddings import embeddings_schema


def provenance(model: ModelSpec, dtype: str, towers: tuple[str, ...]) -> dict:
    """What produced the vectors; two outputs with equal provenance are comparable."""
    return {
        "model": model.ref,
        "revision": model.revision,
        "dim": model.dim,
        "dtype": dtype,
        "towers": list(towers),
        # Pixels follow transformers' PIL image processor, bit for bit.
        "preprocessing": {"reference": "CLIPImageProcessorPil", **model.preprocessing.to_dict()},
        "max_tokens": model.max_tokens,
        "pipeline_version": __version__,
    }


def run_embed(config: EmbedConfig) -> dict:
    """Run the whole job; returns the summary that is also written to OUT/summary.json."""
    started = time.perf_counter()
    # Everything that can be wrong with the options fails here, before Ray or a model starts.
    manifest = open_manifest(config)
    model = resolve_model(config.model, config.storage_options)
    storage.check_writable(config.out, config.storage_options, "--out")
    if list_shards(config.out, config.storage_options):
        raise ConfigError(
            f"--out {config.out} already holds embeddings: choose an empty output folder"
        )
    ensure_ray(config.address)
    placement = plan_placement(config)
    dtype = resolve_dtype(config.dtype, on_gpu=placement.on_gpu)
    origin = provenance(model, dtype, config.towers)
    schema = embeddings_schema(model.dim, list(manifest.metadata_fields), origin)
    sink = ParquetShardSink(config.out, schema, model.label, config.rows_per_shard,
                            config.storage_options)
    rows_in = read_manifest(manifest).count()
    embed_dataset(config, manifest, model, dtype, placement).write_datasink(sink)
    summary = summarize(sink.shards, rows_in, time.perf_counter() - started, origin)
    summary["summary_uri"] = write_summary(config.out, summary, config.storage_options)
    if config.table:
        summary["table"] = run_load(
            LoadConfig(config.out, config.table, config.table_name, config.storage_options)
        )
    return summary


def main() -> None:
    """`python -m jobs.embed ...` is `altclip embed ...` (what `ray job submit` runs)."""
    from jobs.cli import embed_command

    embed_command(prog_name="python -m jobs.embed")


if __name__ == "__main__":
    main()
