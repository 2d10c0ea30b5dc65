"""Benchmarks of the embed pipeline: `python -m bench.throughput`, `python -m bench.memory`.

Models (random weights) and corpora are built once and cached under
`$ALTCLIP_CACHE` (default `~/.cache/altclip-pipeline`): `bench-models/`, `bench-corpus/`.
"""
