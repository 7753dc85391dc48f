"""Triton helpers the attention kernels share (prefill, split-KV decode, block-sparse).

What this module guarantees: :func:`load_2d` loads a 2-D tile through ``ptrs`` with ``other=0``
wherever a row or column predicate is requested, and emits no predicate where the caller proved
the tile full, so full tiles load unpredicated.
"""

import triton
import triton.language as tl


@triton.jit
def load_2d(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    # Masks are only emitted where a tail (or a skipped key) can exist.
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x
