"""The `norm_linear` pass: LayerNorm/RMSNorm → following linear(s) as q3n::norm_linear (γ/β folded).

Not built yet: this placeholder leaves the graph untouched and reports "not implemented", so an
option that asks for it is visible in the report rather than silently ignored.
"""

from .base import not_built

run = not_built
