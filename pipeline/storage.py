"""Any URI -> a filesystem: the one place paths, schemes and storage options are interpreted."""

from __future__ import annotations

import posixpath
import re

import fsspec
import pyarrow.fs as pafs

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def has_scheme(uri: str) -> bool:
    return bool(_SCHEME.match(uri))


def is_local(uri: str) -> bool:
    return not has_scheme(uri) or uri.startswith("file://")


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it."""
    return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem | None:
    """The same filesystem for pyarrow and Ray Data readers (None: let them use the local disk)."""
    if _is_local_fs(fs):
        return None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URI for a path inside `fs` (what `filesystem` stripped)."""
    return path if _is_local_fs(fs) else fs.unstrip_protocol(path)


def resolve(reference: str, base: str) -> str:
    """An image reference as a URI: absolute URIs and paths stay, relative ones join `base`."""
    if has_scheme(reference) or reference.startswith("/"):
        return reference
    if has_scheme(base):
        return base.rstrip("/") + "/" + posixpath.normpath(reference)
    return posixpath.normpath(posixpath.join(base, reference))
