"""One typed config per job, checked before any work starts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from schemas.embeddings import DEFAULT_VECTOR_DTYPE, ERROR_KINDS, VECTOR_VALUE_TYPES
from schemas.table import DEFAULT_TABLE_NAME, SEARCH_COLUMNS

# Rows of a manifest partition at most, by default: what a killed run redoes is the partitions
# it had in flight, about one per file being read; the driver holds a record of 1-3 KB per
# partition: 58,500 records for LAION-5B's 5.85e9 rows.
PARTITION_ROWS = 100_000

# Rows `embed --plan` times by default (pipeline/run/estimate.py). Stage costs vary with the rows
# (a web photo's decode time spans a factor of ten with its size): over 200 rows the mean's
# standard error is about 6% for a spread of 0.8 times the mean, a small part of the 25% the
# projection is held to; 200 rows are four batches of 64 through each tower, and a few seconds
# of decoding on one core.
DEFAULT_SAMPLE_ROWS = 200

DEFAULT_MODEL = "BAAI/AltCLIP"
TOWERS = ("image", "text")
DTYPES = ("auto", "float32", "bfloat16", "float16")
VECTOR_DTYPES = tuple(VECTOR_VALUE_TYPES)  # float32, float16
DEFAULT_TEMPLATE = "a photo of a {}"  # CLIP's zero-shot prompt
PROGRESS_MODES = ("auto", "text", "json", "quiet")
PREPROCESS_MODES = ("exact", "fast")


class ConfigError(ValueError):
    """Bad configuration: raised before any work, with a message that says what to change.

    A message speaks of values, and of settings by the names a caller of the library passes:
    the config field or argument, marked with `named`. Printed, each reads `vector_dtype`; the
    CLI shows each as the flag that sets it instead (jobs/options.run_job)."""

    def __str__(self) -> str:
        return self.naming_settings(lambda setting: f"`{setting}`")

    def naming_settings(self, spell) -> str:
        """The message, each setting it names written as `spell(setting)`."""
        return _NAMED.sub(lambda match: spell(match.group(1)), str(self.args[0]) if self.args else "")


# A setting inside a message: marked with a character no value a user gives holds, so that a
# value quoting a column (`caption` in a filter) is never taken for one.
_MARK = "\x1f"
_NAMED = re.compile(f"{_MARK}([a-z_][a-z0-9_]*){_MARK}")


def named(setting: str) -> str:
    """`setting` (a config field or argument: "vector_dtype") as a ConfigError message names it."""
    return f"{_MARK}{setting}{_MARK}"


def check_table_name(name: str) -> None:
    """LanceDB's rule for table names; a path or URI here is a database given as a table."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
        raise ConfigError(f"{named('table_name')} {name}: a table name is letters, digits, _, - and . "
                          f"(the database folder or URI is given as {named('db')})")


