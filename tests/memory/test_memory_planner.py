"""The arena planner on synthetic interval sets: verifier, alignment, the lower bound, random instances."""

import random

import pytest

from q3n_compile.memory.planner import (
    ALIGNMENT,
    Interval,
    PlanError,
    align,
    conflicts,
    live_bytes,
    lower_bound,
    plan,
    verify,
)


def _random_instance(seed, n=400, horizon=200, max_size=1 << 20, mean_life=12, equal=False):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        start = rng.randrange(horizon)
        life = int(rng.expovariate(1 / mean_life))
        size = ALIGNMENT * 4 if equal else align(rng.randint(1, max_size))
        out.append(Interval(f"b{i}", size, start, min(horizon, start + life)))
    return out


def test_verifier_catches_a_planted_overlap():
    intervals = [Interval("a", 512, 0, 4), Interval("b", 512, 3, 6), Interval("c", 512, 7, 9)]
    good = plan(intervals)
    verify(intervals, good.offsets, good.arena_bytes)
    # a and b are alive together at 3..4: same offset is an overlap; c reuses a's bytes legally.
    with pytest.raises(PlanError, match="a .* and b .* overlap|b .* and a .* overlap"):
        verify(intervals, [0, 256, 0])
    verify(intervals, [0, 512, 0])
    # A planted overlap inside a large valid plan is found too.
    big = _random_instance(1, n=300)
    placed = plan(big, time_budget_s=0.05)
    verify(big, placed.offsets, placed.arena_bytes)
    conf = conflicts(big)
    i = next(i for i in range(len(big)) if conf[i])
    bad = list(placed.offsets)
    bad[i] = placed.offsets[conf[i][0]]
    with pytest.raises(PlanError, match="overlap"):
        verify(big, bad, placed.arena_bytes)


def test_verifier_checks_alignment_and_bounds():
    intervals = [Interval("a", 512, 0, 1), Interval("b", 256, 2, 3)]
    with pytest.raises(PlanError, match="multiple of 256"):
        verify(intervals, [0, 100])
    with pytest.raises(PlanError, match="outside the arena"):
        verify(intervals, [0, 512], arena_bytes=512)
    with pytest.raises(PlanError, match="2 offsets for 1"):
        verify(intervals[:1], [0, 0])


def test_alignment():
    assert [align(n) for n in (0, 1, 255, 256, 257, 1000)] == [0, 256, 256, 256, 512, 1024]
    intervals = [Interval(f"b{i}", align(7 + 300 * i), i, i + 3) for i in range(20)]
    placed = plan(intervals)
    assert all(off % ALIGNMENT == 0 for off in placed.offsets)
    assert placed.arena_bytes % ALIGNMENT == 0
    verify(intervals, placed.offsets, placed.arena_bytes)


def test_lower_bound_and_live_bytes():
    intervals = [Interval("a", 256, 0, 2), Interval("b", 512, 2, 3), Interval("c", 1024, 3, 3),
                 Interval("d", 256, 4, 4)]
    # time 2: a + b; time 3: b + c (a ended at 2, inclusive).
    assert live_bytes(intervals) == [256, 256, 768, 1536, 256]
    assert lower_bound(intervals) == 1536
    assert lower_bound([]) == 0


@pytest.mark.parametrize("seed", range(4))
def test_reaches_the_lower_bound_when_sizes_are_equal(seed):
    """Equal sizes: an interval graph's colouring, where placing by start time is optimal."""
    intervals = _random_instance(seed, n=300, equal=True)
    placed = plan(intervals, time_budget_s=0.2)
    verify(intervals, placed.offsets, placed.arena_bytes)
    assert placed.arena_bytes == lower_bound(intervals)


def test_reaches_the_lower_bound_on_a_layered_pattern():
    """What a transformer's layers look like: a long-lived residual, per-layer temporaries."""
    intervals = [Interval("residual", 4096, 0, 99)]
    for layer in range(10):
        t = layer * 10
        intervals += [
            Interval(f"norm{layer}", 4096, t, t + 3),
            Interval(f"qkv{layer}", 12288, t + 1, t + 4),
            Interval(f"attn{layer}", 4096, t + 4, t + 5),
            Interval(f"up{layer}", 16384, t + 6, t + 8),
            Interval(f"act{layer}", 8192, t + 8, t + 9),
        ]
    placed = plan(intervals)
    verify(intervals, placed.offsets, placed.arena_bytes)
    assert placed.arena_bytes == lower_bound(intervals)


@pytest.mark.parametrize("seed", range(3))
def test_large_random_instances_are_near_the_lower_bound(seed):
    intervals = _random_instance(100 + seed, n=500)
    # A fixed number of tries rather than a time budget: the same result on any machine.
    placed = plan(intervals, time_budget_s=0.0, min_trials=40)
    verify(intervals, placed.offsets, placed.arena_bytes)
    ratio = placed.arena_bytes / lower_bound(intervals)
    print(f"random instance {seed}: {len(intervals)} buffers, arena/L = {ratio:.4f} ({placed.strategy}, "
          f"{placed.tried} orders)")
    assert placed.ratio == pytest.approx(ratio)
    assert 1.0 <= ratio <= 1.1


def test_plan_is_deterministic_and_uses_hints():
    intervals = _random_instance(7, n=200)
    a = plan(intervals, time_budget_s=0.0, min_trials=20)
    b = plan(intervals, time_budget_s=0.0, min_trials=20)
    assert a.offsets == b.offsets and a.arena_bytes == b.arena_bytes
    hinted = plan(intervals, time_budget_s=0.0, hint_order=a.order)
    assert hinted.arena_bytes <= a.arena_bytes


def test_empty_and_zero_sized():
    assert plan([]).arena_bytes == 0
    intervals = [Interval("z", 0, 0, 5), Interval("a", 256, 0, 5)]
    placed = plan(intervals)
    verify(intervals, placed.offsets, placed.arena_bytes)
    assert placed.arena_bytes == 256
