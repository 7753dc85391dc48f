"""Triton helpers the kernels share (attention: prefill, split-KV decode, block-sparse; the
norm statistics of norm_linear and norm_act_quant).

What this module guarantees: :func:`load_2d` loads a 2-D tile through ``ptrs`` with ``other=0``
wherever a row or column predicate is requested, and emits no predicate where the caller proved the
tile full, so full tiles load unpredicated. :func:`first_tile_mean` is the float32 mean of each
row's first tile, the centre of every one-pass LayerNorm statistic in this package.
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


@triton.jit
def first_tile_mean(ptrs, mask, n):
    """The mean (fp32) of the [rows, BLOCK_K] tile at `ptrs` over its `n` valid columns (`mask`
    selects them; masked elements count as 0): the centre c that one-pass LayerNorm statistics
    subtract, s1 = sum(x - c), s2 = sum((x - c)^2), var = s2/K - (s1/K)^2.

    Why not the row's first element: the variance then cancels by (1 + (x0 - mean)^2 / var), 10x
    for a 3-sigma first element, which cost 3e-5 relative error in fp32 at M = 2048 on the H200;
    a tile's mean is within ~std / sqrt(BLOCK_K) of the row's. And x - c stays exact in fp32 when
    |mean| >> std (x and c within a factor 2: Sterbenz), which is when exactness matters.
    """
    first = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return tl.sum(first, 1) / n
