"""What every pass shares: the stats it returns and the context it is given.

A pass is a plain function ``(gm, ctx: PassContext) -> PassStats``; it edits `gm` in place and
says what it found (`matched`), what it replaced (`rewritten`) and, by reason, what it declined.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Sequence

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import Q3NConfig
from ..report import PASS_STATUSES


@dataclasses.dataclass
class PassStats:
    """What one pass did. `declined` counts candidates found but left alone, by reason."""

    status: str = "applied"
    matched: int = 0
    rewritten: int = 0
    declined: Counter = dataclasses.field(default_factory=Counter)
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)

    def decline(self, reason: str) -> None:
        self.matched += 1
        self.declined[reason] += 1

    def to_json(self, time_s: float) -> dict[str, Any]:
        if self.status not in PASS_STATUSES:
            raise ValueError(f"pass status {self.status!r} is not one of {PASS_STATUSES}")
        return {
            "status": self.status,
            "matched": int(self.matched),
            "rewritten": int(self.rewritten),
            "time_s": round(time_s, 6),
            "declined": dict(self.declined),
            "detail": self.detail,
        }


@dataclasses.dataclass
class PassContext:
    """What a pass may know beyond the graph.

    Passes run outside the fake mode, so they can compute on real weights; `fake_mode` is there
    for the FakeTensor values of the nodes they create.

    `static_values` maps placeholder names to the real tensors of parameters and buffers: q3n
    treats weights as constants at compile time (as Inductor's freezing does). A pass that folds a
    weight's value into the graph calls :meth:`freeze`, and the runtime then refuses to run if that
    weight is later changed in place.
    """

    config: Q3NConfig
    graph_id: int
    inference: bool
    example_inputs: Sequence[Any]
    static_values: dict[str, torch.Tensor]
    frozen: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # The first call's real inputs, aligned with the placeholders (SymInts as their values), kept
    # only while compiling and only when a pass needs data (calibration) or verify=True is on.
    real_inputs: Sequence[Any] | None = None

    @property
    def fake_mode(self) -> FakeTensorMode | None:
        """The capture's fake mode: enter it to compute a new node's ``meta["val"]``."""
        return detect_fake_mode(self.example_inputs)

    def freeze(self, placeholder: torch.fx.Node) -> torch.Tensor:
        """The real value of a parameter/buffer placeholder, recorded as folded into the graph."""
        value = self.static_values.get(placeholder.name)
        if value is None:
            raise KeyError(f"{placeholder.name} is not a parameter or buffer of the model")
        self.frozen[placeholder.name] = value
        return value


def not_built(gm: torch.fx.GraphModule, ctx: PassContext) -> PassStats:
    """The pass function of a pass that is not built yet: the graph is left as it is."""
    return PassStats(status="not implemented", detail={"reason": "pass not built yet"})
