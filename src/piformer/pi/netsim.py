"""A userspace TCP relay that adds one-way delay (and optionally a bandwidth cap) to a link.

`tc netem` is not available in these kernels, so to *measure* how latency-bound a secure run
is, the two parties talk through two of these relays (one per direction of connection). Each
byte is forwarded `delay_s` after it arrived, in order; with `bandwidth_bps`, the relay also
paces its output as a link of that rate would.

Running the same query with delay d and with delay 0 gives the number of one-way delays the
protocol actually waited for: (wall(d) - wall(0)) / d. That is the round count SPU does not
report (its "actions" are messages, many of which overlap).
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque


class DelayRelay:
    """Listen on 127.0.0.1:listen_port; forward each connection to `target` with added delay."""

    def __init__(self, listen_port: int, target: tuple[str, int], delay_s: float, bandwidth_bps: float | None = None):
        self.target = target
        self.delay_s = float(delay_s)
        self.bandwidth_bps = bandwidth_bps
        self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", listen_port))
        self._srv.listen(16)
        self.port = self._srv.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.bytes_forwarded = 0

    def start(self) -> "DelayRelay":
        t = threading.Thread(target=self._accept, daemon=True, name=f"relay-{self.port}")
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._srv.close()
        except OSError:
            pass

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                a, _ = self._srv.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(self.target)
            except OSError:
                a.close()
                continue
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst in ((a, b), (b, a)):
                self._pump(src, dst)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Two threads per direction: a reader stamping arrival times, a writer releasing data
        when its time has come (arrival + delay, and not before the previous chunk has left at
        the capped rate)."""
        queue: deque[tuple[float, bytes]] = deque()
        ready = threading.Condition()
        done = threading.Event()

        def reader() -> None:
            while True:
                try:
                    data = src.recv(1 << 20)
                except OSError:
                    data = b""
                with ready:
                    queue.append((time.perf_counter(), data))
                    ready.notify()
                if not data:
                    return

        def writer() -> None:
            free_at = 0.0  # when the capped link finishes sending the previous chunk
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    arrived, data = queue.popleft()
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    done.set()
                    return
                due = arrived + self.delay_s
                if self.bandwidth_bps:
                    start = max(due, free_at)
                    free_at = start + len(data) * 8.0 / self.bandwidth_bps
                    due = free_at
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                try:
                    dst.sendall(data)
                    self.bytes_forwarded += len(data)
                except OSError:
                    done.set()
                    return

        for fn in (reader, writer):
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self._threads.append(t)
