"""The library, in rooms in the order the data flows through them: read, decode, embed, write,
run, table, query, serve; config, storage, timing and progress at the top serve them all."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("altclip-pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
