"""The table contract: the LanceDB table the embeddings are loaded into."""

from schemas.embeddings import IMAGE_EMBEDDING, TEXT_EMBEDDING
from schemas.manifest import CAPTION, ID

DEFAULT_TABLE_NAME = "embeddings"
KEY = ID
FULL_TEXT_COLUMN = CAPTION
# The full-text index cuts captions into character n-grams of 1 to 3, so that a query matches
# inside text that has no spaces (Chinese, Japanese, Thai) or glues words together (Korean
# particles, katakana compounds), in every script alike and with no dictionary. Minimum 1: with
# 2, a one-character query (猫) finds nothing. Against the whitespace tokenizer it replaces, on
# synthetic captions in six scripts (2 CPUs): 10,000 rows: build 51 -> 189 ms, index 0.29 -> 1.67
# MB, query p50 1.6 -> 3.3 ms; 100,000 rows: build 0.45 -> 1.54 s, index 2.4 -> 12.9 MB, query
# p50 2.4 -> 11.9 ms, an 8-word English sentence 3.2 -> 106 ms. ICU word segmentation cost
# nothing but missed 猫 in 小猫, ネオン in ネオンサイン, 고양이 in 고양이가; n-grams 1-2 halve the
# index, but their top 10 also holds captions that only share a query's letter pairs.
FULL_TEXT_NGRAM_LENGTHS = (1, 3)
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
