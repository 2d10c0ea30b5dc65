"""Rows out: Parquet shards, the partitions' commit ledger, the summary, export and report."""
