"""Triton helpers the kernels share (attention: prefill, split-KV decode, block-sparse; the
norm statistics of norm_linear and norm_act_quant).

What this module guarantees: :func:`load_2d` loads a 2-D tile through ``ptrs`` with ``other=0``
wherever a row or column predicate is requested, and emits no predicate where the caller proved the
tile full, so full tiles load unpredicated. :func:`first_tile_mean` is the float32 mean of each
row's first tile, the centre of every one-pass LayerNorm statistic in this package.
:func:`ticket_split_k` finishes a split-K GEMM in the same launch: Y holds the split-order sum of
every split's fp32 partial tile, and each tile's ticket is back at 0 after the call.
:func:`grouped_tile` maps a program to its (row block, column block) so that every tile is
visited exactly once.
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


@triton.jit
def ticket_split_k(part, Y, y_offs, y_mask, WS, ws_offs, slab, CNT, tile, pid_k, splits):
    """Split-K in one launch: split pid_k of `splits` writes its fp32 partial tile `part` to the
    workspace WS [splits, slab] (at pid_k * slab + ws_offs); the last split of the tile to
    arrive (a ticket per output tile, CNT[tile], int32, 0 between calls) sums the partials in
    split order (deterministic), stores Y[y_offs] in Y's dtype and resets its ticket to 0 for the
    next call."""
    tl.store(WS + pid_k * slab + ws_offs, part, mask=y_mask)
    tl.debug_barrier()  # every thread's partial is written before the ticket is taken
    cnt = CNT + tile
    ticket = tl.atomic_add(cnt, 1, sem="acq_rel")
    if ticket == splits - 1:
        total = tl.zeros_like(part)
        for s in range(0, splits):
            # .cg: from L2, never a line this SM's L1 kept from an earlier call
            total += tl.load(WS + s * slab + ws_offs, mask=y_mask, other=0.0,
                             cache_modifier=".cg")
        tl.store(Y + y_offs, total.to(Y.dtype.element_ty), mask=y_mask)
        tl.atomic_xchg(cnt, 0)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` over cdiv(M, BLOCK_M) x cdiv(N, BLOCK_N) tiles, in groups
    of GROUP_M row blocks per column block: consecutive programs share a column block (the
    weight tile), so they read it close together, from L2."""
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    rows_here = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows_here, (pid % per_group) // rows_here
