"""GPTQ's column loop inside one block of columns, as one kernel launch instead of a dozen torch
ops a column (:func:`q3n_compile.quant.algorithms.gptq`).

Why: GPTQ quantizes a weight one input column at a time, each column's rounding error spread over
the columns after it, so its inner loop is sequential over the columns; in torch every column
costs about 12 small ops (~10 us of launch each on a GPU). On an H200 that loop was most of a
calibrated compile: about 55 s of the quantize pass's 81 s for qwen3 "bench" with every linear
W8A8 (cProfile, session 33: 44 s in the loop, 11 s in its rounding calls; 172,200 columns over 33
GPTQ runs), 0.65 s of a 4096 x 4096 layer's 0.85 s. With this kernel that layer takes 0.31 s and
the pass 15-18 s (bench/RESULTS.md, session 33). The loop is independent across output
rows, so one program holds ``BLOCK_N`` rows of the block's columns in registers and walks the
columns itself.

Math, for rows n of the block's columns ``W1 [N, C]`` (C <= 128, the columns in GPTQ's order),
``Hinv1 [C, C]`` (the block of the upper Cholesky factor of the damped inverse Hessian), and
columns ``j`` from J0 to J1 - 1, with ``g = G[j]`` the group of column j::

    q       = clamp(round(W1[n, j] / S[g, n]) + Z[g, n], 0, QMAX)      -> CODES[n, j]
    e       = (W1[n, j] - (q - Z[g, n]) * S[g, n]) / Hinv1[j, j]       -> ERR[n, j]
    W1[n, c] -= e * Hinv1[j, c]                            for c >= j  (W1 written back)

Rounding: every step rounds once, as the torch ops of :func:`reference` do (division correctly
rounded, round to nearest with ties to even, no fused multiply-add: the launch turns Triton's
FMA contraction off), so on a GPU the kernel gives the reference's results bit for bit (a GPU
test checks it; under the interpreter the CPU lane checks it too). The group parameters S, Z of
a group must be final before its first column: the caller launches over spans of columns whose
groups are ready.

Traffic: W1 and ERR read and written once a launch, Hinv1's rows J0..J1 read once a program
(L2), CODES' block written; negligible next to the loop it replaces.

Not a ``q3n::`` op: it runs at compile time inside the quantize pass, never in a graph. Where it
runs: CUDA tensors only (:func:`gptq_columns`); on the CPU GPTQ keeps the torch loop
(:func:`reference`), since the interpreter walks programs one after another and would be slower
than the vectorised torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from q3n_compile.kernels import contract

# 1.5 * 2^23: (v + c) - c rounds a float32 |v| < 2^22 to nearest, ties to even (the interpreter
# has no rint); larger |v| (a weight 2^22 steps from its scale) is clamped to 0 or QMAX either way.
_RINT = tl.constexpr(12582912.0)
BLOCK_C = 128  # the widest block of columns GPTQ hands over (algorithms.GPTQ_BLOCK)
BLOCK_N = 32


# The span's ends change with every launch (a group's search cuts the block anywhere; and the
# last block's width C is K's remainder): not specialised, so one compiled variant serves them all
# instead of one per "== 1" / "% 16" class of each (each a compile of ~0.5 s on first use).
@triton.jit(do_not_specialize=["C", "J0", "J1"])
def gptq_columns_kernel(W1, ERR, CODES, HINV, S, Z, G, N, C, J0, J1,
                        stride_w, stride_e, stride_q, stride_hr, stride_hc,
                        QMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns J0..J1 - 1 of GPTQ's block for rows [pid * BLOCK_N, +BLOCK_N): see the module
    docstring. S, Z: [groups, N] float32; G: [C] int32, the group of each column."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < N
    tile_mask = rmask[:, None] & (cols < C)[None, :]
    w = tl.load(W1 + rows[:, None] * stride_w + cols[None, :], mask=tile_mask, other=0.0)
    err = tl.load(ERR + rows[:, None] * stride_e + cols[None, :], mask=tile_mask, other=0.0)
    for j in range(J0, J1):
        here = (cols == j)[None, :]
        wc = tl.sum(tl.where(here, w, 0.0), axis=1)  # one nonzero term: exact
        g = tl.load(G + j)
        s = tl.load(S + g * N + rows, mask=rmask, other=1.0)
        z = tl.load(Z + g * N + rows, mask=rmask, other=0.0)
        r = tl.math.div_rn(wc, s)
        q = tl.minimum(tl.maximum(((r + _RINT) - _RINT) + z, 0.0), QMAX)
        tl.store(CODES + rows * stride_q + j, q, mask=rmask)
        e = tl.math.div_rn(wc - (q - z) * s, tl.load(HINV + j * (stride_hr + stride_hc)))
        later = (cols >= j) & (cols < C)
        h = tl.load(HINV + j * stride_hr + cols * stride_hc, mask=later, other=0.0)
        w = tl.where(later[None, :], w - e[:, None] * h[None, :], w)
        err = tl.where(here, e[:, None], err)
    tl.store(W1 + rows[:, None] * stride_w + cols[None, :], w, mask=tile_mask)
    tl.store(ERR + rows[:, None] * stride_e + cols[None, :], err, mask=tile_mask)


def reference(w1: torch.Tensor, err1: torch.Tensor, codes: torch.Tensor, hinv1: torch.Tensor,
              scales: torch.Tensor, zeros: torch.Tensor, groups: list[int], j0: int, j1: int,
              bits: int) -> None:
    """The torch loop (GPTQ's as it always ran): the same in-place updates as the kernel."""
    qmax = (1 << bits) - 1
    for i in range(j0, j1):
        s, z = scales[groups[i]], zeros[groups[i]]
        wc = w1[:, i]
        q = torch.clamp(torch.round(wc / s) + z, 0, qmax)
        codes[:, i] = q
        e = (wc - (q - z) * s) / hinv1[i, i]
        w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
        err1[:, i] = e


def supports(w1: torch.Tensor) -> str | None:
    """None where :func:`gptq_columns` runs the kernel, else why the torch loop runs."""
    if contract.backend_for(w1.device) != "triton":
        return "not a CUDA tensor (the torch loop runs on the CPU)"
    if w1.shape[1] > BLOCK_C:
        return f"a block of {w1.shape[1]} columns (the kernel takes at most {BLOCK_C})"
    return None


def launch(w1: torch.Tensor, err1: torch.Tensor, codes: torch.Tensor, hinv1: torch.Tensor,
           scales: torch.Tensor, zeros: torch.Tensor, groups_dev: torch.Tensor, j0: int, j1: int,
           bits: int) -> None:
    """The kernel over columns j0..j1 - 1 (also under the interpreter: the CPU lane's test).
    `w1`, `err1`, `codes` (float32, columns unit-stride) are updated in place; `hinv1` may have
    any strides (GPTQ's factor is column-major); `groups_dev` is the int32 group of each column,
    on their device."""
    n, c = w1.shape
    for t in (w1, err1, codes):
        if t.stride(1) != 1 or t.dtype != torch.float32:
            raise ValueError("gptq_columns: float32 tensors with unit-stride columns expected")
    if hinv1.dtype != torch.float32:
        raise ValueError("gptq_columns: a float32 Hinv1 expected")
    if not (scales.is_contiguous() and zeros.is_contiguous()):
        raise ValueError("gptq_columns: contiguous [groups, N] scales and zero points expected")
    gptq_columns_kernel[(contract.cdiv(n, BLOCK_N),)](
        w1, err1, codes, hinv1, scales, zeros, groups_dev, n, c, j0, j1,
        w1.stride(0), err1.stride(0), codes.stride(0), hinv1.stride(0), hinv1.stride(1),
        QMAX=float((1 << bits) - 1), BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, num_warps=4,
        enable_fp_fusion=False)


def gptq_columns(w1: torch.Tensor, err1: torch.Tensor, codes: torch.Tensor, hinv1: torch.Tensor,
                 scales: torch.Tensor, zeros: torch.Tensor, groups: list[int],
                 groups_dev: torch.Tensor, j0: int, j1: int, bits: int) -> None:
    """Columns j0..j1 - 1 of one GPTQ block, in place: the kernel on CUDA, else the torch loop.
    `groups` (host) and `groups_dev` (int32, w1's device) give each column's group."""
    if supports(w1) is None:
        launch(w1, err1, codes, hinv1, scales, zeros, groups_dev, j0, j1, bits)
    else:
        reference(w1, err1, codes, hinv1, scales, zeros, groups, j0, j1, bits)
