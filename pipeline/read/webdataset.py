"""WebDataset shards: tar members grouped into samples by key, read as manifest rows whose image
is named by a URI that opens it again."""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource

from pipeline.read.partitions import FileSlices
from schemas.manifest import ID, IMAGE_BYTES, INLINE_IMAGE_URI, PARTITION

# img2dataset's layout: per key an image, a `.txt` caption, a `.json` of metadata.
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # the first a sample has is its image
CAPTION_SUFFIX = "txt"
METADATA_SUFFIX = "json"
# Samples per block a read task yields (Ray's own WebDataset reader yields as many).
SAMPLES_PER_BLOCK = 512

# WebDataset's (and Ray's) split of a member name: the key is the path up to the first dot of
# the file name, the suffix the rest. Names without one (`README`, `.hidden`) are no sample's.
_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_name(name: str) -> tuple[str | None, str | None]:
    """A member's sample key and suffix (lower case), or (None, None)."""
    match = _KEY_AND_SUFFIX.match(name)
    return (match.group(1), match.group(2).lower()) if match else (None, None)


def member_uri(shard: str, member: str) -> str | None:
    """The URI of a member of a shard, in fsspec's form: `tar://MEMBER::SHARD` (fsspec opens it
    as it is; so does fetch.read_bytes, where the job's policy lets it read local paths). None for
    a name that cannot be chained (`::` in it)."""
    if "::" in member or "::" in shard:
        return None
    return f"tar://{member}::{shard}"


@dataclass
class Sample:
    """One key's members: suffix -> (member name, data; None where only the name was read)."""

    key: str
    files: dict[str, tuple[str, bytes | None]] = field(default_factory=dict)

    def first(self, *suffixes: str) -> tuple[str, bytes | None] | None:
        return next((self.files[s] for s in suffixes if s in self.files), None)


def group_samples(members: Iterable[tuple[str, bytes | None]],
                  scattered: frozenset[str] = frozenset()) -> Iterator[Sample]:
    """Members (name, data), in tar order -> samples, in the order their keys first appear.

    WebDataset keeps a sample's members adjacent. The keys in `scattered` (whose members are not,
    as index_shard finds) are held to the end of the shard and yielded whole there. Of two
    members with the same name the later wins, as `tar -x` and a `tar://` URI have it.
    """
    current, held = None, {}
    for name, data in members:
        key, suffix = split_name(name)
        if key is None:
            continue
        if key in scattered:
            held.setdefault(key, Sample(key)).files[suffix] = (name, data)
            continue
        if current is None or current.key != key:
            if current is not None:
                yield current
            current = Sample(key)
        current.files[suffix] = (name, data)
    if current is not None:
        yield current
    yield from held.values()


@dataclass(frozen=True)
class ShardIndex:
    """A shard's samples in reading order (members' data only for the suffixes asked for), and
    the keys whose members are not adjacent."""

    samples: list[Sample]
    scattered: frozenset[str]


def index_shard(f, read: tuple[str, ...] = ()) -> ShardIndex:
    """Read a shard's member headers (and the data of members with a suffix in `read`)."""
    members = []
    with tarfile.open(fileobj=f, mode="r:*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            wanted = split_name(info.name)[1] in read
            members.append((info.name, tar.extractfile(info).read() if wanted else None))
    seen, last, scattered = set(), None, set()
    for name, _ in members:
        key = split_name(name)[0]
        if key is None or key == last:
            continue
        if key in seen:
            scattered.add(key)
        seen.add(key)
        last = key
    scattered = frozenset(scattered)
    return ShardIndex(list(group_samples(members, scattered)), scattered)


def sample_table(samples: list[Sample], shard: str) -> pa.Table:
    """Samples as rows: key, image bytes and the URI of their member, and the caption and
    metadata members' bytes (formats.flatten_webdataset makes columns of those)."""
    images = [s.first(*IMAGE_SUFFIXES) for s in samples]

    def data(suffix: str) -> pa.Array:
        return pa.array([(s.first(suffix) or (None, None))[1] for s in samples], pa.binary())

    return pa.table({
        ID: pa.array([s.key for s in samples], pa.string()),
        IMAGE_BYTES: pa.array([i and i[1] for i in images], pa.binary()),
        INLINE_IMAGE_URI: pa.array([i and member_uri(shard, i[0]) for i in images], pa.string()),
        CAPTION_SUFFIX: data(CAPTION_SUFFIX),
        METADATA_SUFFIX: data(METADATA_SUFFIX),
    })


class WebDatasetShardsDatasource(FileBasedDatasource):
    """Ray Data source: each shard streamed once, its samples as rows (sample_table), less the
    ones its slices leave out. Ray's own WebDataset reader fails the whole job on a shard whose
    keys are not adjacent and gives no row its member's name."""

    _FILE_EXTENSIONS = ["tar"]

    def __init__(self, paths: list[str], file_slices: dict[str, FileSlices], **file_based_kwargs):
        super().__init__(paths, **file_based_kwargs)
        # Read tasks serialize the source: the slices (a set of positions per shard) travel once.
        self._slices_ref = ray.put(file_slices)

    def _read_stream(self, stream, path: str) -> Iterator[pa.Table]:
        slices = ray.get(self._slices_ref)[path]
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            members = ((info.name, tar.extractfile(info).read()) for info in tar if info.isreg())
            block = []
            for position, sample in enumerate(group_samples(members, slices.scattered)):
                if position in slices.skipped:
                    continue
                block.append(sample)
                if len(block) == SAMPLES_PER_BLOCK:
                    yield _tagged(sample_table(block, slices.uri), slices.key)
                    block = []
            if block:
                yield _tagged(sample_table(block, slices.uri), slices.key)


def _tagged(table: pa.Table, key: str) -> pa.Table:
    return table.append_column(PARTITION, pa.array([key] * table.num_rows, pa.string()))
