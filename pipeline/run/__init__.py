"""A run on Ray: where each stage goes, the Ray Data stages themselves, and the cost estimate."""
