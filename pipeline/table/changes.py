"""Compare a manifest with its table: which rows are new, changed, stale or gone, what work that
leaves for each tower, and the upserted rows assembled from the towers' results and the table."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.table import store as tables
from pipeline.table.sql_text import sql_equals
from schemas.embeddings import (
    CAPTION_SHA256,
    CAPTION_TRUNCATED,
    HEIGHT,
    IMAGE_EMBEDDING,
    IMAGE_ERROR,
    IMAGE_SHA256,
    TEXT_EMBEDDING,
    TEXT_ERROR,
    WIDTH,
)
from schemas.manifest import CAPTION, ID, IMAGE, INLINE_IMAGE

# The columns each tower writes: a row rewritten for one side keeps the other's from the table.
IMAGE_SIDE = (IMAGE_EMBEDDING, WIDTH, HEIGHT, IMAGE_ERROR)
TEXT_SIDE = (TEXT_EMBEDDING, TEXT_ERROR, CAPTION_TRUNCATED)


@dataclass(frozen=True)
class Changes:
    new: pa.Array  # ids not in the table
    image_changed: pa.Array  # ids whose image bytes changed
    caption_changed: pa.Array  # ids whose caption changed
    model_stale: bool  # the table was built with another model: every row is redone
    deleted: pa.Array  # ids in the table, not in the manifest
    unchanged: int
    images_to_embed: pa.Table  # one row per distinct image hash the image tower must run on
    images_reused: int  # rows whose image vector is taken from an identical image in the table
    captions_to_embed: pa.Table  # rows the text tower must run on

    def counts(self) -> dict:
        return {
            "new": len(self.new), "image_changed": len(self.image_changed),
            "caption_changed": len(self.caption_changed), "model_stale": self.model_stale,
            "deleted": len(self.deleted), "unchanged": self.unchanged,
            "images_to_embed": self.images_to_embed.num_rows, "images_reused": self.images_reused,
            "captions_to_embed": self.captions_to_embed.num_rows,
        }

    @property
    def upserted(self) -> pa.Array:
        """Ids whose table row is rewritten."""
        return pc.unique(pa.concat_arrays([self.new, self.image_changed, self.caption_changed]))

    def tower_inputs(self) -> tuple[pa.Table, pa.Table]:
        """The towers' rows: each distinct new image (by its hash) and each new caption."""
        images = self.images_to_embed
        image_input = pa.table({ID: images.column(IMAGE_SHA256), IMAGE: images.column(IMAGE),
                                INLINE_IMAGE: images.column(INLINE_IMAGE),
                                CAPTION: pa.nulls(images.num_rows, pa.string())})
        captions = self.captions_to_embed
        text_input = pa.table({ID: captions.column(ID), IMAGE: pa.nulls(captions.num_rows, pa.string()),
                               INLINE_IMAGE: pa.nulls(captions.num_rows, pa.binary()),
                               CAPTION: captions.column(CAPTION), TEXT_ERROR: captions.column(TEXT_ERROR)})
        return image_input, text_input

    def assemble(self, current: pa.Table, image_results: pa.Table, text_results: pa.Table,
                 reused: dict, old_rows: dict) -> pa.Table:
        """The upserted rows in full: fresh sides from the towers, the rest from the table."""
        by_hash = {r[ID]: r for r in image_results.to_pylist()} if image_results.num_rows else {}
        by_id = {r[ID]: r for r in text_results.to_pylist()} if text_results.num_rows else {}
        image_redo = set(self.new.to_pylist()) | set(self.image_changed.to_pylist())
        text_redo = set(self.new.to_pylist()) | set(self.caption_changed.to_pylist())
        rows = []
        for row in current.filter(pc.is_in(current.column(ID), value_set=self.upserted)).to_pylist():
            if row[ID] in image_redo:
                source = by_hash.get(row[IMAGE_SHA256]) or reused.get(row[IMAGE_SHA256])
                if source is not None:
                    row.update({k: source.get(k) for k in IMAGE_SIDE})
                else:  # the fetch failed: the hash pass has the error
                    row.update({IMAGE_EMBEDDING: None, WIDTH: None, HEIGHT: None})
            else:
                row.update({k: old_rows[row[ID]].get(k) for k in IMAGE_SIDE})
            if row[ID] in text_redo:
                # No result: the text tower did not run (a corpus without captions).
                row.update({k: by_id.get(row[ID], {}).get(k) for k in TEXT_SIDE})
            else:
                row.update({k: old_rows[row[ID]].get(k) for k in TEXT_SIDE})
            row.pop(INLINE_IMAGE, None)
            rows.append(row)
        return pa.Table.from_pylist(rows)


