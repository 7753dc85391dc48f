"""The host's Python per call, for the benchmark scripts that look at host-bound steps.

:func:`python_per_call` runs a call n times under cProfile and gives the top functions by own
and by cumulative time in µs a call: pstats' own table rounds to milliseconds, coarser than a
decode step's host time (bench/RESULTS.md, session 13).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def python_per_call(call: Callable[[], object], n: int, top: int) -> dict[str, list[str]]:
    """cProfile of n calls of `call` (no synchronisation between them): {"tottime": lines,
    "cumtime": lines}, each line µs own, µs cumulative and calls, per call, then the function."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        call()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (prim calls, calls, own s, cum s, _)}
    tables = {}
    for key, col in (("tottime", 2), ("cumtime", 3)):
        rows = sorted(stats.items(), key=lambda kv: -kv[1][col])[:top]
        tables[key] = [f"{v[2] / n * 1e6:8.1f} us own {v[3] / n * 1e6:8.1f} us cum "
                       f"{v[1] / n:6.1f} calls  {Path(f).name}:{line}({fn})"
                       for (f, line, fn), v in rows]
    return tables
