"""Tables at the Lance level, without LanceDB's client (whose import alone takes seconds):
where a table lives, and opening it to read."""

from __future__ import annotations

from pipeline import storage


def table_uri(db_uri: str, name: str) -> str:
    """Where LanceDB keeps table `name` of the database at `db_uri`."""
    return f"{db_uri.rstrip('/')}/{name}.lance"


def open_dataset(db_uri: str, name: str, storage_options: dict | None = None):
    """Table `name` of the database at `db_uri` as a Lance dataset, to read."""
    import lance

    try:
        return lance.dataset(table_uri(db_uri, name),
                             storage_options=storage.lance_storage_options(db_uri, storage_options))
    except (ValueError, OSError, RuntimeError):
        # Not there: LanceDB's listing says what is (no database, or which tables it holds).
        from pipeline.table import open_table

        return open_table(db_uri, name, storage_options).to_lance()
