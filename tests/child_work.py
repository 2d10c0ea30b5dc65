"""Work for the isolation tests' child processes, importable by name: rows that hang, allocate
or return at once."""

from __future__ import annotations

import time


def hang_or_echo(item: str) -> str:
    """`item`, except that "hang" never returns."""
    while item == "hang":
        time.sleep(3600)
    return item


def allocate(nbytes: int) -> str:
    """Whether `nbytes` could be allocated and touched in the child."""
    try:
        block = bytearray(nbytes)
        block[::4096] = b"\1" * len(block[::4096])
        return "ok"
    except MemoryError:
        return "MemoryError"


def crash_or_echo(item: str) -> str:
    """`item`, except that "crash" kills the process as a segfaulting decoder would."""
    if item == "crash":
        import os
        import signal

        os.kill(os.getpid(), signal.SIGSEGV)
    return item
