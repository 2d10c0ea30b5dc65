"""The table's indexes: full-text on captions, ANN per vector column (built by Ray tasks on Ray)."""

from __future__ import annotations

import os

import pyarrow as pa

from pipeline.table.bulk_load import on_ray
from schemas.embeddings import VECTOR_COLUMNS
from schemas.table import ANN_INDEX_MIN_ROWS, FULL_TEXT_COLUMN, FULL_TEXT_NGRAM_LENGTHS, ROWS_PER_PARTITION

# See index_table: an ANN index takes rows added after it was built as segments of their own,
# until they are this share of the rows it was trained on, or this many segments were added.
RETRAIN_SHARE = 0.2
MAX_ADDED_SEGMENTS = 7
# On Ray, an ANN index over more rows than this is built as segments of about this many rows
# each (fewer on small nodes: see segment_rows), one Ray task per segment (see
# _index_on_workers): 585 per column at LAION-5B's 5.85e9.
ROWS_PER_INDEX_SEGMENT = 10_000_000
# What building an IVF_HNSW_SQ segment holds (lance 14, measured: 1.3x the float32 vectors at
# 768-d, 1.1x at 64-d, and a few hundred MiB besides): a segment task asks Ray for this much
# memory, and a segment holds at most what half of the largest node's memory builds.
INDEX_BYTES_PER_VALUE = 6
INDEX_TASK_BASE_BYTES = 512 * 2**20

# How captions are cut for the full-text index, in lance's names. The grams span spaces; the one
# stop word is the space alone, which every spaced caption holds (a query between spaces, see
# full_text_query, would otherwise match them all). Stemming and the language's stop words are
# rules for whole words, not grams.
FULL_TEXT_PARAMS = {"base_tokenizer": "ngram", "min_ngram_length": FULL_TEXT_NGRAM_LENGTHS[0],
                    "max_ngram_length": FULL_TEXT_NGRAM_LENGTHS[1], "stem": False,
                    "remove_stop_words": True, "custom_stop_words": [" "]}
# A full-text build keeps postings in memory up to about this many MiB, then writes them out
# as one more shard of the segment and goes on (lance's `memory_limit`; its default is 2 GiB
# for each of the machine's cores). Measured over 5 million captions on one core, the build
# held 1,474 MiB at 1,024 and 852 MiB at 512: on Ray each segment's task asks for 1.25x the
# limit and INDEX_TASK_BASE_BYTES.
FULL_TEXT_BUILD_MIB = 1024
FULL_TEXT_TASK_BYTES = INDEX_TASK_BASE_BYTES + FULL_TEXT_BUILD_MIB * 2**20 * 5 // 4
FULL_TEXT_INDEX = f"{FULL_TEXT_COLUMN}_idx"


def full_text_index(table):
    """The table's full-text index on captions, or None."""
    for index in table.list_indices():
        if index.index_type == "FTS" and list(index.columns) == [FULL_TEXT_COLUMN]:
            return index
    return None


def full_text_index_is_current(index) -> bool:
    """Whether a full-text index cuts captions the way `index_table` does today (tables indexed
    before n-grams split on spaces: a Chinese or Japanese query matched nothing)."""
    return all(index.index_details.get(key) == value for key, value in FULL_TEXT_PARAMS.items())


def full_text_query(text: str) -> str:
    """The text a full-text search asks the index for: the query between spaces.

    A word standing alone in a caption has grams at its edges (" ca", "at ") that the same
    letters inside a longer word lack, so asking for them ranks "a photo of a cat" above
    "scattered catalogues" for `cat` (on 10,000 synthetic captions, the share of captions with
    the whole word in an English word's top 10 went from 0.80 to 1.00, at about the same speed); text
    without spaces (猫 in 猫的绿色眼睛特写) still matches by its inner grams.
    """
    return f" {text} "


