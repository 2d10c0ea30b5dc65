"""Wall-clock deadlines for http(s) attempts: the sockets of an attempt past its time are shut down."""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time

import urllib3

# A socket timeout bounds each read, not an answer: a server sending a byte a second never trips
# it, through the headers (read by http.client line by line) or the body. So each attempt has a
# deadline, and one thread per process shuts down the sockets of attempts past theirs: a read
# blocked on such a socket returns at once, and the attempt ends as a `timeout`.

class Attempt:
    """One attempt's deadline and the sockets it opened or used."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self.finished = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def watch(self, sock) -> None:
        with self._lock:
            if self.finished:
                return
            self._sockets.append(sock)
            if self.expired:
                _shut_down(sock)

    def expire(self) -> None:
        with self._lock:
            if self.finished:
                return
            self.expired = True
            for sock in self._sockets:
                _shut_down(sock)

    def finish(self) -> bool:
        """Stop watching; whether the deadline cut the attempt off first."""
        with self._lock:
            self.finished = True
            self._sockets.clear()
            return self.expired


def _shut_down(sock) -> None:
    try:
        # The plain socket's shutdown, also for a TLS socket: SSLSocket.shutdown drops its TLS
        # state, which the thread blocked in a read still uses.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, TypeError, ValueError):
        pass  # closed already


class Deadlines:
    """The process's attempts in flight, by deadline, and the thread that cuts them off."""

    def __init__(self):
        self._heap: list[tuple[float, int, Attempt]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, attempt: Attempt) -> None:
        with self._wake:
            heapq.heappush(self._heap, (attempt.deadline, next(self._order), attempt))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        with self._wake:
            while True:
                while self._heap and self._heap[0][2].finished:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wake.wait()
                    continue
                left = self._heap[0][0] - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                heapq.heappop(self._heap)[2].expire()


DEADLINES = Deadlines()
CURRENT = threading.local()  # .attempt: the attempt this thread is making


def _watch_current(sock) -> None:
    attempt = getattr(CURRENT, "attempt", None)
    if attempt is not None and sock is not None:
        attempt.watch(sock)


class _CutOff:
    """A connection whose socket the attempt's deadline can shut down: from its creation (a TLS
    handshake trickled byte by byte) and at each response (a connection kept alive)."""

    def _new_conn(self):
        sock = super()._new_conn()
        _watch_current(sock)
        return sock

    def getresponse(self):
        _watch_current(self.sock)
        return super().getresponse()


class CutOffHTTPConnection(_CutOff, urllib3.connection.HTTPConnection):
    pass


class CutOffHTTPSConnection(_CutOff, urllib3.connection.HTTPSConnection):
    pass

