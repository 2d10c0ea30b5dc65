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
    call = _Call(function, items, args, ROW_TIMEOUT_S if timeout_s is None else timeout_s)
    try:
        while call.pending or call.owner:
            now = time.monotonic()
            busy = [c for c in call.queues if call.queues[c]]
            active = [c for c in busy if not call.straggling(c, now)]
            if call.pending and not active and busy:
                # Every child is on a straggler: what is queued behind them goes elsewhere.
                call.requeue_behind_heads(busy)
            # Rows go to a child that is not straggling, up to ROWS_IN_FLIGHT each.
            target = call.child_to_send_to(active, busy)
            if call.pending and target is not None:
                call.send_next_row(target, now)
                continue
            # Wait for an answer, or until a head becomes a straggler or reaches its deadline.
            call.receive_answers(busy, active, now)
            call.stop_overdue()
            # Children that owe nothing more are this call's to reuse.
            call.keep_idle()
    finally:
        call.release()
    return call.results


class _Call:
    """One map_isolated call: its rows' results, and what each of its children owes."""

    def __init__(self, function, items: list, args: tuple, timeout_s: float):
        self.name = (function.__module__, function.__qualname__)
        self.items, self.args, self.timeout_s = items, args, timeout_s
        self.results: list = [None] * len(items)
        self.answered = [False] * len(items)
        self.pending = collections.deque(range(len(items)))
        self.owner: dict[int, _Child] = {}  # a row not answered -> the child whose answer it waits for
        self.queues: dict[_Child, collections.deque] = {}  # a child -> the rows sent to it, in order
        self.head_since: dict[_Child, float] = {}  # when each child began the row at its queue's head
        self.free: list[_Child] = []  # this call's children with nothing sent

    def drop(self, child: _Child) -> None:
        """The child is gone: its rows still owed go back to be sent again."""
        for row in reversed(self.queues.pop(child, ())):
            if self.owner.get(row) is child:
                del self.owner[row]
                self.pending.appendleft(row)
        self.head_since.pop(child, None)
        child.close()
        _children.give_back(child)

    def answer(self, row: int, value) -> None:
        if not self.answered[row]:
            self.results[row], self.answered[row] = value, True
            self.owner.pop(row, None)

    def straggling(self, child: _Child, now: float) -> bool:
        return now - self.head_since[child] >= STRAGGLER_S

    def requeue_behind_heads(self, busy: list[_Child]) -> None:
        """The rows queued behind each busy child's head go back to be sent to another."""
        for child in busy:
            for row in list(self.queues[child])[1:]:
                if self.owner.get(row) is child:
                    del self.owner[row]
                    self.pending.appendleft(row)

    def child_to_send_to(self, active: list[_Child], busy: list[_Child]) -> _Child | None:
        """An active child with room in its queue; else, when none is active, an idle or new one
        while this call holds fewer than CHILDREN_PER_CALL (None: wait for answers)."""
        target = next((c for c in active if len(self.queues[c]) < ROWS_IN_FLIGHT), None)
        if self.pending and target is None and not active and len(self.queues) < CHILDREN_PER_CALL:
            target = self.free.pop() if self.free else _children.take(wait_for_slot=not busy)
            if target is not None:
                self.queues[target] = collections.deque()
        return target

    def send_next_row(self, target: _Child, now: float) -> None:
        row = self.pending.popleft()
        try:
            message = pickle.dumps((self.name, self.args, self.items[row]), pickle.HIGHEST_PROTOCOL)
            target.send.send_bytes(message)
        except (BrokenPipeError, OSError):  # died between rows: the row goes to another
            self.pending.appendleft(row)
            self.drop(target)
            return
        if not self.queues[target]:
            self.head_since[target] = now
        self.queues[target].append(row)
        self.owner[row] = target

    def receive_answers(self, busy: list[_Child], active: list[_Child], now: float) -> None:
        """Take the answers that come before the next moment to act; a child whose pipe ends
        instead died on its head row, which gets `worker_crash`."""
        moments = [self.head_since[c] + self.timeout_s for c in busy]
        if self.pending:
            moments += [self.head_since[c] + STRAGGLER_S for c in active]
        left = max(0.0, min(moments) - now) if moments else 0.0
        by_connection = {child.receive: child for child in busy}
        for connection in wait(list(by_connection), timeout=left):
            child = by_connection[connection]
            row = self.queues[child].popleft()
            try:
                value = pickle.loads(child.receive.recv_bytes())
            except (EOFError, OSError):
                if self.owner.get(row) is child:
                    self.answer(row, RowFailure("worker_crash",
                                                f"the decoding process {child.death()} on this row"))
                self.drop(child)
                continue
            if self.owner.get(row) is child or not self.answered[row]:
                self.answer(row, value)
            self.head_since[child] = time.monotonic()

    def stop_overdue(self) -> None:
        """A head past its deadline gets `timeout`, and its child is killed."""
        now = time.monotonic()
        overdue = [c for c in self.queues if self.queues[c] and now - self.head_since[c] >= self.timeout_s]
        for child in overdue:
            row = self.queues[child].popleft()
            if self.owner.get(row) is child:
                self.answer(row, RowFailure("timeout",
                                            f"no result after {self.timeout_s:g} s; the process was stopped"))
            self.drop(child)

    def keep_idle(self) -> None:
        for child in [c for c in self.queues if not self.queues[c]]:
            del self.queues[child]
            self.head_since.pop(child, None)
            self.free.append(child)

    def release(self) -> None:
        """Every child back to the process's pool (a child still owing rows is stopped first)."""
        for child in list(self.queues):  # interrupted: rows in flight are abandoned with their child
            if self.queues[child]:
                self.queues[child].clear()
                child.close()
                _children.give_back(child)
            else:
                self.free.append(child)
        for child in self.free:
            _children.give_back(child)


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
