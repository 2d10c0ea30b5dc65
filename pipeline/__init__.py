"""The library: one module per stage of the embed flow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("altclip-pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
