"""The manifest contract: the columns an input table may carry and the formats it may come in."""

ID = "id"
IMAGE = "image"
IMAGE_BYTES = "image_bytes"
CAPTION = "caption"

# The columns with a meaning of their own; every other manifest column is metadata.
KNOWN_COLUMNS = (ID, IMAGE, IMAGE_BYTES, CAPTION)

# Columns that stages hand each other (inline bytes, pixels, token ids) start with this and are
# never written; a manifest column whose name starts with it is kept as `manifest_<name>`.
INTERNAL_PREFIX = "__altclip_"
# Each row's partition key (the manifest file it comes from), from the read to the write.
PARTITION = INTERNAL_PREFIX + "partition"
# A row's inline image bytes, from reading the manifest to decoding.
INLINE_IMAGE = INTERNAL_PREFIX + "image_bytes"
# Where a reader found a row's inline image bytes, when they have a URI of their own (a member
# of a WebDataset shard): the row's `image`. The job decodes the bytes it has; later readers
# (thumbnails, the report) open the URI.
INLINE_IMAGE_URI = INTERNAL_PREFIX + "image_uri"

# File name suffix -> manifest format.
FORMATS_BY_SUFFIX = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".tar": "webdataset",
}

# A folder (or glob) of no manifest files but of these is a corpus of image files: a row per
# image, with the text of a same-named CAPTION_FILE_SUFFIX file as its caption.
IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
CAPTION_FILE_SUFFIX = ".txt"