def index_table(table, rows_per_partition: int = ROWS_PER_PARTITION, retrain: bool = False) -> dict:
    """Full-text index on captions; an ANN index per vector column once exact search gets slow.

    Captions are indexed as character n-grams (see FULL_TEXT_PARAMS); a table indexed another
    way (an older whitespace-split index) gets a new index.
    Below ANN_INDEX_MIN_ROWS vectors a search compares every row: exact, and fast at that size.
    Above it, IVF partitions of about 4,096 vectors each (sqrt-like growth keeps both the
    partition scan and the centroid search small), HNSW inside each partition, cosine.

    Where the caller runs on Ray (`embed --db`, `reembed`, a job on a cluster) every index is
    built, and every vector counted, in Ray tasks, so that the driver's memory does not grow
    with the table (an ANN build holds about 1.3x the vectors it indexes; a full-text build in
    one process grew 1.6 GiB at 5 million captions). Each index is built as segments over groups
    of fragments, a task each, committed by the driver as one index: the ANN index trained once
    (see _index_on_workers), the full-text index over ROWS_PER_INDEX_SEGMENT captions a segment
    (see _full_text_on_workers). Elsewhere, in this process.

    Rows a load or reembed added since an index was built go into it as they are: a new segment
    (over the partitions it trained, for the ANN index), which takes seconds where training
    takes minutes at scale. Once those rows pass RETRAIN_SHARE of the trained ones, or
    MAX_ADDED_SEGMENTS segments were added, or with `retrain`, the ANN index is built again from
    all the vectors.
    """
    fts = full_text_index(table)
    if fts is not None and full_text_index_is_current(fts) and not retrain:
        _add_to_index(table, fts.name)
    elif on_ray():
        _full_text_on_workers(table)
    else:
        _full_text_segment(table.to_lance(), None)
        table.checkout_latest()  # the index was made through another handle
    built = {}
    counts = _where_the_index_is_built(_vector_counts, table.to_lance())
    for column in VECTOR_COLUMNS:
        vectors = counts[column]
        if vectors < ANN_INDEX_MIN_ROWS:
            continue
        segments = None if retrain else _ann_segments(table, column)
        if segments and segments["added"] <= RETRAIN_SHARE * segments["trained"] \
                and segments["added_segments"] < MAX_ADDED_SEGMENTS:
            _add_to_index(table, segments["name"])
            built[column] = {"vectors": vectors, "partitions": segments["partitions"],
                             "added": segments["added"]}
            continue
        partitions = max(1, min(4096, vectors // rows_per_partition))
        if on_ray():
            segments = _index_on_workers(table, column, partitions)
        else:
            segments = 1
            table.create_index(metric="cosine", vector_column_name=column, index_type="IVF_HNSW_SQ",
                               num_partitions=partitions, replace=True)
        built[column] = {"vectors": vectors, "partitions": partitions, "segments": segments}
    return built


def _where_the_index_is_built(function, dataset, *args):
    """`function(dataset, *args)` in a Ray task on Ray (what it reads never reaches the driver),
    in this process elsewhere."""
    if not on_ray():
        return function(dataset, *args)
    import ray

    return ray.get(ray.remote(function).options(num_cpus=1).remote(dataset, *args))


def _vector_counts(dataset) -> dict[str, int]:
    """Rows with a vector, per vector column (lance reads the column to see its nulls: 600 MiB
    held at 5 million 64-d rows, measured)."""
    return {column: dataset.count_rows(f"{column} IS NOT NULL") for column in VECTOR_COLUMNS}


def segment_rows(dim: int, node_memory: int) -> int:
    """Rows per index segment: ROWS_PER_INDEX_SEGMENT, or fewer where building that many
    `dim`-d vectors would take more than half of `node_memory` bytes (0: not known)."""
    if node_memory <= 0:
        return ROWS_PER_INDEX_SEGMENT
    fit = (node_memory // 2 - INDEX_TASK_BASE_BYTES) // (dim * INDEX_BYTES_PER_VALUE)
    return max(1, min(ROWS_PER_INDEX_SEGMENT, fit))  # a fragment is never split: a segment holds one at least


def _largest_node_memory() -> int:
    """The `memory` resource of the cluster's largest live node, in bytes."""
    import ray

    return int(max(node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]))


def _fragment_rows(dataset) -> dict[int, int]:
    """Rows by fragment id, in the dataset's order, from the fragments' metadata: no row is read."""
    return {f.fragment_id: f.metadata.num_rows for f in dataset.get_fragments()}


def _fragment_groups(fragment_rows: dict[int, int], rows_per_group: int) -> list[list[int]]:
    """Fragment ids (rows by id, in the dataset's order) in runs of about `rows_per_group` rows:
    a fragment is never split."""
    groups, rows = [[]], 0
    for fragment_id, rows_in_fragment in fragment_rows.items():
        if rows >= rows_per_group:
            groups.append([])
            rows = 0
        groups[-1].append(fragment_id)
        rows += rows_in_fragment
    return [g for g in groups if g]


def _index_on_workers(table, column: str, partitions: int) -> int:
    """The ANN index on `column` as one segment per group of fragments (see segment_rows), each
    built by a Ray task where it runs, over IVF centroids trained once (a Ray task too: lance
    trains on a sample of the vectors, 256 per partition); the driver commits the segments'
    metadata in one commit, as one index that a search reads whole. The segments are not
    merged: lance's merge rebuilds every partition, which costs as much as building the index
    in one process. Returns the segments built."""
    import ray

    dataset = table.to_lance()  # pickles as its URI, version and storage options
    name = f"{column}_idx"
    dim, largest = table.schema.field(column).type.list_size, _largest_node_memory()
    fragment_rows = _fragment_rows(dataset)
    groups = _fragment_groups(fragment_rows, segment_rows(dim, largest))
    train = ray.remote(_train_centroids).options(num_cpus=1)
    centroids = train.remote(dataset, column, partitions)
    build = ray.remote(_index_segment)

    def memory(group: list[int]) -> int:  # never more than a node has: that task would wait for ever
        needed = INDEX_TASK_BASE_BYTES + sum(fragment_rows[f] for f in group) * dim * INDEX_BYTES_PER_VALUE
        return min(largest, needed)

    segments = ray.get([build.options(num_cpus=1, memory=memory(group))
                        .remote(dataset, column, name, partitions, centroids, group) for group in groups])
    dataset.commit_existing_index_segments(name, column, segments)
    table.checkout_latest()  # the commit was made through another handle
    return len(segments)


def _train_centroids(dataset, column: str, partitions: int) -> pa.FixedSizeListArray:
    from lance.indices import IndicesBuilder

    return IndicesBuilder(dataset, column).train_ivf(partitions, distance_type="cosine").centroids


def _index_segment(dataset, column: str, name: str, partitions: int, centroids, fragment_ids: list[int]):
    """One segment of the index: the vectors of `fragment_ids`, written under the table's
    _indices/, not yet part of it (the driver commits it)."""
    return dataset.create_index_uncommitted(
        column, "IVF_HNSW_SQ", name=name, metric="cosine", num_partitions=partitions,
        ivf_centroids=centroids, fragment_ids=fragment_ids, replace=True)


def _ann_segments(table, column: str) -> dict | None:
    """The ANN index on `column` as segments: the rows it was trained on (those of the segments
    its build made, all of one table version), the segments and rows added since (later segments
    and rows in none), and its partitions. Rows are counted as lance counts unindexed ones: every
    row of a fragment, with a vector or without."""
    # Statistics without each segment's centroids (up to 4,096 x dim floats each).
    os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")
    dataset = table.to_lance()
    for index in table.list_indices():
        if list(index.columns) == [column] and index.index_type != "FTS":
            fragment_rows = _fragment_rows(dataset)
            segments = [(i["version"], sum(fragment_rows.get(f, 0) for f in i["fragment_ids"]))
                        for i in dataset.list_indices() if i["name"] == index.name]
            first = min(version for version, _ in segments)
            stats = dataset.stats.index_stats(index.name)
            return {"name": index.name, "trained": sum(n for v, n in segments if v == first),
                    "added_segments": sum(1 for v, _ in segments if v != first),
                    "added": sum(n for v, n in segments if v != first) + stats["num_unindexed_rows"],
                    "partitions": stats["segments"][0]["num_partitions"]}
    return None


def _add_to_index(table, name: str) -> None:
    """The rows an index lacks, indexed as a segment of their own (in a Ray task on Ray)."""
    _where_the_index_is_built(_index_added_rows, table.to_lance(), name)
    table.checkout_latest()  # the change was made through another handle


def _index_added_rows(dataset, name: str) -> None:
    # num_indices_to_merge=0: merging segments rebuilds every partition, and left an IVF index
    # of one partition.
    dataset.optimize.optimize_indices(index_names=[name], num_indices_to_merge=0)


def _full_text_on_workers(table) -> None:
    """The full-text index as one segment per ROWS_PER_INDEX_SEGMENT captions (whole fragments),
    each built by a Ray task, committed by the driver as one index (a search reads every
    segment, with the whole table's term statistics: its scores equal a one-segment index's)."""
    import ray

    dataset = table.to_lance()
    fragment_rows = _fragment_rows(dataset)
    groups = _fragment_groups(fragment_rows, ROWS_PER_INDEX_SEGMENT)
    if not groups:  # an empty table: an empty index, built here, holds nothing
        _full_text_segment(dataset, None)
        table.checkout_latest()
        return
    build = ray.remote(_full_text_segment).options(
        num_cpus=1, memory=min(FULL_TEXT_TASK_BYTES, _largest_node_memory()))
    segments = ray.get([build.remote(dataset, group) for group in groups])
    dataset.commit_existing_index_segments(FULL_TEXT_INDEX, FULL_TEXT_COLUMN, segments)
    table.checkout_latest()  # the commit was made through another handle


def _full_text_segment(dataset, fragment_ids: list[int] | None):
    """The full-text index over `fragment_ids`: a segment, written under the table's _indices/
    and not yet part of it (the driver commits it), by one core in FULL_TEXT_BUILD_MIB;
    None: the whole index, committed, built by every core of this machine."""
    if fragment_ids is None:
        return dataset.create_scalar_index(FULL_TEXT_COLUMN, "INVERTED", name=FULL_TEXT_INDEX,
                                           replace=True, **FULL_TEXT_PARAMS)
    return dataset.create_index_uncommitted(
        FULL_TEXT_COLUMN, "INVERTED", name=FULL_TEXT_INDEX, replace=True, fragment_ids=fragment_ids,
        num_workers=1, memory_limit=FULL_TEXT_BUILD_MIB, **FULL_TEXT_PARAMS)
