"""The installed `altclip` command as the README runs it: make-test-model and demo."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from transformers import AltCLIPModel, AltCLIPProcessor

from jobs.make_test_model import sample_captions
from tests.conftest import marked_environment, processes_left


def test_test_model_loads_with_transformers_own_classes(tiny_model):
    processor = AltCLIPProcessor.from_pretrained(tiny_model)
    model = AltCLIPModel.from_pretrained(tiny_model)
    assert model.config.projection_dim == 64
    unk = processor.tokenizer.unk_token_id
    # Every script the tokenizer was trained on is tokenized into real pieces, not <unk>.
    for _, caption in sample_captions()[:: 24]:
        ids = processor.tokenizer(caption)["input_ids"]
        assert ids[0] == processor.tokenizer.bos_token_id and ids[-1] == processor.tokenizer.eos_token_id
        assert unk not in ids, caption


def test_only_a_model_of_random_weights_is_recorded_as_one(tiny_model, tmp_path):
    """The mark the tiny model's config carries reaches its runs' provenance, where search,
    classify and dedup find it; a model without it (a real one) is recorded as before."""
    import dataclasses
    import json
    import shutil

    from pipeline.embed.model import RANDOM_WEIGHTS_KEY, resolve_model
    from pipeline.embed.provenance import provenance

    marked = resolve_model(tiny_model)
    assert marked.random_weights and provenance(marked, "float32", ("image",))["random_weights"] is True
    real = tmp_path / "real"
    shutil.copytree(tiny_model, real)
    config = json.loads((real / "config.json").read_text())
    del config[RANDOM_WEIGHTS_KEY]
    (real / "config.json").write_text(json.dumps(config))
    unmarked = resolve_model(str(real))
    assert not unmarked.random_weights and "random_weights" not in provenance(unmarked, "float32", ("image",))
    assert provenance(unmarked, "float32", ("image",)) == provenance(
        dataclasses.replace(marked, ref=unmarked.ref, revision=unmarked.revision, random_weights=False),
        "float32", ("image",))


@pytest.mark.slow  # the installed command in a subprocess, with its own Ray
def test_demo_falls_back_loudly_to_the_tiny_model(tmp_path):
    altclip = os.path.join(os.path.dirname(sys.executable), "altclip")
    env, mark = marked_environment(HF_HUB_OFFLINE="1")  # the hub is unreachable: the fallback must show
    result = subprocess.run([altclip, "demo", "--workdir", str(tmp_path / "demo")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Once a tower actor of the demo's was alive 25 minutes after it exited.
    assert not processes_left(mark), "processes left after the demo"
    assert "--model BAAI/AltCLIP: not a local folder" in result.stderr
    assert "TINY MODEL OF RANDOM WEIGHTS" in result.stderr and "MEANINGLESS" in result.stderr
    assert "embedded 36 rows" in result.stderr
    assert 'top 5 images for "un círculo rojo":' in result.stdout
    assert len([line for line in result.stdout.splitlines() if line[:2] in {f"{n}." for n in range(1, 6)}]) == 5