@dataclass(frozen=True)
class EmbedConfig:
    manifest: str
    out: str
    model: str = DEFAULT_MODEL
    db: str | None = None  # also load the rows into a table of this LanceDB database
    table_name: str = DEFAULT_TABLE_NAME
    towers: tuple[str, ...] = TOWERS
    id_col: str = "id"
    image_col: str | None = None  # None: "image" or "image_bytes", whichever the manifest has
    caption_col: str | None = None  # None: "caption" when the manifest has it
    batch_size: int = 64
    dtype: str = "auto"  # what the towers compute in
    vector_dtype: str = DEFAULT_VECTOR_DTYPE  # what the vectors are stored as: float32 | float16
    # Actors per tower: N, or (MIN, MAX) for a pool Ray Data grows and shrinks with the work;
    # None: one per GPU, or one on CPU.
    concurrency: int | tuple[int, int] | None = None
    num_gpus: float | None = None  # per actor; None: share one GPU between the towers if any
    rows_per_shard: int = 10_000
    # Rows of a partition, the unit of resume, at most (see pipeline.read.partitions).
    partition_rows: int = PARTITION_ROWS
    storage_options: dict = field(default_factory=dict)
    address: str | None = None  # Ray cluster address; None: RAY_ADDRESS or an in-process Ray
    verbose: bool = False  # also Ray's, Ray Data's and Lance's own log lines
    overwrite: bool = False  # replace what OUT holds instead of resuming it
    allow_local_paths: bool = False  # local image paths in a manifest from object storage
    allow_private_urls: bool = False  # image URLs on loopback, link-local or private addresses
    preprocess: str = "exact"  # exact: the reference's pixels bit for bit | fast: JPEG draft decode
    compile: bool = False  # torch.compile the image tower in each actor before its first batch
    progress: str = "auto"  # auto (bars on a terminal, else text lines) | text | json | quiet
    progress_interval_s: float = 10.0
    # Seconds an unreachable store is waited out before the job stops (rerun to resume).
    storage_patience_s: float = 300.0
    # Wall-clock seconds per attempt at an image URL (None: pipeline.decode.http_get.HTTP_TIMEOUT_S).
    fetch_timeout_s: float | None = None
    # What image fetches call themselves (None: pipeline.decode.http_get.USER_AGENT), and the X-Robots-Tag
    # directives that opt an image out (None: pipeline.decode.http_get.DISALLOWED_DIRECTIVES; () none do).
    user_agent: str | None = None
    disallowed_header_directives: tuple[str, ...] | None = None
    # Seconds one image may take to decode (None: pipeline.decode.isolation.ROW_TIMEOUT_S).
    decode_timeout_s: float | None = None
    # Not empty: embed again only the rows of OUT whose error is of these kinds, in place.
    retry_kinds: tuple[str, ...] = ()

    def __post_init__(self):
        check_table_name(self.table_name)
        unknown = [t for t in self.towers if t not in TOWERS]
        if unknown or not self.towers:
            raise ConfigError(
                f"{named('towers')} {','.join(self.towers) or '(empty)'}: choose one or both of image,text"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"{named('dtype')} {self.dtype}: choose one of {', '.join(DTYPES)}")
        if self.vector_dtype not in VECTOR_DTYPES:
            raise ConfigError(f"{named('vector_dtype')} {self.vector_dtype}: choose one of "
                              f"{', '.join(VECTOR_DTYPES)}")
        if self.batch_size < 1:
            raise ConfigError(f"{named('batch_size')} {self.batch_size}: must be at least 1")
        sizes = (self.concurrency if isinstance(self.concurrency, tuple)
                 else () if self.concurrency is None else (self.concurrency,))
        if any(n < 1 for n in sizes) or (len(sizes) == 2 and sizes[0] > sizes[1]):
            raise ConfigError(f"{named('concurrency')} {self.concurrency}: N, or MIN,MAX with 1 <= MIN <= MAX")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ConfigError(f"{named('num_gpus')} {self.num_gpus}: must be 0 or more")
        if self.preprocess not in PREPROCESS_MODES:
            raise ConfigError(f"{named('preprocess')} {self.preprocess}: choose exact or fast")
        if self.progress not in PROGRESS_MODES:
            raise ConfigError(f"{named('progress')} {self.progress}: choose one of {', '.join(PROGRESS_MODES)}")
        if self.rows_per_shard < 1:
            raise ConfigError(f"{named('rows_per_shard')} {self.rows_per_shard}: must be at least 1")
        if self.partition_rows < 1:
            raise ConfigError(f"{named('partition_rows')} {self.partition_rows}: must be at least 1")
        for setting in ("fetch_timeout_s", "decode_timeout_s"):
            seconds = getattr(self, setting)
            if seconds is not None and not seconds > 0:
                raise ConfigError(f"{named(setting)} {seconds}: seconds, more than 0")
        if self.storage_patience_s < 0:
            raise ConfigError(f"{named('storage_patience_s')} {self.storage_patience_s}: seconds, 0 or more")
        for kind in self.retry_kinds:
            if kind not in ERROR_KINDS:
                raise ConfigError(f"{named('retry_kinds')} {kind}: choose among {', '.join(ERROR_KINDS)}")


@dataclass(frozen=True)
class LoadConfig:
    outputs: str
    db: str
    table_name: str = DEFAULT_TABLE_NAME
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self):
        check_table_name(self.table_name)


