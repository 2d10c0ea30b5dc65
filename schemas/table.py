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
