"""The towers: the model and its provenance, and the actors that run each tower on batches."""
