"""q3n's memory plan: liveness with aliasing, arena offsets, the planned executor, CUDA graphs.

- :mod:`.liveness` — storages, aliases and lifetimes over an ATen FX graph; per-bucket plans.
- :mod:`.planner` — offsets for intervals in one arena (best fit, improved toward the lower bound)
  and the verifier.
- :mod:`.writers` — how a node writes into given memory (``out=`` overloads, hand-written writers).
- :mod:`.arena_runtime` — the generated planned code, arena pools, buckets, CUDA graphs.
- :mod:`.timeline` — the plan as text and as a PNG timeline.
"""
