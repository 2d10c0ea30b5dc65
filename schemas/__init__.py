"""Arrow schemas that are the contracts between the stages: manifest in, embeddings out, table."""
