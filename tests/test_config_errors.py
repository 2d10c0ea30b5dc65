"""Bad configuration fails before any work, with a message that says what to change."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import altclip, read_output


@pytest.fixture()
def manifest(tmp_path):
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"key": ["a"], "url": ["a.jpg"], "TEXT": ["un gato"]}), path)
    return path


@pytest.mark.parametrize(
    "options, message",
    [
        ([], "has no 'id' column (its columns: key, url, TEXT); name the column that identifies each row with --id-col"),
        (["--id-col", "key"], "has no 'image' or 'image_bytes' column and no 'caption' column (its columns: "
                              "key, url, TEXT); name them with --image-col and --caption-col"),
        (["--id-col", "key", "--towers", "image"], "has no 'image' or 'image_bytes' column (its"),
        (["--id-col", "key", "--image-col", "link"], "--image-col link: the manifest has no such column"),
        (["--id-col", "key", "--image-col", "url", "--towers", "text"], "has no 'caption' column"),
        (["--id-col", "key", "--image-col", "url", "--caption-col", "TEXT", "--towers", "image,audio"],
         "--towers image,audio: choose one or both of image,text"),
    ],
)
def test_column_options_are_checked_before_work(manifest, tiny_model, tmp_path, options, message):
    out = tmp_path / "out"
    result = altclip("embed", manifest, "--out", out, "--model", tiny_model, *options, expect_exit=1)
    assert message in result.stderr
    assert not out.exists()


def test_a_manifest_of_captions_alone_runs_the_text_tower(manifest, tiny_model, ray_session, tmp_path):
    # Its rows are captions to embed, not rows of missing images.
    result = altclip("embed", manifest, "--out", tmp_path / "out", "--model", tiny_model, "--id-col", "key",
                     "--caption-col", "TEXT")
    assert "no images: text tower only (name a column of images with --image-col)" in result.stderr
    (row,) = read_output(tmp_path / "out").values()
    assert row["text_embedding"] is not None and row["caption"] == "un gato"
    assert row["image_embedding"] is None and row["image_error"] is None and row["url"] == "a.jpg"


def test_unreadable_and_missing_manifests(tiny_model, tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet")
    result = altclip("embed", broken, "--out", tmp_path / "out", "--model", tiny_model, expect_exit=1)
    assert "cannot read manifest file" in result.stderr and "as parquet" in result.stderr

    result = altclip("embed", tmp_path / "nowhere.csv", "--out", tmp_path / "out", "--model",
                     tiny_model, expect_exit=1)
    assert "does not exist" in result.stderr

    repeated = tmp_path / "repeated.csv"
    repeated.write_text("id,image,caption,caption\na,a.png,one,two\n")
    result = altclip("embed", repeated, "--out", tmp_path / "out", "--model", tiny_model, expect_exit=1)
    assert f"manifest file {repeated} has more than one column named caption" in result.stderr

    odd = tmp_path / "manifest.xlsx"
    odd.write_bytes(b"")
    result = altclip("embed", odd, "--out", tmp_path / "out", "--model", tiny_model, expect_exit=1)
    assert "unknown format .xlsx" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_model_that_cannot_be_loaded_is_named(manifest, tmp_path, monkeypatch):
    """... in seconds: a model that cannot be found fails the run before Ray starts."""
    from pipeline.run import prepare

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run whose model cannot be found")

    monkeypatch.setattr(prepare, "ensure_ray", no_ray)
    result = altclip("embed", manifest, "--out", tmp_path / "out", "--id-col", "key",
                     "--image-col", "url", "--caption-col", "TEXT",
                     "--model", "no-such-org/no-such-model", expect_exit=1)
    assert "--model no-such-org/no-such-model: not a local folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_search_options_are_checked(tmp_path):
    result = altclip("search", tmp_path / "db", "--text", "un gato", "--nprobes", "0", expect_exit=1)
    assert "--nprobes 0: must be at least 1" in result.stderr
    result = altclip("search", tmp_path / "db", "--text", "un gato", "--refine-factor", "-2", expect_exit=1)
    assert "--refine-factor -2: must be at least 1" in result.stderr


def test_a_library_error_names_settings_and_the_cli_their_flags():
    """The library's message names what a caller passes (`vector_dtype`); each command shows
    what sets it there: --out on embed, OUT on load; a value quoting a column stays as it is."""
    import click

    from jobs.options import in_cli_terms
    from pipeline.config import ConfigError, EmbedConfig, named

    with pytest.raises(ConfigError) as refused:
        EmbedConfig(manifest="m.parquet", out="o", vector_dtype="bfloat16", retry_kinds=("flaky",))
    assert str(refused.value) == "`vector_dtype` bfloat16: choose one of float32, float16"

    error = ConfigError(f"{named('out')} o holds float32 vectors; rerun with "
                        f"{named('vector_dtype')} float32 (filter: `caption` = 'x')")
    shown = {}

    @click.command()
    @click.option("--out")
    @click.option("--vector-dtype")
    def embed(out, vector_dtype):
        shown["embed"] = in_cli_terms(error)

    @click.command()
    @click.argument("out")
    def load(out):
        shown["load"] = in_cli_terms(error)

    embed.main(["--out", "o"], standalone_mode=False)
    load.main(["o"], standalone_mode=False)
    assert shown == {
        "embed": "--out o holds float32 vectors; rerun with --vector-dtype float32 (filter: `caption` = 'x')",
        "load": "OUT o holds float32 vectors; rerun with --vector-dtype float32 (filter: `caption` = 'x')",
    }
    assert str(error) == ("`out` o holds float32 vectors; rerun with `vector_dtype` float32 "
                          "(filter: `caption` = 'x')")
