"""Progress lines for long compile-time work (q3n_compile.progress), with a fake clock."""

import io

from q3n_compile.progress import Progress


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _run(mode, seconds_per_step, total=6):
    clock, out = Clock(), io.StringIO()
    progress = Progress("quantize", total, mode, stream=out, clock=clock)
    for i in range(total):
        clock.t += seconds_per_step
        progress.step(f"layer{i}")
    return out.getvalue().splitlines()


def test_on_prints_every_step_with_count_label_and_seconds():
    lines = _run(True, 0.01)
    assert lines[0] == "q3n: quantize 1/6 layer0  0.0 s"
    assert lines[-1] == "q3n: quantize 6/6 layer5  0.1 s"
    assert len(lines) == 6


def test_off_never_prints():
    assert _run(False, 10.0) == []


def test_auto_is_silent_for_short_work():
    assert _run(None, 0.5) == []  # 3 s in all: under the 5 s threshold


def test_auto_starts_after_five_seconds():
    # 2 s a step: silent at 2 and 4 s, then every step (each 2 s after the last line).
    lines = _run(None, 2.0)
    assert [line.split()[2] for line in lines] == ["3/6", "4/6", "5/6", "6/6"]
    assert all(line.startswith("q3n: quantize ") and line.endswith(" s") for line in lines)


def test_auto_prints_at_most_a_line_a_second_and_the_last_step():
    # 0.4 s a step: the first line at 5.2 s (13/20), then every 3rd step (1.2 s apart), and the
    # last one.
    lines = _run(None, 0.4, total=20)
    assert [line.split()[2] for line in lines] == ["13/20", "16/20", "19/20", "20/20"]
