"""Token buckets: the rate limits that keep imaging from starving the servers running on the same host.

A bucket holds up to ``burst`` tokens (bytes) and refills at ``rate`` bytes per second. :meth:`consume` takes
``n`` tokens, going into debt when there are not enough, and sleeps until the debt is paid: a caller that reads
4 MiB at a time at 50 MB/s therefore waits ~80 ms after each read, and over any stretch longer than a second
the bytes moved stay within ``rate * seconds + burst``. The bucket starts empty, so a job's first second does
not run at full disk speed either. Thread-safe: the compressor's and the sink's threads may share one bucket.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

__all__ = ["TokenBucket", "throttled_readinto"]


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if not rate or rate <= 0:
            raise ValueError(f"a rate limit must be a positive number of bytes per second, not {rate!r}")
        self.rate = float(rate)
        # a tenth of a second's worth: short enough that the limit holds over a few seconds, long enough that
        # one 4 MiB read at tens of MB/s does not make every call sleep
        self.burst = float(burst) if burst is not None else max(self.rate / 10, 64 * 1024.0)
        self._clock = clock
        self._sleep = sleep
        self._tokens = 0.0
        self._last = clock()
        self._lock = threading.Lock()
        self.consumed = 0
        self.waited = 0.0
        self.started: float | None = None  # the first and the latest consume: the span the limit applied to
        self.ended: float | None = None

    def consume(self, n: int) -> float:
        """Take ``n`` tokens; returns the seconds slept to stay under the rate."""
        if n <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            if self.started is None:
                self.started = now
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            self.consumed += n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
            self.waited += wait
        self.ended = self._clock()
        return wait

    def to_dict(self) -> dict[str, Any]:
        return {"rate": round(self.rate), "burst_bytes": round(self.burst), "bytes": self.consumed, "waited_seconds": round(self.waited, 3),
                "seconds": round(self.ended - self.started, 3) if self.started is not None and self.ended else None}


def throttled_readinto(readinto: Callable[[int, Any], Any], bucket: TokenBucket) -> Callable[[int, Any], Any]:
    """``disk.readinto`` paying ``bucket`` for every byte it reads (the chain's disk reads)."""

    def _readinto(offset: int, buf: Any) -> Any:
        r = readinto(offset, buf)
        bucket.consume(memoryview(buf).nbytes)
        return r

    return _readinto
