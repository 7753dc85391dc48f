"""Offsets for buffers with known lifetimes in one arena: greedy best fit, improved toward the bound.

The problem: buffers ``i`` with a size ``size_i`` (bytes) and a lifetime ``[start_i, end_i]``
(node positions, inclusive at both ends) get offsets in one arena such that two buffers alive at
the same time never overlap in ``[offset, offset + size)``; the arena is as small as possible.

- The lower bound ``L`` is the largest sum of sizes alive at one time (:func:`lower_bound`): no
  placement can do better, and when every buffer has the same size (interval-graph colouring)
  placing in order of start time reaches it exactly.
- :func:`plan` places buffers one at a time in a given order, each into the smallest gap left
  between the already placed buffers it conflicts with (best fit; first fit is tried too), and
  tries several orders: by size (the classic "greedy by size"), by breadth (the crowdedness of the
  busiest moment of a buffer's life), by start time, by size × lifetime; then, within a time cap,
  randomised restarts and moves of the buffers that define the arena's top. It stops early once
  the arena equals ``L``. Deterministic for a given seed.
- :func:`verify` proves a placement right: alignment, bounds, and no two buffers alive at the same
  time overlap. It raises :class:`PlanError` naming the two buffers if they do.

Pure Python on integers; nothing here knows about FX or torch.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Sequence

ALIGNMENT = 256


class PlanError(AssertionError):
    """A placement breaks the arena's rules (overlap of live buffers, alignment, bounds)."""


@dataclasses.dataclass(frozen=True)
class Interval:
    """One buffer: `size` bytes alive from node position `start` to `end`, both inclusive."""

    name: str
    size: int
    start: int
    end: int


@dataclasses.dataclass
class Placement:
    offsets: list[int]
    arena_bytes: int
    lower_bound_bytes: int
    # The order that gave the best arena (indices into the intervals), reusable as a hint.
    order: list[int]
    strategy: str
    tried: int
    time_s: float

    @property
    def ratio(self) -> float:
        return self.arena_bytes / self.lower_bound_bytes if self.lower_bound_bytes else 1.0


