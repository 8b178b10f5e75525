"""Progress of the long waits (loading and converting weights, compiling kernels, repacking,
hashing a cache), in a terminal and in logs alike.

In a terminal a tqdm bar; otherwise (a server's log, a pipe, a container) a log line every
LLAMASERVE_PROGRESS_INTERVAL seconds (5 by default) on the `llamaserve.progress` logger, so a
70B load is never minutes of silence. Whatever is running is also kept in `current()`, which the
engine process sends to the server for `/health` while it loads.

Torch-free: the server process imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator

log = logging.getLogger("llamaserve.progress")

INTERVAL_ENV = "LLAMASERVE_PROGRESS_INTERVAL"
# Loads below this many bytes take a moment: no progress shown (tests lower it).
MIN_BYTES_ENV = "LLAMASERVE_PROGRESS_MIN_BYTES"
DEFAULT_MIN_BYTES = 512 << 20

_lock = threading.Lock()
_current: dict | None = None
_force_log = False  # set in processes whose terminal is not the place to report (serve's engine)


def interval_s() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, "5")))
    except ValueError:
        return 5.0


def min_bytes() -> int:
    try:
        return int(os.environ.get(MIN_BYTES_ENV, DEFAULT_MIN_BYTES))
    except ValueError:
        return DEFAULT_MIN_BYTES


def log_only() -> None:
    """Report through logging even when stderr is a terminal (the serve engine process, whose
    logs also go to CACHE_ROOT/logs)."""
    global _force_log
    _force_log = True


def current() -> dict | None:
    """What is running now: {"what", "done", "total", "unit", "elapsed_s", "text"}, or None."""
    with _lock:
        if not _current:
            return None
        state = dict(_current)
    state["elapsed_s"] = round(time.monotonic() - state.pop("started"), 1)
    return state


def _raw() -> dict | None:
    with _lock:
        return _current


def _publish(state: dict | None) -> None:
    global _current
    with _lock:
        _current = state


def _size(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:,.0f}" if n >= 10 or n == int(n) else f"{n:.2f}"
    for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {name}"
    return f"{n:.0f} B"


@contextlib.contextmanager
def phase(what: str, level: int = logging.INFO) -> Iterator[None]:
    """A wait without a count (a compiler run): logged when it starts and when it ends, and
    shown by `current()` meanwhile."""
    t0 = time.monotonic()
    log.log(level, "%s ...", what)
    previous = _raw()
    _publish({"what": what, "done": None, "total": None, "unit": "", "started": t0, "text": what})
    try:
        yield
    finally:
        _publish(previous)
    log.log(level, "%s: done in %.1f s", what, time.monotonic() - t0)


class Progress:
    """`update(n)` as work is done; a bar in a terminal, else a log line every interval_s().
    `shown=False` (small work) still keeps `current()` up to date but prints nothing."""

    def __init__(self, what: str, total: float, unit: str = "", *, count_total: int | None = None,
                 count_unit: str = "tensors", shown: bool = True) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.count_total, self.count_unit = count_total, count_unit
        self.done, self.count = 0.0, 0
        self.detail = ""
        self.shown = shown
        self.t0 = self.last_log = time.monotonic()
        self.outer = _raw()  # shown again when this one closes (a hash inside a cache build)
        self.bar = None
        if shown and not _force_log and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=unit or "it", unit_scale=unit == "B",
                            unit_divisor=1024 if unit == "B" else 1000, dynamic_ncols=True)
        elif shown:
            log.info("%s: %s", what, self.text())
        self._publish()

    def text(self) -> str:
        parts = [f"{_size(self.done, self.unit)} / {_size(self.total, self.unit)} {'' if self.unit == 'B' else self.unit}"
                 .rstrip()]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        if self.count_total:
            parts.append(f"{self.count}/{self.count_total} {self.count_unit}")
        elapsed = time.monotonic() - self.t0
        if self.done and elapsed > 0 and self.total > self.done:
            rate = self.done / elapsed
            left = (self.total - self.done) / rate
            parts.append(f"{_size(rate, self.unit)}{'' if self.unit == 'B' else ' ' + self.unit}/s"
                         + (f", about {left:.0f} s left" if left >= 1 else ""))
        if self.detail:
            parts.append(self.detail)
        return ", ".join(parts)

    def _publish(self) -> None:
        _publish({"what": self.what, "done": self.done, "total": self.total, "unit": self.unit,
                  "started": self.t0, "text": f"{self.what}: {self.text()}"})

    def update(self, n: float = 1, count: int = 1, detail: str | None = None) -> None:
        self.done += n
        self.count += count
        if detail is not None:
            self.detail = detail
        self._publish()
        if self.bar is not None:
            if detail is not None:
                self.bar.set_postfix_str(detail, refresh=False)
            self.bar.update(n)
        elif self.shown and time.monotonic() - self.last_log >= interval_s():
            self.last_log = time.monotonic()
            log.info("%s: %s", self.what, self.text())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.shown:
            amount = _size(self.done, self.unit) + ("" if self.unit == "B" else f" {self.unit}")
            if self.count_total:
                amount += f", {self.count} {self.count_unit}"
            log.info("%s: %s in %.1f s", self.what, amount, time.monotonic() - self.t0)
        _publish(self.outer)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
