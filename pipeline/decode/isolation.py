"""Per-row work in child processes: a row that crashes its decoder, hangs it, or outgrows the
child's memory bound fails alone.

A damaged file can crash a native decoder (a segfault, an abort), make it loop for ever, or
make it allocate gigabytes. In the Ray worker a crash would fail the task, Ray would retry it
on the same rows until the job failed, and the rerun would fail on the same row; an
allocation would bring the kernel's OOM killer, which may pick the Ray worker or the driver.
Here rows go, each on its own, to long-lived child processes with a bound on their memory:
when a child dies or stops answering, the row it was on is known exactly and gets
`worker_crash` (or `timeout`), an allocation past the bound is that row's `too_large`, and
every other row is done as usual.

A row that runs long is left to finish (or reach its deadline) in its child while the next rows
go to another, so the hangs of one batch overlap: N of them cost one timeout, not N.
"""

from __future__ import annotations

import collections
import importlib
import os
import pickle
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

# A row that has not come back after this long is given up (its child is killed).
ROW_TIMEOUT_S = 120.0
# A row still running after this long is a straggler: the next rows go to another child. A
# decode of the largest image taken (179 MP) takes a few seconds on one core.
STRAGGLER_S = 5.0
# Rows sent to a child ahead of its answers (see map_isolated).
ROWS_IN_FLIGHT = 2
# Children one call may hold at once (the first, and stragglers beyond it), and children a
# process runs at once over all its threads (the query server decodes uploads in parallel).
CHILDREN_PER_CALL = 5
MAX_CHILDREN = max(4, os.cpu_count() or 1)
IDLE_CHILDREN_KEPT = 2
# Memory a child may add to what it holds once its code is imported (its address space, as
# RLIMIT_AS counts it): a 2.9 MB 13000x13000 RGBA PNG took a decoder to 3.1 GB, and 16
# workers meeting such images at once would need 50 GB. Past it, allocations fail in the
# child: the row's MemoryError (`too_large`), or its crash.
CHILD_MEMORY_BYTES = 2 << 30


@dataclass(frozen=True)
class RowFailure:
    """What became of a row whose child died or hung: `kind` and a message."""

    kind: str  # worker_crash | timeout
    message: str


class _Child:
    def __init__(self):
        to_child_r, self._to_child_w = os.pipe()
        self._from_child_r, from_child_w = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
                   # One thread of native code each: the bound counts every thread's stack.
                   OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, "-c",
             f"from pipeline.decode.isolation import serve; serve({to_child_r}, {from_child_w}, {CHILD_MEMORY_BYTES})"],
            # Decoders of damaged files write warnings and libtiff's complaints to stderr by the
            # thousand; each row's error says what matters.
            pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.send = Connection(self._to_child_w, readable=False)
        self.receive = Connection(self._from_child_r, writable=False)

    def alive(self) -> bool:
        return self.process.poll() is None

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


class _Children:
    """This process's children: those between rows, kept for the next call, and a bound on how
    many run at once."""

    def __init__(self):
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CHILDREN)

    def take(self, wait_for_slot: bool) -> _Child | None:
        """A child for one call (None: no slot free and not waiting for one)."""
        if not self._slots.acquire(blocking=wait_for_slot):
            return None
        with self._lock:
            while self._idle:
                child = self._idle.pop()
                if child.alive():
                    return child
                child.close()
        try:
            return _Child()
        except BaseException:
            self._slots.release()
            raise

    def give_back(self, child: _Child) -> None:
        """A child between rows: kept for the next call, or stopped."""
        with self._lock:
            if child.alive() and len(self._idle) < IDLE_CHILDREN_KEPT:
                self._idle.append(child)
                child = None
        if child is not None:
            child.close()
        self._slots.release()

    def stop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            child.close()


_children = _Children()


