"""What produced a run's vectors, recorded with them: two outputs (or an output and a table)
with equal provenance hold comparable vectors."""

from __future__ import annotations

import json

from pipeline import __version__
from pipeline.embed.model import ModelSpec
from schemas.embeddings import DEFAULT_VECTOR_DTYPE


def provenance(model: ModelSpec, dtype: str, towers: tuple[str, ...], mode: str = "exact",
               vector_dtype: str = DEFAULT_VECTOR_DTYPE) -> dict:
    """What produced the vectors; two outputs with equal provenance are comparable.

    In JSON's own types, so it compares equal to a copy read back from a footer.
    """
    return json.loads(json.dumps({
        "model": model.ref,
        "revision": model.revision,
        "dim": model.dim,
        "dtype": dtype,  # what the towers computed in
        "vector_dtype": vector_dtype,  # what the vectors are stored as (the schema follows it)
        "towers": list(towers),
        # Pixels follow transformers' PIL image processor, bit for bit.
        "preprocessing": {"reference": "CLIPImageProcessorPil", "mode": mode,
                          **model.preprocessing.to_dict()},
        "max_tokens": model.max_tokens,
        "pipeline_version": __version__,
        **({"random_weights": True} if model.random_weights else {}),
    }))


# Provenance that changes the vectors: an output mixes runs only where these agree.
COMPARED_PROVENANCE = ("model", "revision", "dim", "dtype", "vector_dtype", "towers", "preprocessing",
                       "max_tokens")


def changed_provenance(previous: dict, current: dict) -> list[str]:
    """The keys of COMPARED_PROVENANCE on which two provenances differ (none: their vectors mix)."""
    return [key for key in COMPARED_PROVENANCE if previous.get(key) != current.get(key)]
