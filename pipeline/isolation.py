"""Per-row work in a child process: a row that crashes its decoder, or hangs it, fails alone.

A damaged file can crash a native decoder (a segfault, an abort) or make the kernel kill the
process for memory. In the Ray worker that would fail the task, Ray would retry it on the same
rows until the job failed, and the rerun would fail on the same row. Here the rows of a batch go
to one long-lived child process that answers row by row: when it dies or stops answering, the
row it was on is known exactly, gets `worker_crash` (or `timeout`), a new child takes the rows
after it, and every other row of the batch is done as usual.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection

# A row that has not come back after this long is given up (its child is killed).
ROW_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RowFailure:
    """What became of a row whose child died or hung: `kind` and a message."""

    kind: str  # worker_crash | timeout
    message: str


class _Child:
    def __init__(self):
        to_child_r, self._to_child_w = os.pipe()
        self._from_child_r, from_child_w = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from pipeline.isolation import serve; serve({to_child_r}, {from_child_w})"],
            # Decoders of damaged files write warnings and libtiff's complaints to stderr by the
            # thousand; each row's error says what matters.
            pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.send = Connection(self._to_child_w, readable=False)
        self.receive = Connection(self._from_child_r, writable=False)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.send.close()
        self.receive.close()

    def death(self) -> str:
        """How the child ended, in words."""
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with status {code}"


_child: _Child | None = None
_lock = threading.Lock()  # one batch at a time per process (the query server has threads)


def map_isolated(function, items: list, args: tuple = (), timeout_s: float | None = None) -> list:
    """`[function(item, *args) for item in items]`, computed in a child process; the item that
    crashes or hangs the child gets a RowFailure in its place. `function` must be importable
    by name and must not raise (it returns its errors as values)."""
    global _child
    timeout_s = ROW_TIMEOUT_S if timeout_s is None else timeout_s
    name = (function.__module__, function.__qualname__)
    results: list = []
    with _lock:
        while len(results) < len(items):
            if _child is None or _child.process.poll() is not None:
                if _child is not None:
                    _child.close()
                _child = _Child()
            start = len(results)
            try:
                _child.send.send_bytes(pickle.dumps((name, args, items[start:]), pickle.HIGHEST_PROTOCOL))
            except (BrokenPipeError, OSError):
                _child.close()
                _child = None
                continue
            for item in range(start, len(items)):
                failure = None
                try:
                    if _child.receive.poll(timeout_s):
                        results.append(pickle.loads(_child.receive.recv_bytes()))
                        continue
                    _child.process.kill()
                    failure = RowFailure("timeout", f"no result after {timeout_s:.0f} s; the process was stopped")
                except (EOFError, OSError):
                    failure = RowFailure("worker_crash", f"the decoding process {_child.death()} on this row")
                _child.close()
                _child = None
                results.append(failure)
                break
    return results


def stop() -> None:
    """Stop this process's child, if any; the next batch starts a new one (which reads the
    environment anew)."""
    global _child
    with _lock:
        if _child is not None:
            _child.close()
            _child = None


def serve(read_fd: int, write_fd: int) -> None:
    """The child: batches in, one result per row out, until the parent goes away."""
    receive = Connection(read_fd, writable=False)
    send = Connection(write_fd, readable=False)
    while True:
        try:
            (module, qualname), args, items = pickle.loads(receive.recv_bytes())
        except EOFError:
            return
        function = importlib.import_module(module)
        for part in qualname.split("."):
            function = getattr(function, part)
        for item in items:
            send.send_bytes(pickle.dumps(function(item, *args), pickle.HIGHEST_PROTOCOL))
