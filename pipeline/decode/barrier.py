"""The per-row fault barrier: what a row's data makes a stage raise becomes that row's error."""

from __future__ import annotations

from pipeline import storage
from schemas.embeddings import error


class ImageError(Exception):
    """A row's image could not be had; `str()` is the row's `image_error` (`kind: message`)."""

    def __init__(self, kind: str, message: str):
        super().__init__(error(kind, storage.redact_text(message)))


def per_row(function, rows: list, kind: str, doing: str, others_succeeded: bool = False) -> list:
    """`function(row)` for each row; a row it raises on gets the error `kind: <doing> failed on
    it (<Type>: <message>)` in its place. When it raises on every row (and on no other rows of
    the batch did it succeed) the fault is not the rows' (a broken model, a device gone) and the
    last exception is raised."""
    results, last = [], None
    for row in rows:
        try:
            results.append(function(row))
        except Exception as exc:
            last = exc
            results.append(error(kind, storage.redact_text(
                f"{doing} failed on it ({type(exc).__name__}: {exc})")))
    if rows and not others_succeeded and all(isinstance(r, str) for r in results):
        raise last
    return results
