"""The HTTP server over a table, in one process or on Ray Serve, and its web page."""