def align(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-int(n) // alignment) * alignment


def lower_bound(intervals: Sequence[Interval]) -> int:
    """The largest sum of sizes alive at one time."""
    events: list[tuple[int, int]] = []
    for iv in intervals:
        if iv.size:
            events.append((iv.start, iv.size))
            events.append((iv.end + 1, -iv.size))
    # At one time step, buffers ending before it (their end + 1) leave before new ones arrive.
    events.sort(key=lambda e: (e[0], e[1]))
    live = best = 0
    for _, delta in events:
        live += delta
        best = max(best, live)
    return best


def live_bytes(intervals: Sequence[Interval]) -> list[int]:
    """Bytes alive at each time step 0..max end (for pictures and breadth)."""
    if not intervals:
        return []
    horizon = max(iv.end for iv in intervals) + 2
    delta = [0] * (horizon + 1)
    for iv in intervals:
        delta[iv.start] += iv.size
        delta[iv.end + 1] -= iv.size
    out, live = [], 0
    for t in range(horizon - 1):
        live += delta[t]
        out.append(live)
    return out


def conflicts(intervals: Sequence[Interval]) -> list[list[int]]:
    """For each buffer, the buffers whose lifetimes overlap its own (sweep over start times)."""
    n = len(intervals)
    result: list[list[int]] = [[] for _ in range(n)]
    by_start = sorted(range(n), key=lambda i: intervals[i].start)
    active: list[int] = []
    for i in by_start:
        s = intervals[i].start
        active = [j for j in active if intervals[j].end >= s]
        for j in active:
            result[i].append(j)
            result[j].append(i)
        active.append(i)
    return result


def _place(order: Sequence[int], sizes: Sequence[int], conf: Sequence[Sequence[int]],
           best_fit: bool) -> tuple[list[int], int]:
    offsets = [-1] * len(sizes)
    arena = 0
    for i in order:
        size = sizes[i]
        occupied = sorted((offsets[j], offsets[j] + sizes[j]) for j in conf[i]
                          if offsets[j] >= 0 and sizes[j])
        cursor, chosen, chosen_gap = 0, -1, None
        for lo, hi in occupied:
            if lo > cursor:
                gap = lo - cursor
                if gap >= size:
                    if not best_fit:
                        chosen = cursor
                        break
                    if chosen_gap is None or gap < chosen_gap:
                        chosen, chosen_gap = cursor, gap
            if hi > cursor:
                cursor = hi
        if chosen < 0:
            chosen = cursor
        offsets[i] = chosen
        if chosen + size > arena:
            arena = chosen + size
    return offsets, arena


def plan(
    intervals: Sequence[Interval],
    *,
    time_budget_s: float = 0.25,
    seed: int = 0,
    hint_order: Sequence[int] | None = None,
    min_trials: int = 0,
) -> Placement:
    """Offsets for `intervals` (sizes must already be multiples of the alignment).

    Runs every heuristic order once (best fit and first fit), then randomised improvement until
    `time_budget_s` has passed (at least `min_trials` more tries), stopping as soon as the arena
    equals the lower bound. `hint_order` (e.g. the best order found for another bucket of the same
    graph) is tried first.
    """
    started = time.perf_counter()
    n = len(intervals)
    bound = lower_bound(intervals)
    if n == 0:
        return Placement([], 0, 0, [], "empty", 0, 0.0)
    sizes = [iv.size for iv in intervals]
    conf = conflicts(intervals)
    length = [iv.end - iv.start + 1 for iv in intervals]
    live = live_bytes(intervals)
    breadth = [max(live[iv.start: iv.end + 1]) for iv in intervals]

    orders: list[tuple[str, list[int]]] = []
    if hint_order is not None and sorted(hint_order) == list(range(n)):
        orders.append(("hint", list(hint_order)))
    idx = range(n)
    orders += [
        ("size", sorted(idx, key=lambda i: (-sizes[i], intervals[i].start, i))),
        ("breadth", sorted(idx, key=lambda i: (-breadth[i], -sizes[i], intervals[i].start, i))),
        ("start", sorted(idx, key=lambda i: (intervals[i].start, -sizes[i], i))),
        ("area", sorted(idx, key=lambda i: (-sizes[i] * length[i], i))),
        ("length", sorted(idx, key=lambda i: (-length[i], -sizes[i], i))),
    ]
    best: tuple[int, list[int], list[int], str] | None = None
    tried = 0

    def consider(name: str, order: list[int], best_fit: bool) -> bool:
        nonlocal best, tried
        offsets, arena = _place(order, sizes, conf, best_fit)
        tried += 1
        if best is None or arena < best[0]:
            best = (arena, offsets, order, f"{name}/{'best' if best_fit else 'first'}-fit")
        return best[0] <= bound

    done = False
    for name, order in orders:
        for best_fit in (True, False):
            if consider(name, order, best_fit):
                done = True
                break
        if done:
            break

    rng = random.Random(seed)
    extra = 0
    while not done and (time.perf_counter() - started < time_budget_s or extra < min_trials):
        extra += 1
        arena, offsets, order, _ = best
        if rng.random() < 0.5:
            # Move one of the buffers that reach the arena's top (or a random one) earlier.
            top = [i for i in range(n) if offsets[i] + sizes[i] > bound] or list(range(n))
            victim = rng.choice(top)
            new = [i for i in order if i != victim]
            new.insert(rng.randrange(0, max(1, order.index(victim) + 1)), victim)
            name = "move"
        else:
            # Greedy by size or breadth with noisy keys: a randomised restart.
            base = breadth if rng.random() < 0.5 else sizes
            noise = [rng.uniform(0.75, 1.25) for _ in range(n)]
            new = sorted(range(n), key=lambda i: (-base[i] * noise[i], -sizes[i], i))
            name = "random"
        if consider(name, new, rng.random() < 0.8):
            done = True

    arena, offsets, order, strategy = best
    return Placement(
        offsets=offsets,
        arena_bytes=arena,
        lower_bound_bytes=bound,
        order=list(order),
        strategy=strategy,
        tried=tried,
        time_s=time.perf_counter() - started,
    )


def verify(
    intervals: Sequence[Interval],
    offsets: Sequence[int],
    arena_bytes: int | None = None,
    alignment: int = ALIGNMENT,
) -> None:
    """Raise :class:`PlanError` unless the placement is valid.

    Valid: one offset per buffer, each a non-negative multiple of `alignment`, inside the arena,
    and no two buffers whose lifetimes overlap share a byte.
    """
    if len(offsets) != len(intervals):
        raise PlanError(f"{len(offsets)} offsets for {len(intervals)} buffers")
    for iv, off in zip(intervals, offsets):
        if off < 0 or off % alignment:
            raise PlanError(f"buffer {iv.name}: offset {off} is not a non-negative multiple of {alignment}")
        if iv.size < 0 or iv.start > iv.end:
            raise PlanError(f"buffer {iv.name}: bad size {iv.size} or lifetime [{iv.start}, {iv.end}]")
        if arena_bytes is not None and off + iv.size > arena_bytes:
            raise PlanError(f"buffer {iv.name}: [{off}, {off + iv.size}) is outside the arena of {arena_bytes} bytes")
    order = sorted(range(len(intervals)), key=lambda i: intervals[i].start)
    active: list[int] = []
    for i in order:
        a = intervals[i]
        active = [j for j in active if intervals[j].end >= a.start]
        lo, hi = offsets[i], offsets[i] + a.size
        if a.size:
            for j in active:
                b = intervals[j]
                if b.size and lo < offsets[j] + b.size and offsets[j] < hi:
                    raise PlanError(
                        f"buffers {b.name} [{offsets[j]}, {offsets[j] + b.size}) alive {b.start}..{b.end} "
                        f"and {a.name} [{lo}, {hi}) alive {a.start}..{a.end} overlap"
                    )
        active.append(i)
