"""The table contract: the LanceDB table the embeddings are loaded into."""

from schemas.embeddings import IMAGE_EMBEDDING, TEXT_EMBEDDING
from schemas.manifest import CAPTION, ID

DEFAULT_TABLE_NAME = "embeddings"
KEY = ID
FULL_TEXT_COLUMN = CAPTION
# Search by text looks at image vectors (text -> image) unless told otherwise.
SEARCH_COLUMNS = {"image": IMAGE_EMBEDDING, "text": TEXT_EMBEDDING}
# Below this many rows an exact scan is both exact and fast; above it an ANN index pays.
ANN_INDEX_MIN_ROWS = 5000
# The ANN index's IVF partition size, and its query-time defaults (`search --nprobes
# --refine-factor`): partitions searched, and candidates re-ranked by exact distance per result
# wanted (the index stores 8-bit quantised vectors). Chosen with bench/query.py on 100k vectors
# shaped like CLIP's: recall@10 0.984 at p50 6.9 ms. Vectors without neighbourhoods (uniformly
# random ones) need every partition probed and a factor of 20 for 0.98.
ROWS_PER_PARTITION = 4096
SEARCH_NPROBES = 8
SEARCH_REFINE_FACTOR = 5
