"""The API's typed parameters, request and response models, and the error answers and upload
body its routes document: what the OpenAPI document shows of each route."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from pipeline.serve.searcher import MAX_LISTED_VALUES, MAX_TEXT_CHARS

DEFAULT_K = 24
MAX_K = 200

Against = Literal["image", "text"]


class SearchParams(BaseModel):
    """What every search takes besides its query and filters."""

    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="How many hits.")
    against: Against = Field("image", description="Which vectors to rank: the images' or the captions'.")


class TextSearchParams(SearchParams):
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS,
                             description="The query, in any language (required unless `id`).")
    id: str | None = Field(None, description="Search with this row's stored vector instead of a text.")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=MAX_TEXT_CHARS)
    k: StrictInt = Field(DEFAULT_K, ge=1, le=MAX_K)
    against: Against = "image"
    # Checked against the table's columns and types (see pipeline.query.filters); the OpenAPI document
    # lists them per column.
    filters: dict[str, Any] | None = None


class Error(BaseModel):
    error: str


class Info(BaseModel):
    table: str
    rows: int
    version: int
    model: str
    dtype: str
    dim: int
    against: list[str]


class ColumnInfo(BaseModel):
    name: str
    type: str = Field(description="The Arrow type.")
    kind: Literal["metadata", "contract"]
    filter: Literal["string", "integer", "number", "boolean"]
    values: list[str] | None = Field(None, description=f"Distinct values of a string column with at "
                                                       f"most {MAX_LISTED_VALUES}; null: more.")
    min: int | float | None = None
    max: int | float | None = None
    nulls: int | None = None


class Columns(BaseModel):
    columns: list[ColumnInfo]


class Hit(BaseModel):
    id: str
    score: float = Field(description="Cosine similarity.")
    caption: str | None
    image: str | None = Field(description="The image's path on this server (its thumbnail); the "
                                          "stored URI, redacted, where the server shows URIs.")
    width: int | None
    height: int | None
    thumbnail: str = Field(description="Path of the row's thumbnail.")
    metadata: dict[str, Any]


class Results(BaseModel):
    hits: list[Hit]
    count: int
    k: int
    against: Against
    where: str | None = Field(description="The filter as applied (built from checked values).")
    search_ms: float


def error_answer(description: str) -> dict:
    """A route's documented refusal: answered as {"error": message}."""
    return {"description": description, "model": Error}


SEARCH_ERRORS = {400: error_answer("A bad request (unknown filter column, a value of the wrong type, ...).")}
NOT_FOUND = {404: error_answer("No such row.")}
IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary"}, "k": {"type": "integer"},
                       "against": {"type": "string", "enum": ["image", "text"]}},
        "additionalProperties": {"type": "string"}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}}}
