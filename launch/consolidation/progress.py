"""Progress of a long consolidation (tensors and bytes done, rate, time left) and the one-line summary."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


class Progress:
    """Thread-safe counter printing at most every `interval` seconds: a redrawn line on a terminal, else log lines."""

    def __init__(self, total_tensors: int, total_bytes: int, stream: TextIO | None = sys.stderr,
                 interval: float | None = None, label: str = "consolidate") -> None:
        self.total_tensors, self.total_bytes = total_tensors, total_bytes
        self.stream, self.label = stream, label
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.tensors = self.bytes = 0
        self.start = time.perf_counter()
        self._last = self.start
        self._lock = threading.Lock()

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.bytes / elapsed
        left = (self.total_bytes - self.bytes) / rate if rate > 0 else float("inf")
        eta = human_seconds(left) if left != float("inf") else "?"
        return (f"{self.label}: {self.tensors}/{self.total_tensors} tensors, {human_bytes(self.bytes)}/"
                f"{human_bytes(self.total_bytes)}, {human_bytes(rate)}/s, {eta} left")

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.tensors += 1
            self.bytes += nbytes
            now = time.perf_counter()
            if self.stream is None or now - self._last < self.interval:
                return
            self._last = now
            self.stream.write(("\r" + self.line() + "\033[K") if self.tty else self.line() + "\n")
            self.stream.flush()

    def done(self) -> None:
        if self.stream is not None and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
