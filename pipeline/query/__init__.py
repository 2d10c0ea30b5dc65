"""Questions to a table: vector, full-text and SQL queries, filters, zero-shot labels."""
