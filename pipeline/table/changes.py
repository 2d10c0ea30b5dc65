"""Compare a manifest with its table: which rows are new, changed, stale or gone, and what work
that leaves for each tower."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from schemas.embeddings import CAPTION_SHA256, IMAGE_SHA256
from schemas.manifest import ID


@dataclass(frozen=True)
class ChangePlan:
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


def plan_changes(current: pa.Table, stored: pa.Table | None, model_stale: bool,
                 stored_image_hashes: pa.Array) -> ChangePlan:
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
    return ChangePlan(
        new=new, image_changed=image_changed, caption_changed=caption_changed,
        model_stale=model_stale, deleted=deleted, unchanged=current.num_rows - changed,
        images_to_embed=images_to_embed,
        images_reused=int(pc.sum(reusable).as_py() or 0),
        captions_to_embed=captions_to_embed,
    )
