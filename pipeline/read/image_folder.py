"""A folder of image files as a manifest, as clip-retrieval's `--input_format files` takes one:
a row per image, its id its path under the folder, its caption the text of the same-named
`.txt` beside it where there is one.

The listing is written as a Parquet manifest (into OUT, or a temporary folder where a run
writes nothing), so that the run reads, partitions, resumes and re-embeds it as it does any
Parquet manifest: a rerun over the same files writes the same listing and resumes; files added
or removed make a new listing, whose partitions are embedded again."""

from __future__ import annotations

import atexit
import hashlib
import posixpath
import shutil
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from schemas.manifest import CAPTION, CAPTION_FILE_SUFFIX, ID, IMAGE, IMAGE_FILE_SUFFIXES

# Rows per row group of a listing: partitions are whole row groups (see partitions.file_partitions).
LISTING_ROW_GROUP_ROWS = 1000


def is_image_file(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_FILE_SUFFIXES


class ImageNames:
    """What the files of manifest formats beside `images` may be named and still describe them
    rather than be a manifest: a sidecar of one image (KEY.json beside KEY.jpg), or a shard's
    metadata beside the folder of its images (NNNNN.parquet and NNNNN_stats.json beside NNNNN/),
    as img2dataset's `files` output has them. Sets, so that a million sidecars are looked up, not
    compared with a million images each."""

    def __init__(self, images: list[str]):
        self.stems = {posixpath.splitext(image)[0] for image in images}
        self.folders = {folder for image in images for folder in _folders_of(image)}

    def describe(self, path: str) -> bool:
        stem = posixpath.splitext(path)[0]
        if stem in self.stems:
            return True
        # Only a shard's (digits) name: a manifest `images.parquet` beside `images/` is a manifest.
        shard = stem[: -len("_stats")] if stem.endswith("_stats") else stem
        return posixpath.basename(shard).isdigit() and shard in self.folders


def _folders_of(path: str):
    """Every folder above `path`."""
    folder = posixpath.dirname(path)
    while folder and folder not in ("/", "."):
        yield folder
        folder = posixpath.dirname(folder)


def listing_table(fs, images: list[str], others: set[str], root: str) -> pa.Table:
    """The rows of `images` (paths inside `fs`, under `root`): id and image their path under
    `root`, caption the bytes of the same-named `.txt` among `others`, as read (a caption that
    is not UTF-8 is its row's error, as in any manifest) less surrounding whitespace."""
    images = sorted(images)
    relative = [posixpath.relpath(p, root) if root else p for p in images]
    texts = {p: posixpath.splitext(p)[0] + CAPTION_FILE_SUFFIX for p in images}
    wanted = sorted({t for t in texts.values() if t in others})
    columns = {ID: pa.array(relative, pa.string()), IMAGE: pa.array(relative, pa.string())}
    if wanted:
        found = fs.cat(wanted)  # fetched concurrently from object stores
        captions = [found[texts[p]].strip() if texts[p] in found else None for p in images]
        columns[CAPTION] = pa.array(captions, pa.binary())
    return pa.table(columns)


def write_listing(table: pa.Table, folder_uri: str, dest: str | None, storage_options: dict) -> str:
    """Write the listing of `folder_uri` into `dest` (none: a temporary folder of this process);
    returns its URI. Its name is the folder's: an OUT given to several folders holds each one's."""
    if not dest:
        dest = tempfile.mkdtemp(prefix="altclip-images-")
        atexit.register(shutil.rmtree, dest, ignore_errors=True)
    name = f"_images-{hashlib.sha1(folder_uri.rstrip('/').encode()).hexdigest()[:12]}.parquet"
    fs, path = storage.filesystem(dest, storage_options)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path.rstrip('/')}/{name}", "wb") as f:
        pq.write_table(table, f, row_group_size=LISTING_ROW_GROUP_ROWS)
    return f"{dest.rstrip('/')}/{name}"