def map_isolated(function, items: list, args: tuple = (), timeout_s: float | None = None) -> list:
    """`[function(item, *args) for item in items]`, computed in child processes; the item that
    crashes or hangs its child gets a RowFailure in its place. `function` must be importable
    by name and must not raise (it returns its errors as values).

    Each child has ROWS_IN_FLIGHT rows sent ahead, so that it decodes the next while this
    process sends and receives (one row at a time, the decode stage ran at 0.85 of a plain
    loop of pixels_of on one core; two ahead, 0.89-0.90). A
    child answers in order: the row at the head of its queue is the one it is on. When every
    child's head is a straggler, the rows queued behind those heads go to another child, and
    whichever answer comes first stands."""
    timeout_s = ROW_TIMEOUT_S if timeout_s is None else timeout_s
    name = (function.__module__, function.__qualname__)
    results: list = [None] * len(items)
    answered = [False] * len(items)
    pending = collections.deque(range(len(items)))
    owner: dict[int, _Child] = {}  # a row not answered -> the child whose answer it waits for
    queues: dict[_Child, collections.deque] = {}  # a child -> the rows sent to it, in order
    head_since: dict[_Child, float] = {}  # when each child began the row at its queue's head
    free: list[_Child] = []  # this call's children with nothing sent

    def drop(child: _Child) -> None:
        """The child is gone: its rows still owed go back to be sent again."""
        for row in reversed(queues.pop(child, ())):
            if owner.get(row) is child:
                del owner[row]
                pending.appendleft(row)
        head_since.pop(child, None)
        child.close()
        _children.give_back(child)

    def answer(row: int, value) -> None:
        if not answered[row]:
            results[row], answered[row] = value, True
            owner.pop(row, None)

    def straggling(child: _Child, now: float) -> bool:
        return now - head_since[child] >= STRAGGLER_S

    try:
        while pending or owner:
            now = time.monotonic()
            busy = [c for c in queues if queues[c]]
            active = [c for c in busy if not straggling(c, now)]
            if pending and not active and busy:
                # Every child is on a straggler: what is queued behind them goes elsewhere.
                for child in busy:
                    for row in list(queues[child])[1:]:
                        if owner.get(row) is child:
                            del owner[row]
                            pending.appendleft(row)
            # Rows go to a child that is not straggling, up to ROWS_IN_FLIGHT each.
            target = next((c for c in active if len(queues[c]) < ROWS_IN_FLIGHT), None)
            if pending and target is None and not active and len(queues) < CHILDREN_PER_CALL:
                target = free.pop() if free else _children.take(wait_for_slot=not busy)
                if target is not None:
                    queues[target] = collections.deque()
            if pending and target is not None:
                row = pending.popleft()
                try:
                    target.send.send_bytes(pickle.dumps((name, args, items[row]), pickle.HIGHEST_PROTOCOL))
                except (BrokenPipeError, OSError):  # died between rows: the row goes to another
                    pending.appendleft(row)
                    drop(target)
                    continue
                if not queues[target]:
                    head_since[target] = now
                queues[target].append(row)
                owner[row] = target
                continue
            # Wait for an answer, or until a head becomes a straggler or reaches its deadline.
            moments = [head_since[c] + timeout_s for c in busy]
            if pending:
                moments += [head_since[c] + STRAGGLER_S for c in active]
            left = max(0.0, min(moments) - now) if moments else 0.0
            by_connection = {child.receive: child for child in busy}
            for connection in wait(list(by_connection), timeout=left):
                child = by_connection[connection]
                row = queues[child].popleft()
                try:
                    value = pickle.loads(child.receive.recv_bytes())
                except (EOFError, OSError):
                    if owner.get(row) is child:
                        answer(row, RowFailure("worker_crash", f"the decoding process {child.death()} on this row"))
                    drop(child)
                    continue
                if owner.get(row) is child or not answered[row]:
                    answer(row, value)
                head_since[child] = time.monotonic()
            now = time.monotonic()
            for child in [c for c in queues if queues[c] and now - head_since[c] >= timeout_s]:
                row = queues[child].popleft()
                if owner.get(row) is child:
                    answer(row, RowFailure("timeout", f"no result after {timeout_s:g} s; the process was stopped"))
                drop(child)
            # Children that owe nothing more are this call's to reuse.
            for child in [c for c in queues if not queues[c]]:
                del queues[child]
                head_since.pop(child, None)
                free.append(child)
    finally:
        for child in list(queues):  # interrupted: rows in flight are abandoned with their child
            if queues[child]:
                queues[child].clear()
                child.close()
                _children.give_back(child)
            else:
                free.append(child)
        for child in free:
            _children.give_back(child)
    return results


def stop() -> None:
    """Stop this process's idle children; the next call starts new ones (which read the
    environment anew)."""
    _children.stop_idle()


def serve(read_fd: int, write_fd: int, memory_bytes: int) -> None:
    """The child: rows in, one result per row out, in order, until the parent goes away.

    A thread takes rows off the pipe as they come, so the parent's sending the next row never
    waits on this process's sending a result (both pipes full: each waiting on the other)."""
    receive = Connection(read_fd, writable=False)
    send = Connection(write_fd, readable=False)
    rows: queue.SimpleQueue = queue.SimpleQueue()

    def take() -> None:
        try:
            while True:
                rows.put(receive.recv_bytes())
        except (EOFError, OSError):
            rows.put(None)

    threading.Thread(target=take, daemon=True).start()
    bounded = False
    while True:
        message = rows.get()
        if message is None:
            return
        (module, qualname), args, item = pickle.loads(message)
        function = importlib.import_module(module)
        for part in qualname.split("."):
            function = getattr(function, part)
        if not bounded:  # once the code is in, its own size is not the rows'
            _bound_memory(memory_bytes)
            bounded = True
        send.send_bytes(pickle.dumps(function(item, *args), pickle.HIGHEST_PROTOCOL))


def _bound_memory(extra_bytes: int) -> None:
    try:
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: no bound
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
