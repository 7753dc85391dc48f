"""The `attention` pass: Attention → q3n::attention (tiled; decode split-KV; optional block-sparse).

Not built yet: this placeholder leaves the graph untouched and reports "not implemented", so an
option that asks for it is visible in the report rather than silently ignored.
"""

from .base import not_built

run = not_built
