"""Read the manifest: formats, ids, the sample, and how each file splits into partitions."""
