"""Full-text and hybrid search find a word inside captions of any script, spaced or not."""

from __future__ import annotations

import json
import shutil

import lancedb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lancedb.index import FTS

from pipeline.table.indexes import full_text_query
from pipeline.table.store import load_outputs
from schemas.table import DEFAULT_TABLE_NAME, FULL_TEXT_COLUMN
from tests.conftest import altclip

CAPTIONS = {
    "zh": "猫的绿色眼睛特写",
    "zh-dog": "一只狗在雪地里奔跑",
    "ja": "東京の夜景とネオンサイン",
    "ja-park": "公園で遊んでいる子犬",
    "ko": "고양이가 창가에 앉아 있다",
    "th": "แมวสีส้มนอนอยู่บนโต๊ะ",
    "th-car": "รถยนต์สีแดงจอดอยู่ริมถนน",
    "ar": "صورة قطة سوداء تنام على الأريكة",
    "ar-car": "سيارة حمراء متوقفة في الجبال",
    "hi": "बगीचे में खेलता हुआ एक छोटा कुत्ता",
    "hi-sunset": "पहाड़ों पर सूर्यास्त का दृश्य",
    "en": "a photo of a cat sleeping on the sofa",
    "en-desk": "scattered catalogues on a wooden desk",
}

# A word or a few characters of one caption, and that caption's id.
QUERIES = [
    ("猫", "zh"),  # one character inside an unspaced sentence (the example)
    ("眼睛", "zh"),
    ("绿色眼睛", "zh"),
    ("ネオン", "ja"),  # katakana inside a compound
    ("遊んで", "ja-park"),  # kanji and kana
    ("고양이", "ko"),  # a noun with its particle glued on
    ("แมว", "th"),
    ("قطة", "ar"),
    ("कुत्ता", "hi"),
    ("cat", "en"),  # before "scattered catalogues", which holds "cat" twice inside words
    ("Sofa", "en"),
]


@pytest.fixture(scope="module")
def db(tiny_model, ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fulltext")
    manifest = folder / "captions.parquet"
    pq.write_table(pa.table({"id": list(CAPTIONS), "caption": list(CAPTIONS.values())}), manifest)
    altclip("embed", manifest, "--out", folder / "out", "--model", tiny_model, "--towers", "text",
            "--dtype", "float32")
    load_outputs(str(folder / "out"), str(folder / "db"), DEFAULT_TABLE_NAME)
    return folder / "db"


def _table(db):
    return lancedb.connect(str(db)).open_table(DEFAULT_TABLE_NAME)


def _full_text_ids(db, query: str) -> list[str]:
    """The full-text half of `search --hybrid`, asked of the table's index directly."""
    rows = (_table(db).search(full_text_query(query), query_type="fts").select(["id", "_score"])
            .limit(5).to_list())
    return [row["id"] for row in rows]


def _hybrid(db, query: str):
    return altclip("search", db, "--text", query, "--hybrid", "--against", "text", "--k", "3", "--json")


@pytest.mark.parametrize("query, expected", QUERIES)
def test_full_text_index_finds_the_caption_first(db, query, expected):
    assert _full_text_ids(db, query)[:1] == [expected]


def test_one_character_matches_only_captions_holding_it(db):
    assert _full_text_ids(db, "猫") == ["zh"]
    assert _full_text_ids(db, "狗") == ["zh-dog"]


# Through `altclip search --hybrid`, each a command with its model load: one query per script
# (the index itself is tested on every query above).
HYBRID_QUERIES = [("猫", "zh"), ("ネオン", "ja"), ("고양이", "ko"), ("แมว", "th"), ("قطة", "ar"),
                  ("कुत्ता", "hi"), ("cat", "en")]


@pytest.mark.parametrize("query, expected", HYBRID_QUERIES)
def test_hybrid_search_finds_the_caption(db, query, expected):
    result = _hybrid(db, query)
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert expected in [h["id"] for h in hits]
    assert "warning" not in result.stderr


def test_table_index_rebuilds_a_full_text_index_that_split_on_spaces(db, tmp_path):
    old = tmp_path / "db"
    shutil.copytree(db, old)
    # The index as tables were built before n-grams: LanceDB's default, split on spaces.
    _table(old).create_index(FULL_TEXT_COLUMN, config=FTS(), replace=True)
    assert _full_text_ids(old, "猫") == []
    assert _full_text_ids(old, "cat") == ["en"]  # still answers what it answered before

    result = _hybrid(old, "猫")
    assert f"rebuild it with `altclip table index {old}`" in result.stderr
    assert result.stdout.strip()  # the vector half still answers

    altclip("table", "index", old)
    assert _full_text_ids(old, "猫") == ["zh"]
    assert "warning" not in _hybrid(old, "猫").stderr
