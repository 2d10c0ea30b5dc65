"""The LanceDB table: loading outputs, indexes, changes, duplicates and recall."""
