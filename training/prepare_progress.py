"""Progress of a data preparation: a tqdm bar on a terminal, else one log line every `every` seconds; and the
preparing rank's heartbeat (the launcher's stall detection sees a long tokenization progressing)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

from tune_launch import heartbeat

log = logging.getLogger("tune_launch")


class Progress:
    def __init__(self, total_bytes: int | None, bar: bool | None = None, stream: TextIO | None = None,
                 every: float = 30.0) -> None:
        self.total_bytes = total_bytes
        self.docs = self.tokens = self.bytes = 0
        self.t0 = self._last = time.perf_counter()
        self.every = every
        stream = stream or sys.stderr
        self._bar = None
        if bar if bar is not None else stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preparing data", file=stream,
                             dynamic_ncols=True, mininterval=0.5)

    def advance(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        heartbeat.report_progress("data", self.bytes, self.total_bytes,
                                  detail=f"preparing: {self.docs:,} documents, {self.tokens / 1e6:.1f}M tokens")
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(f"{self.docs:,} docs, {self.tokens / 1e6:.1f}M tokens, "
                                      f"{self.tokens_per_second / 1e3:.0f}k tok/s", refresh=False)
            return
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            share = f" ({100 * self.bytes / self.total_bytes:.0f}% of the bytes)" if self.total_bytes else ""
            log.info("preparing data: %d documents, %.1fM tokens%s, %.0fk tokens/s", self.docs, self.tokens / 1e6,
                     share, self.tokens_per_second / 1e3)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class BusyProgress:
    """Counts the CPU time of this process and its children as progress while a step that reports nothing runs
    (TRL's SFT preparation, a hub download, tokenizer training): the launcher's stall detection then leaves a long
    but working preparation alone, and still finds a preparer that is stuck (no CPU used for `watchdog.data_s`)."""

    def __init__(self, every_s: float = 30.0, min_cpu_share: float = 0.02) -> None:
        self.every_s, self.min_cpu_s = every_s, min_cpu_share * every_s
        self.reports = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tune-launch-busy", daemon=True)

    def __enter__(self) -> BusyProgress:
        if heartbeat.current() is not None:  # `tune-launch prepare` alone has no launcher to tell
            import psutil

            self._me = psutil.Process()
            self._last = cpu_seconds(self._me)  # the baseline is now, not when the thread first runs
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            now = cpu_seconds(self._me)
            if now - self._last >= self.min_cpu_s:
                heartbeat.report_busy()
                self.reports += 1
            self._last = now


def cpu_seconds(proc) -> float:
    """User + system seconds of `proc` and its living children (spawned tokenizer or `datasets.map` workers)."""
    import psutil

    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total
