"""Progress lines for long compile-time work (the quantize pass's calibration, layer by layer).

A torch.compile backend runs inside the user's first call, which otherwise shows nothing while
q3n works: compiling the design's quantized config for a 4-layer, 1e9-parameter model took
120-127 s on an H200 with 32 calibration rows, 12-20 s without calibration (bench/RESULTS.md,
session 12). Guarantees:

- ``mode=True`` prints a line per step, ``False`` never prints, ``None`` ("auto", the default)
  prints once the work has run ``after_s`` seconds, then at most one line a second and always
  the last step's: short work stays silent.
- Lines go to `stream` (stderr by default), start with ``q3n:`` and end with the elapsed
  seconds; nothing else is written, and nothing is kept between tasks.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

AUTO_AFTER_S = 5.0
AUTO_EVERY_S = 1.0


class Progress:
    """Steps of one task: ``step(label)`` after each of `total` steps."""

    def __init__(self, task: str, total: int, mode: Optional[bool] = None, *,
                 stream: Optional[TextIO] = None, after_s: float = AUTO_AFTER_S,
                 every_s: float = AUTO_EVERY_S,
                 clock: Callable[[], float] = time.perf_counter):
        self.task, self.total, self.mode = task, total, mode
        self.stream = stream
        self.after_s, self.every_s, self.clock = after_s, every_s, clock
        self.started = clock()
        self.done = 0
        self.last_line: Optional[float] = None
        self.lines = 0

    def step(self, label: str = "") -> None:
        self.done += 1
        if self.mode is False:
            return
        now = self.clock()
        elapsed = now - self.started
        if self.mode is None:
            last = self.done == self.total
            if elapsed < self.after_s and not (last and self.lines):
                return
            if not last and self.last_line is not None and now - self.last_line < self.every_s:
                return
        self.last_line = now
        self.lines += 1
        text = f"q3n: {self.task} {self.done}/{self.total}"
        if label:
            text += f" {label}"
        stream = self.stream if self.stream is not None else sys.stderr
        print(f"{text}  {elapsed:.1f} s", file=stream, flush=True)