@dataclass(frozen=True)
class SearchConfig:
    db: str
    text: str | None = None
    image: str | None = None
    vector: str | None = None  # a .npy or JSON file holding the query vector
    hybrid: bool = False  # text query: vector search + full-text search on captions, fused
    against: str | None = None  # "image" or "text"; None: the other modality for text, image for images
    k: int = 10
    where: str | None = None
    model: str | None = None  # None: the model the table was built with
    table_name: str = DEFAULT_TABLE_NAME
    storage_options: dict = field(default_factory=dict)
    nprobes: int | None = None  # ANN index partitions searched; None: schemas.table's default
    refine_factor: int | None = None  # candidates re-ranked exactly per hit; None: the default

    def __post_init__(self):
        check_table_name(self.table_name)
        for option, value in (("nprobes", self.nprobes), ("refine_factor", self.refine_factor)):
            if value is not None and value < 1:
                raise ConfigError(f"{named(option)} {value}: must be at least 1")
        if sum(q is not None for q in (self.text, self.image, self.vector)) != 1:
            raise ConfigError(f"give exactly one query: {named('text')}, {named('image')} or {named('vector')}")
        if self.hybrid and self.text is None:
            raise ConfigError(f"{named('hybrid')} combines a vector and a full-text search: it needs {named('text')}")
        if self.against not in (None, "image", "text"):
            raise ConfigError(f"{named('against')} {self.against}: choose image or text")
        if self.k < 1:
            raise ConfigError(f"{named('k')} {self.k}: must be at least 1")


@dataclass(frozen=True)
class ReembedConfig:
    """`reembed`: bring a table up to date with its manifest, embedding only what changed."""

    embed: EmbedConfig  # manifest, model, towers, columns, resources; `out` may be empty
    prune: bool = False  # delete table rows whose id left the manifest
    dry_run: bool = False


# Cosine at or above which a row duplicates a kept row. Not measured here: the real weights are
# never available, and the tests' tiny random-weight model puts different pictures as close as
# 0.990 (JPEG re-encodes and half-size copies of a picture 0.9994 and up, 70% crops 0.987 to
# 0.997: tests/test_dedup.py), which says nothing about CLIP's space. Taken from practice with
# CLIP image vectors (AltCLIP's image tower is CLIP's ViT-L/14): clip-retrieval's search back
# end, which serves LAION's ViT-L/14 indexes, drops results at cosine >= 0.94 to each other as
# duplicates (`get_non_uniques`); SemDeDup-style pipelines go down to 0.93 (NeMo Curator's
# example eps 0.07) for semantic duplicates, a looser notion than one picture re-encoded,
# resized or cropped. Groups here never chain (each duplicate is within the threshold of its
# kept row itself), so 0.94 groups no more than clip-retrieval's connected components do.
DEFAULT_THRESHOLD = 0.94
KEEP_POLICIES = ("first", "largest", "longest")


@dataclass(frozen=True)
class DedupConfig:
    db: str
    table_name: str = DEFAULT_TABLE_NAME
    against: str = "image"  # which vectors: image or text
    threshold: float = DEFAULT_THRESHOLD
    keep: str = "first"
    full: bool = False  # re-cluster every row instead of checking new and changed ones only
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self):
        check_table_name(self.table_name)
        if self.against not in SEARCH_COLUMNS:
            raise ConfigError(f"against {self.against!r}: choose image or text")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold {self.threshold}: a cosine above 0 and at most 1")
        if self.keep not in KEEP_POLICIES:
            raise ConfigError(f"keep {self.keep!r}: choose one of {', '.join(KEEP_POLICIES)}")


@dataclass(frozen=True)
class ClassifyConfig:
    db: str
    labels: tuple[str, ...]  # label files: one label per line; several = several languages
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    top_k: int = 3
    out: str | None = None  # write id + labels as Parquet here instead of into the table
    model: str | None = None  # None: the model the table was built with
    table_name: str = DEFAULT_TABLE_NAME
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self):
        check_table_name(self.table_name)
        if not self.labels:
            raise ConfigError(f"give the labels: {named('labels')}, files of one label per line")
        if self.top_k < 1:
            raise ConfigError(f"{named('top_k')} {self.top_k}: must be at least 1")