def find_changes(current: pa.Table, stored: pa.Table | None, model_stale: bool,
                 stored_image_hashes: pa.Array) -> Changes:
    """`current`: the manifest's rows with their hashes (id, image, caption, image_sha256,
    caption_sha256); `stored`: the table's (id, image_sha256, caption_sha256), None if no table;
    `stored_image_hashes`: hashes the table holds an image vector for."""
    empty = pa.array([], pa.string())
    if stored is None or model_stale:
        stored = pa.table({ID: empty, IMAGE_SHA256: empty, CAPTION_SHA256: empty})
        stored_image_hashes = empty
    ids = current.column(ID).combine_chunks()
    in_table = pc.is_in(ids, value_set=stored.column(ID).combine_chunks())
    new = ids.filter(pc.invert(in_table))
    joined = current.select([ID, IMAGE_SHA256, CAPTION_SHA256]).join(
        stored.select([ID, IMAGE_SHA256, CAPTION_SHA256]), ID, right_suffix="_stored", join_type="inner"
    )

    def differs(column: str) -> pa.Array:
        a, b = joined.column(column), joined.column(column + "_stored")
        same = pc.fill_null(pc.equal(a, b), False)
        both_null = pc.and_(pc.is_null(a), pc.is_null(b))
        return joined.column(ID).filter(pc.invert(pc.or_(same, both_null))).combine_chunks()

    image_changed, caption_changed = differs(IMAGE_SHA256), differs(CAPTION_SHA256)
    deleted = stored.column(ID).combine_chunks().filter(
        pc.invert(pc.is_in(stored.column(ID).combine_chunks(), value_set=ids)))

    needs_image = current.filter(pc.is_in(current.column(ID), value_set=pa.concat_arrays([new, image_changed])))
    hashed = needs_image.filter(pc.is_valid(needs_image.column(IMAGE_SHA256)))
    reusable = pc.is_in(hashed.column(IMAGE_SHA256), value_set=stored_image_hashes)
    fresh = hashed.filter(pc.invert(reusable))
    # One tower run per distinct image content, within this run too.
    first = pc.index_in(pc.unique(fresh.column(IMAGE_SHA256)), value_set=fresh.column(IMAGE_SHA256))
    images_to_embed = fresh.take(first) if fresh.num_rows else fresh
    captions_to_embed = current.filter(
        pc.is_in(current.column(ID), value_set=pa.concat_arrays([new, caption_changed])))
    changed = len(pc.unique(pa.concat_arrays([new, image_changed, caption_changed])))
    return Changes(
        new=new, image_changed=image_changed, caption_changed=caption_changed,
        model_stale=model_stale, deleted=deleted, unchanged=current.num_rows - changed,
        images_to_embed=images_to_embed,
        images_reused=int(pc.sum(reusable).as_py() or 0),
        captions_to_embed=captions_to_embed,
    )


def stored_state(table) -> tuple[pa.Table, pa.Array]:
    """(id, hashes) of every row, and the image hashes the table holds a vector for."""
    state = tables.read_columns(table, [ID, IMAGE_SHA256, CAPTION_SHA256])
    with_vectors = tables.read_columns(table, [IMAGE_SHA256], f"{IMAGE_EMBEDDING} IS NOT NULL")
    return state, pc.unique(with_vectors.column(IMAGE_SHA256).combine_chunks().drop_null())


def kept_from_table(table, current: pa.Table, changes: Changes) -> tuple[dict, dict]:
    """What the upserted rows take from the table: image vectors it already holds for the same
    bytes (by hash), and each row's unchanged side."""
    reused, old_rows = {}, {}
    wanted = pc.unique(pa.concat_arrays([changes.new, changes.image_changed]))
    hashes = current.filter(pc.is_in(current.column(ID), value_set=wanted)).column(IMAGE_SHA256)
    hashes = pc.unique(hashes.combine_chunks().drop_null()).to_pylist()
    if hashes:
        where = f"{IMAGE_EMBEDDING} IS NOT NULL AND {sql_equals(IMAGE_SHA256, hashes)}"
        for r in tables.read_columns(table, [IMAGE_SHA256, *IMAGE_SIDE], where).to_pylist():
            reused.setdefault(r[IMAGE_SHA256], r)
    where = sql_equals(ID, changes.upserted.to_pylist())
    old_rows = {r[ID]: r for r in tables.read_columns(table, [ID, *IMAGE_SIDE, *TEXT_SIDE], where).to_pylist()}
    return reused, old_rows
