"""The memory plan as files a person can read: a timeline picture (PNG) and the plan as text.

The picture has time (node position) left to right and arena offset bottom to top; each arena
buffer is a filled rectangle over its lifetime and its bytes (in-place chains are one rectangle).
A red line marks the lower bound L, a black step line the bytes alive at each moment (what any
plan must hold), and the picture's top is the arena's size. Written with zlib and struct only
(no matplotlib), so dumps work on any machine.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

from . import planner
from .liveness import BucketPlan, MemorySpec


def _png(width: int, height: int, rgb: bytearray) -> bytes:
    raw = bytearray()
    row = width * 3
    for y in range(height):
        raw.append(0)  # filter: none
        raw += rgb[y * row:(y + 1) * row]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(raw), 6)) + chunk(b"IEND", b"")


def _colour(i: int) -> tuple[int, int, int]:
    # Golden-ratio hues, light enough for the black profile line to show over them.
    h = (i * 0.61803398875) % 1.0
    r, g, b = (abs(((h * 6 + k) % 6) - 3) - 1 for k in (0, 4, 2))
    clamp = lambda x: max(0.0, min(1.0, x))  # noqa: E731
    return tuple(int(90 + 150 * clamp(c)) for c in (r, g, b))  # type: ignore[return-value]


def render_png(intervals: list[planner.Interval], offsets: list[int], arena_bytes: int,
               lower_bound_bytes: int, horizon: int, width: int | None = None, height: int = 480) -> bytes:
    """A PNG of `intervals` placed at `offsets`: time × offset, one rectangle per buffer."""
    horizon = max(1, horizon)
    width = width or max(480, min(2400, 6 * horizon))
    margin = 8
    w, h = width - 2 * margin, height - 2 * margin
    top = max(arena_bytes, lower_bound_bytes, 1)
    canvas = bytearray(b"\xff" * (width * height * 3))

    def put(x: int, y: int, c: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            canvas[i:i + 3] = bytes(c)

    def to_x(t: float) -> int:
        return margin + int(round(t * w / horizon))

    def to_y(b: float) -> int:  # offset 0 at the bottom
        return margin + h - int(round(b * h / top))

    def hline(x0: int, x1: int, y: int, c: tuple[int, int, int]) -> None:
        x0, x1 = max(0, x0), min(width, x1)
        if 0 <= y < height and x1 > x0:
            i = (y * width + x0) * 3
            canvas[i:i + 3 * (x1 - x0)] = bytes(c) * (x1 - x0)

    def rect(x0, y0, x1, y1, fill, border) -> None:
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        for y in range(y0, y1):
            if y in (y0, y1 - 1):
                hline(x0, x1, y, border)
            else:
                hline(x0, x1, y, fill)
                put(x0, y, border)
                put(x1 - 1, y, border)

    # frame: the arena
    rect(margin - 1, margin - 1, margin + w + 1, margin + h + 1, (250, 250, 250), (120, 120, 120))
    for i, (iv, off) in enumerate(zip(intervals, offsets)):
        if not iv.size:
            continue
        fill = _colour(i)
        border = tuple(int(c * 0.55) for c in fill)
        rect(to_x(iv.start), to_y(off), to_x(iv.end + 1), to_y(off + iv.size), fill, border)
    # lower bound L
    y_l = to_y(lower_bound_bytes)
    for x in range(margin, margin + w):
        if (x // 4) % 2 == 0:
            put(x, y_l, (220, 30, 30))
            put(x, y_l + 1, (220, 30, 30))
    # bytes alive at each time
    live = planner.live_bytes(intervals)
    prev = None
    for t, b in enumerate(live):
        y = to_y(b)
        for x in range(to_x(t), to_x(t + 1) + 1):
            put(x, y, (0, 0, 0))
        if prev is not None:
            for yy in range(min(prev, y), max(prev, y) + 1):
                put(to_x(t), yy, (0, 0, 0))
        prev = y
    return _png(width, height, canvas)


def plan_png(spec: MemorySpec, plan: BucketPlan, device: str) -> bytes:
    members = [g for g in spec.groups if str(g.device) == device]
    intervals = [planner.Interval(g.name, plan.group_sizes[g.index], g.start, g.end) for g in members]
    return render_png(intervals, [plan.offsets[g.index] for g in members], plan.arena_bytes.get(device, 0),
                      plan.lower_bound_bytes.get(device, 0), horizon=len(spec.order))


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def plan_text(spec: MemorySpec, plan: BucketPlan, extra: dict[str, Any] | None = None) -> str:
    """The plan as a table: every arena buffer, its values, lifetime, size and offset; then what
    was not planned and why."""
    f = plan.figures(spec)
    lines = [
        "q3n memory plan",
        f"symbols: {plan.symbol_values or 'static shapes'}" + (" (exact values)" if plan.exact else ""),
        f"arena {f['arena_bytes']} B ({_mib(f['arena_bytes'])}), lower bound L {f['lower_bound_bytes']} B, "
        f"arena/L {f['ratio']}, naive (no reuse) {f['naive_bytes']} B, unplanned {f['unplanned_bytes']} B, "
        f"outputs {f['output_bytes']} B",
        f"{f['planned_count']} values planned in {f['buffer_count']} buffers ({f['inplace_count']} written in place "
        f"over a dying input), {f['unplanned_count']} unplanned; strategy {f['strategy']}, "
        f"{f['orders_tried']} orders tried in {f['plan_time_s']} s; verified: {f['verified']}",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"{key}: {value}")
    lines += ["", f"{'buffer':<8} {'device':<7} {'offset':>12} {'bytes':>12} {'live':>11}  values (node: op, dtype, shape)"]
    for g in sorted(spec.groups, key=lambda g: (str(g.device), plan.offsets[g.index], g.start)):
        vals = []
        for m in g.members:
            v = spec.values[m]
            shape = "x".join(str(s) for s in v.sizes) or "scalar"
            tag = f" [in place over {v.inplace_of}]" if v.inplace_of else ""
            vals.append(f"{v.node}: {v.op} {str(v.dtype).replace('torch.', '')}[{shape}]{tag}")
        lines.append(f"{g.name:<8} {str(g.device):<7} {plan.offsets[g.index]:>12} {plan.group_sizes[g.index]:>12} "
                     f"{g.start:>5}..{g.end:<5}  " + "; ".join(vals))
    if spec.unplanned:
        lines += ["", "unplanned (allocated as usual):"]
        for u in spec.unplanned:
            lines.append(f"  {u.node}: {u.op} on {u.device}: {u.reason} ({u.nbytes} B)")
    if spec.outputs:
        lines += ["", "graph outputs (never planned):"]
        for u in spec.outputs:
            lines.append(f"  {u.node}: {u.op} ({u.nbytes} B)")
    return "\n".join(lines) + "\n"
