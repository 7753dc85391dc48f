"""``q3n::sparse_attention``: block-sparse attention with a measured, on-device fallback to dense.

``torch.ops.q3n.sparse_attention(q, k, v, mask=None, scale=None, is_causal=False, keep=0.2,
min_mass=0.95, graph_id=-1, layer=-1)`` takes the arguments of ``q3n::attention`` (same shapes,
GQA, masks, ``is_causal`` top-left, output in q's dtype) plus the sparsity knobs. Lossy by design.

What this module guarantees:

- Blocks. Queries and keys are cut into blocks of ``block_size(device)`` rows: 64 on CUDA, 16 on
  the CPU (the Triton interpreter and the torch reference use the same 16, so the CPU paths agree
  with each other; the CPU lane's test shapes stay small).
- Selection (per batch, query head, query block ``i``), all on the device, no host sync:
  block scores are ``scale * mean_q(block i) . mean_k(block j)`` (+ the largest mask value in the
  tile, so key blocks a mask removes entirely score -inf); blocks a causal mask removes entirely
  (above the diagonal) are never kept; the first key block and the diagonal block(s) are always
  kept; then the best-scoring blocks fill up to ``ceil(keep * allowed_i)`` blocks in all, where
  ``allowed_i`` is the number of blocks the causal rule leaves (all blocks when not causal);
  what depends only on the shapes (that structure, list lengths, sampled rows) is built once per
  signature and reused, outside CUDA graph captures. The
  "diagonal" is the key block(s) holding key ``row`` (causal, top-left as SDPA) or
  ``row + Sk - Sq`` (not causal: bottom-right, where the newest token of a cache sits).
- Kept mass, and the fallback. On sampled rows (one row in the middle of every few query blocks,
  up to ~16 per head, the last query block always among them) the exact softmax over all keys
  (mask and causality applied; scores in the inputs' dtype with fp32 accumulation) is summed over
  each row's kept blocks. The layer's kept mass is the mean over every sampled row of every batch
  and head. If it is below ``min_mass`` the same launch runs every allowed block instead: the
  result is then dense attention (as ``q3n::attention`` computes it). The decision is a device
  tensor read by the kernel, so there is no sync and the op can be captured in a CUDA graph.
  A row that a mask removes entirely counts as mass 1 (it has no weight to lose).
- Within the kept blocks the kernel computes exactly what ``q3n::attention`` computes (online
  softmax in fp32, masks, the Sk tail, causality; fully masked rows give 0), so
  ``keep=1.0`` gives dense attention up to rounding.
- Short inputs run ``q3n::attention`` (dense, exact): ``Sq <= 16`` (decode) or fewer than
  ``MIN_KEY_BLOCKS`` key blocks; sparsity would save nothing there. They record no statistics.
- Statistics. With ``graph_id >= 0`` each measured call stores, in q3n's report registry
  (:func:`q3n_compile.report.record_sparse_attention`), references to its per-row kept-mass tensor
  and its decision flag under ``(graph_id, layer)``, replacing the previous call's; they are turned
  into floats only when ``q3n_compile.reports()`` is read (``report["runtime"]["sparse_attention"]``).
  Under CUDA graphs a replay runs no Python: the entry is the one stored at capture, whose tensors
  the replays overwrite in place (same memory), so a read shows the latest replay of the last
  captured signature, with the shapes recorded at capture. Not verified on a GPU yet.

Where the three paths (Triton on CUDA, the interpreter, :func:`reference` on CPU) differ: only in
rounding, as for ``q3n::attention``; they make the same selection and the same decision, except
that on bf16/fp16 the sampled scores' rounding may differ between devices, which can flip the
decision of a layer whose mass is within ~1e-3 of the threshold.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from q3n_compile.kernels import contract
from q3n_compile.kernels.tiles import load_2d as _tile

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Below this many key blocks (or at Sq <= DECODE_MAX_Q) the op runs dense attention.
MIN_KEY_BLOCKS = 4
DECODE_MAX_Q = 16
# Rows of each (batch, head) whose kept mass is measured exactly (about; see _sample_rows).
SAMPLED_ROWS = 16
_LOG2E = 1.4426950408889634
_FMAX = 3.4028234663852886e38


def block_size(device: torch.device) -> int:
    """Query/key block of the sparsity pattern: 64 on CUDA, 16 on the CPU (tl.dot's smallest)."""
    return 64 if torch.device(device).type == "cuda" else 16


# --------------------------------------------------------------------------------------------
# The Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _key_block(acc, l_i, m_i, q, k_base, v_base, m_ptrs, offs_m, row_ok, start_n, offs_n0,
               offs_dk, dk_ok, offs_dv, dv_ok, stride_kn, stride_kd, stride_vn, stride_vd,
               stride_mn, Sk, qk_scale,
               EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr, MASK_KIND: tl.constexpr,
               IS_CAUSAL: tl.constexpr, BOUNDARY: tl.constexpr, DOT_PRECISION: tl.constexpr,
               DOT_IN_FP32: tl.constexpr):
    """One online-softmax step over the key block starting at `start_n` (see the kernel)."""
    offs_n = start_n + offs_n0
    n_ok = offs_n < Sk
    k = _tile(k_base + offs_n[:, None] * stride_kn + offs_dk[None, :] * stride_kd,
              n_ok, dk_ok, BOUNDARY, not EVEN_DK)
    if DOT_IN_FP32:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASK_KIND == 1:
        keep = tl.load(m_ptrs + offs_n[None, :] * stride_mn,
                       mask=row_ok[:, None] & n_ok[None, :], other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    elif MASK_KIND == 2:
        add = tl.load(m_ptrs + offs_n[None, :] * stride_mn,
                      mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        # finfo.min * log2(e) would overflow to -inf and turn HF's "masked" rows into fully masked
        # ones (0 instead of SDPA's uniform average); a true -inf stays -inf. (As q3n::attention.)
        add = tl.where(add == float("-inf"), add,
                       tl.maximum(add * 1.4426950408889634, -3.4028234663852886e38))
        s = s + add
    if BOUNDARY:
        valid = n_ok[None, :]
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = m_new
    if MASK_KIND != 0:
        # A row with no key left so far has m_new = -inf; exp2(-inf - -inf) would be NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _tile(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
              n_ok, dv_ok, BOUNDARY, not EVEN_DV)
    p = p.to(v.dtype)
    if DOT_IN_FP32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def sparse_attention_fwd_kernel(
    Q, K, V, M, O, IDX, CNT, DENSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_ib, stride_ih, stride_iq,
    Sq, Sk, n_kblocks, qk_scale,
    GROUP: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr,
):
    """One program computes O for the BLOCK query rows of query block i of one (batch, head),
    visiting only the key blocks listed for it.

    Lists: IDX[b, h, i, :CNT[i]] are the kept key-block indices in ascending order; DENSE (one
    int32 on the device) != 0 replaces every list by all allowed blocks 0..allowed_i - 1
    (allowed_i = min(n_kblocks, i + 1) causal, n_kblocks otherwise). Ascending order puts the only
    blocks that need the causal/Sk-tail predicates (the diagonal block and the last key block,
    each the largest allowed index when present) last: every step but the last runs unmasked.

    Math per visited key block n, with c = scale * log2(e): s = c * q k_n^T (+ log2(e) * mask, or
    -inf where a bool mask/causality/the Sk tail removes a key); m' = max(m, rowmax s);
    p = exp2(s - m'); l = l * exp2(m - m') + rowsum p; acc = acc * exp2(m - m') + p v_n; finally
    O = acc / l (0 where l = 0). Same rounding as q3n::attention: m, l, acc and both products'
    accumulation in fp32, p rounded to V's dtype for the second product, fp32 inputs use IEEE
    products, O rounded once. DOT_IN_FP32 (interpreter, bf16) widens operands for exact products.

    Traffic: reads Q and writes O once (B*Hq*Sq*D*e each); reads K and V once per kept
    (query block, key block) pair, B*Hq*sum_i(n_i)*BLOCK*(D+Dv)*e, about keep * the dense kernel's
    (GROUP heads sharing a kv head mostly hit L2); the lists, B*Hq*nQ*kmax*4 bytes.
    FLOPs: 4*BLOCK^2*D per kept pair, i.e. about keep * the dense count.
    """
    qb = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    off_hkv = off_h // GROUP
    start_m = qb * BLOCK
    offs_m = start_m + tl.arange(0, BLOCK)
    offs_n0 = tl.arange(0, BLOCK)
    if OFFSETS_64:
        offs_m = offs_m.to(tl.int64)
        offs_n0 = offs_n0.to(tl.int64)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq
    dk_ok = offs_dk < HEAD_DK
    dv_ok = offs_dv < HEAD_DV
    EVEN_DK: tl.constexpr = BLOCK_DK == HEAD_DK
    EVEN_DV: tl.constexpr = BLOCK_DV == HEAD_DV

    q = _tile(Q + off_b * stride_qb + off_h * stride_qh
              + offs_m[:, None] * stride_qm + offs_dk[None, :] * stride_qd,
              row_ok, dk_ok, True, not EVEN_DK)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh
    m_ptrs = M + off_b * stride_mb + off_h * stride_mh + offs_m[:, None] * stride_mm

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_DV], dtype=tl.float32)

    sparse = tl.load(DENSE) == 0
    if IS_CAUSAL:
        allowed = tl.minimum(n_kblocks, qb + 1)
    else:
        allowed = n_kblocks
    n = tl.where(sparse, tl.load(CNT + qb), allowed)
    idx = IDX + off_b * stride_ib + off_h * stride_ih + qb * stride_iq
    for j in range(0, n - 1):
        blk = tl.where(sparse, tl.load(idx + j, mask=sparse, other=0), j)
        acc, l_i, m_i = _key_block(
            acc, l_i, m_i, q, k_base, v_base, m_ptrs, offs_m, row_ok, blk * BLOCK, offs_n0,
            offs_dk, dk_ok, offs_dv, dv_ok, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
            Sk, qk_scale, EVEN_DK, EVEN_DV, MASK_KIND, IS_CAUSAL, False, DOT_PRECISION,
            DOT_IN_FP32)
    last = n - 1
    blk = tl.where(sparse, tl.load(idx + last, mask=sparse, other=0), last)
    acc, l_i, m_i = _key_block(
        acc, l_i, m_i, q, k_base, v_base, m_ptrs, offs_m, row_ok, blk * BLOCK, offs_n0,
        offs_dk, dk_ok, offs_dv, dv_ok, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        Sk, qk_scale, EVEN_DK, EVEN_DV, MASK_KIND, IS_CAUSAL, True, DOT_PRECISION, DOT_IN_FP32)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = (O + off_b * stride_ob + off_h * stride_oh
              + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)
    if EVEN_DV:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


# --------------------------------------------------------------------------------------------
# Selection and kept mass (torch ops on the device; shapes decide every Python value)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Selection:
    """What one call chose. All tensors stay on the inputs' device.

    idx: [B, Hq, nQ, kmax] int32, per query block the kept key blocks ascending, then filler;
    counts: [nQ] int32, how many entries of each list are kept (the same for every batch/head);
    allowed: [nQ] int64, how many key blocks causality leaves (what dense visits);
    mass_rows: [B, Hq, R] float32, kept mass of each sampled row; rows: their query indices;
    mass: 0-d float32, the mean of mass_rows; dense: 0-d int32, 1 when mass < min_mass.
    """

    block: int
    n_k: int  # key blocks
    idx: torch.Tensor
    counts: torch.Tensor
    allowed: torch.Tensor
    rows: range
    mass_rows: torch.Tensor
    mass: torch.Tensor
    dense: torch.Tensor

    def kept_blocks(self) -> torch.Tensor:
        """[B, Hq, nQ, nK] bool: the key blocks the kernel visits (after the dense decision)."""
        sparse = _blocks_from_lists(self.idx, self.counts, self.n_k)
        structure = torch.arange(self.n_k, device=self.idx.device) < self.allowed[:, None]
        return torch.where(self.dense.bool(), structure.expand_as(sparse), sparse)


def _block_reduce(x: torch.Tensor, dim: int, block: int, how: str) -> torch.Tensor:
    """Reduce `dim` of `x` per block of `block` (the last block may be shorter), without copies.

    how: "mean" (in fp32), "sum", "amax" or "any". Splitting a dim is always a view.
    """
    n = x.shape[dim]
    full = n // block

    def reduce(t: torch.Tensor, d: int, keepdim: bool) -> torch.Tensor:
        if how == "mean":
            return t.mean(d, keepdim=keepdim, dtype=torch.float32)
        if how == "sum":
            return t.sum(d, keepdim=keepdim)
        if how == "amax":
            return t.amax(d, keepdim=keepdim)
        return t.any(d, keepdim=keepdim)

    parts = []
    if full:
        parts.append(reduce(x.narrow(dim, 0, full * block).unflatten(dim, (full, block)),
                            dim + 1, False))
    if n > full * block:
        parts.append(reduce(x.narrow(dim, full * block, n - full * block), dim, True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _mask_4d(mask: torch.Tensor) -> torch.Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def _mask_block_bias(mask: torch.Tensor, block: int) -> torch.Tensor:
    """The largest mask value per (query block, key block) tile, fp32; -inf where a tile is
    entirely removed. Broadcast dims stay 1: nothing is expanded in memory."""
    m = _mask_4d(mask)
    how = "any" if m.dtype == torch.bool else "amax"
    for dim in (2, 3):
        if m.shape[dim] != 1:
            m = _block_reduce(m, dim, block, how)
    if m.dtype == torch.bool:
        return torch.zeros((), device=m.device).masked_fill(~m, float("-inf"))
    return m.float()


def _structure(n_q: int, n_k: int, Sq: int, Sk: int, block: int, is_causal: bool,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed [nQ, nK], forced [nQ, nK]) bool: which blocks causality leaves, which are always
    kept (the first block and the diagonal block(s))."""
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    allowed = (j <= i) if is_causal else torch.ones((1, n_k), dtype=torch.bool, device=device)
    shift = 0 if is_causal else Sk - Sq  # not causal: bottom-right (a cache's newest token)
    first_row = i * block
    last_row = torch.clamp((i + 1) * block, max=Sq) - 1
    lo = torch.clamp(first_row + shift, 0, Sk - 1) // block
    hi = torch.clamp(last_row + shift, 0, Sk - 1) // block
    forced = ((j == 0) | ((j >= lo) & (j <= hi))) & allowed
    return allowed.expand(n_q, n_k), forced


def _kmax(n_k: int, keep: float) -> int:
    # Lists never need more than ceil(keep * nK) entries, or the 3 forced blocks (first + two
    # diagonal blocks); the tolerance keeps 0.2 * 5 from becoming 2 through rounding.
    return min(n_k, max(math.ceil(keep * n_k - 1e-9), 3))


def _sample_rows(Sq: int, block: int) -> tuple[range, slice]:
    """The sampled query rows (a range) and the query blocks they sit in (a slice).

    One row per sampled block, in its middle; blocks evenly spaced, the last one always sampled
    (the row with the most keys under causality). Strided ranges keep every gather a view.
    """
    off = min(block // 2, Sq - 1)
    n_blocks = (Sq - 1 - off) // block + 1  # blocks whose middle row exists
    step = max(1, n_blocks // SAMPLED_ROWS)
    first = (n_blocks - 1) % step
    return (range(first * block + off, Sq, step * block), slice(first, n_blocks, step))


def _blocks_from_lists(idx: torch.Tensor, counts: torch.Tensor, n_k: int,
                       valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[..., L, kmax] lists + [L] counts → [..., L, nK] bool (`valid`: the lists' used entries,
    ``arange(kmax) < counts[:, None]``, when the caller has it)."""
    if valid is None:
        valid = torch.arange(idx.shape[-1], device=idx.device) < counts[:, None]
    target = torch.where(valid, idx.long(), n_k)  # filler goes to a column that is dropped
    out = torch.zeros((*idx.shape[:-1], n_k + 1), dtype=torch.bool, device=idx.device)
    return out.scatter_(-1, target, True)[..., :n_k]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What a selection needs that depends only on its signature (lengths, block, causality,
    keep, device), not on q and k: the causal structure, the list lengths, the sampled rows and
    their causal mask. Built once per signature (:func:`_layout`), so a call launches only the
    ops that read q and k (the selection runs ~30 fewer small ops; they set its cost)."""

    allowed: torch.Tensor  # [nQ, nK] bool: blocks causality leaves
    not_allowed: torch.Tensor  # [nQ, nK] bool
    forced: torch.Tensor  # [nQ, nK] bool: first and diagonal blocks
    n_allowed: torch.Tensor  # [nQ] int64
    counts: torch.Tensor  # [nQ] int32: list lengths
    valid: torch.Tensor  # [nQ, kmax] bool: arange(kmax) < counts
    kmax: int
    rows: range
    blocks: slice
    row_future: Optional[torch.Tensor]  # [R, Sk] bool: keys after each sampled row (causal)


_LAYOUTS: dict = {}
_MAX_LAYOUTS = 1024


def _build_layout(n_q: int, n_k: int, Sq: int, Sk: int, block: int, is_causal: bool,
                  keep: float, device: torch.device) -> _Layout:
    allowed, forced = _structure(n_q, n_k, Sq, Sk, block, is_causal, device)
    n_allowed = allowed.sum(-1)
    n_forced = forced.sum(-1)
    wanted = torch.ceil(n_allowed.double() * keep - 1e-9).long()
    counts = torch.minimum(n_allowed, torch.maximum(wanted, n_forced)).to(torch.int32)
    kmax = _kmax(n_k, keep)
    valid = torch.arange(kmax, device=device) < counts[:, None]
    rows, blocks = _sample_rows(Sq, block)
    row_future = None
    if is_causal:
        row_ids = rows.start + rows.step * torch.arange(len(rows), device=device)
        row_future = torch.arange(Sk, device=device) > row_ids[:, None]
    return _Layout(allowed, ~allowed, forced, n_allowed, counts, valid, kmax, rows, blocks,
                   row_future)


def _layout(n_q: int, n_k: int, Sq: int, Sk: int, block: int, is_causal: bool, keep: float,
            device: torch.device) -> _Layout:
    """The signature's :class:`_Layout`, cached; never cached from inside a CUDA graph capture
    (there its tensors would hold what the kernels write only at replay), and built outside the
    CUDA-graph pools (:func:`contract.made_off_graph_pools`: one first built in a CUDA-graph
    trees' warm-up would be refused there). The cache is emptied at :data:`_MAX_LAYOUTS`
    entries, like the launchers' caches; a CUDA graph captured with an emptied entry then holds
    freed memory, which takes more than that many distinct shapes in one process."""
    key = (n_q, n_k, Sq, Sk, block, bool(is_causal), float(keep), device)
    layout = _LAYOUTS.get(key)
    if layout is None:
        if contract.capturing(device):
            return _build_layout(n_q, n_k, Sq, Sk, block, is_causal, keep, device)
        layout = contract.made_off_graph_pools(
            lambda: _build_layout(n_q, n_k, Sq, Sk, block, is_causal, keep, device), device)
        contract.remember(_LAYOUTS, key, layout, _MAX_LAYOUTS)
    return layout


def select(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           is_causal: bool, keep: float, min_mass: float, block: Optional[int] = None
           ) -> Selection:
    """The kept key blocks of every (batch, head, query block), their sampled mass, and the
    dense-or-sparse decision, as described in the module docstring. No host sync."""
    block = block or block_size(q.device)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    n_q, n_k = triton.cdiv(Sq, block), triton.cdiv(Sk, block)
    dev = q.device

    # Pooled block scores [B, Hq, nQ, nK]; q heads of one kv head are adjacent (h // G).
    qp = _block_reduce(q, 2, block, "mean")
    kp = _block_reduce(k, 2, block, "mean")
    scores = (qp.reshape(B, Hkv, G * n_q, D) @ kp.transpose(-1, -2)).view(B, Hq, n_q, n_k)
    scores = scores * scale
    if mask is not None:
        scores = scores + _mask_block_bias(mask, block)
    # Allowed blocks must outrank disallowed ones even when a mask empties them (-inf) or the
    # inputs hold NaN/inf: clamp to finite, then -inf marks "not allowed", +inf "forced".
    scores = torch.nan_to_num(scores, nan=-_FMAX, posinf=_FMAX, neginf=-_FMAX)
    lay = _layout(n_q, n_k, Sq, Sk, block, is_causal, keep, dev)
    scores = scores.masked_fill(lay.not_allowed, float("-inf")).masked_fill(lay.forced, float("inf"))
    counts, kmax = lay.counts, lay.kmax
    top = scores.topk(kmax, dim=-1).indices  # forced first (+inf), then by score
    top = torch.where(lay.valid, top, n_k)
    idx = top.sort(dim=-1).values.to(torch.int32)  # ascending; filler (n_k) last

    # Exact softmax of the sampled rows over all keys, summed over their kept blocks.
    rows, blocks = lay.rows, lay.blocks
    R = len(rows)
    qs = q[:, :, rows.start::rows.step]
    s = (qs.reshape(B, Hkv, G * R, D) @ k.transpose(-1, -2)).view(B, Hq, R, Sk).float() * scale
    if mask is not None:
        m = _mask_4d(mask)
        if m.shape[2] != 1:
            m = m[:, :, rows.start::rows.step]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    if lay.row_future is not None:
        s = s.masked_fill(lay.row_future, float("-inf"))
    dead = s.amax(-1, keepdim=True) == float("-inf")
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1)
    p_blocks = _block_reduce(p, 3, block, "sum")  # [B, Hq, R, nK]
    kept = _blocks_from_lists(idx[:, :, blocks], counts[blocks], n_k, lay.valid[blocks])
    mass_rows = (p_blocks * kept).sum(-1).masked_fill(dead.squeeze(-1), 1.0)
    mass = mass_rows.mean()
    dense = (~(mass >= min_mass)).to(torch.int32)  # NaN mass runs dense
    return Selection(block, n_k, idx, counts, lay.n_allowed, rows, mass_rows, mass, dense)


# --------------------------------------------------------------------------------------------
# Launcher, reference, registration
# --------------------------------------------------------------------------------------------


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def choose_config(head_dim: int, dtype: torch.dtype, *, interpreter: bool = False) -> dict:
    """Warps and stages for the BLOCK x BLOCK tiles (BLOCK is fixed by the sparsity pattern).

    Untuned placeholder: head dim <= 128 in fp16/bf16: 4 warps, 3 stages (FlashAttention-2's
    usual 64 x 64 setting); larger head dims or fp32: 2 stages (1 for fp32 above 128) so the
    K/V stages fit shared memory.
    """
    if interpreter:
        return dict(num_warps=4, num_stages=1)
    d = _pow2_at_least_16(head_dim)
    if dtype == torch.float32:
        return dict(num_warps=4, num_stages=2 if d <= 128 else 1)
    return dict(num_warps=4 if d <= 128 else 8, num_stages=3 if d <= 128 else 2)


def _offsets_64(q, k, v, m, out, block) -> bool:
    """Whether a row/key offset times its stride (padded to whole blocks) can pass int32."""
    pad_m = triton.cdiv(q.shape[2], block) * block
    pad_n = triton.cdiv(k.shape[2], block) * block
    spans = [pad_m * q.stride(2) + q.shape[3] * q.stride(3),
             pad_m * out.stride(2) + out.shape[3] * out.stride(3),
             pad_n * k.stride(2) + k.shape[3] * k.stride(3),
             pad_n * v.stride(2) + v.shape[3] * v.stride(3),
             pad_m * m.stride(2) + pad_n * m.stride(3) if m is not q else 0]
    return max(spans) >= 2**31


def is_short(Sq: int, Sk: int, block: int) -> bool:
    """Inputs that run dense attention: decode-sized queries or too few key blocks."""
    return Sq <= DECODE_MAX_Q or triton.cdiv(Sk, block) < MIN_KEY_BLOCKS


def _check(q, k, v, mask, scale, is_causal, keep, min_mass):
    reason = supports(q, k, v, mask, scale, is_causal, keep, min_mass)
    if reason is not None:
        raise ValueError(f"q3n::sparse_attention: {reason}")
    if k.shape[0] != q.shape[0] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"q3n::sparse_attention: shapes q {tuple(q.shape)} k {tuple(k.shape)} "
                         f"v {tuple(v.shape)} do not match (k/v [B, Hkv, Sk, D], same B as q)")


def launch(q, k, v, mask, scale, is_causal, sel: Selection, interpreter: bool) -> torch.Tensor:
    """Run the kernel over `sel`'s lists (or all allowed blocks where `sel.dense` says so)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((B, Hq, Sq, Dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if mask is None:
        mask_kind, m, m_strides = 0, q, (0, 0, 0, 0)
    else:
        mask_kind = 1 if mask.dtype == torch.bool else 2
        # Same-size reinterpretation keeps the strides; expand only writes 0 strides.
        m = (mask.view(torch.uint8) if mask_kind == 1 else mask).expand(B, Hq, Sq, Sk)
        m_strides = m.stride()
    idx = sel.idx.contiguous()
    cfg = choose_config(D, q.dtype, interpreter=interpreter)
    grid = (triton.cdiv(Sq, sel.block), Hq, B)
    sparse_attention_fwd_kernel[grid](
        q, k, v, m, out, idx, sel.counts, sel.dense,
        *q.stride(), *k.stride(), *v.stride(), *m_strides, *out.stride(), *idx.stride()[:3],
        Sq, Sk, triton.cdiv(Sk, sel.block), scale * _LOG2E,
        GROUP=Hq // Hkv, HEAD_DK=D, HEAD_DV=Dv,
        BLOCK_DK=_pow2_at_least_16(D), BLOCK_DV=_pow2_at_least_16(Dv), BLOCK=sel.block,
        MASK_KIND=mask_kind, IS_CAUSAL=bool(is_causal),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # Triton 3.6's interpreter multiplies bf16 tiles as their raw uint16 bits; widening the
        # (already bf16-rounded) operands to fp32 gives the exact products the GPU computes.
        DOT_IN_FP32=interpreter and q.dtype == torch.bfloat16,
        OFFSETS_64=_offsets_64(q, k, v, m, out, sel.block),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def attention_on_blocks(q, k, v, mask, scale, is_causal, kept_blocks: torch.Tensor,
                        block: int) -> torch.Tensor:
    """Plain-torch attention restricted to `kept_blocks` [B, Hq, nQ, nK] (bool); fp32 compute
    (fp64 for fp64 inputs); fully masked rows give 0, as the kernel."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    Hq, Hkv, Sq, Sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    if Hq != Hkv:
        kf = kf.repeat_interleave(Hq // Hkv, dim=1)
        vf = vf.repeat_interleave(Hq // Hkv, dim=1)
    s = (qf @ kf.transpose(-2, -1)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(cdt)
    if is_causal:
        s = s.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).triu(1),
                          float("-inf"))
    keys = kept_blocks.repeat_interleave(block, -2)[..., :Sq, :]
    keys = keys.repeat_interleave(block, -1)[..., :Sk]
    s = s.masked_fill(~keys, float("-inf"))
    dead = s.amax(-1, keepdim=True) == float("-inf")
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return (p @ vf).to(q.dtype)


def _default_scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _record(graph_id: int, layer: int, q, k, sel: Selection, keep: float, min_mass: float,
            backend: str) -> None:
    if graph_id < 0:
        return
    from q3n_compile import report  # the registry; imported late to keep this module light

    counts, allowed = sel.counts, sel.allowed
    report.record_sparse_attention(graph_id, layer, {
        "mass_rows": sel.mass_rows, "dense": sel.dense,
        "q_len": q.shape[2], "k_len": k.shape[2], "block": sel.block, "keep": keep,
        "min_mass": min_mass, "sampled_rows_per_head": len(sel.rows), "backend": backend,
        # Shapes alone decide the lists' lengths; the fraction of dense work when sparse runs.
        "work_fraction_if_sparse": _work_fraction(counts, allowed),
    })


def _work_fraction(counts: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return counts.sum().double() / allowed.sum().double()


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
              is_causal: bool = False, keep: float = 0.2, min_mass: float = 0.95,
              graph_id: int = -1, layer: int = -1) -> torch.Tensor:
    """Plain torch with the op's semantics (selection, decision, then attention on the kept
    blocks); computes in fp32 (fp64 for fp64 inputs). Records statistics as the op does."""
    return _forward(q, k, v, mask, scale, is_causal, keep, min_mass, graph_id, layer,
                    "reference")


def _forward(q, k, v, mask, scale, is_causal, keep, min_mass, graph_id, layer, backend):
    _check(q, k, v, mask, scale, is_causal, keep, min_mass)
    block = block_size(q.device)
    if is_short(q.shape[2], k.shape[2], block) or q.numel() == 0:
        return torch.ops.q3n.attention(q, k, v, mask, scale, is_causal)
    scale = _default_scale(q, scale)
    sel = select(q, k, mask, scale, is_causal, keep, min_mass, block)
    _record(graph_id, layer, q, k, sel, keep, min_mass, backend)
    if backend == "reference":
        return attention_on_blocks(q, k, v, mask, scale, is_causal, sel.kept_blocks(), block)
    return launch(q, k, v, mask, scale, is_causal, sel, interpreter=backend == "interpreter")


def supports(q, k, v, mask=None, scale=None, is_causal=False, keep=0.2, min_mass=0.95
             ) -> Optional[str]:
    """None if the op handles these arguments, else why not. Safe on FakeTensors (SymInt sizes:
    head dims/counts must be provably fine, batch and lengths only not provably wrong)."""
    # The arguments the dense op takes are the sparse op's too: one check for both.
    reason = _dense.supports(q, k, v, mask, scale, is_causal)
    if reason is not None:
        return reason
    if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        return f"keep={keep!r} must be a number in (0, 1] (the fraction of key blocks kept)"
    if not (isinstance(min_mass, (int, float)) and 0 <= min_mass <= 1):
        return f"min_mass={min_mass!r} must be a number in [0, 1] (0 never falls back to dense)"
    return None


def _sparse_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                           is_causal: bool = False, keep: float = 0.2, min_mass: float = 0.95,
                           graph_id: int = -1, layer: int = -1) -> torch.Tensor:
    backend = contract.backend_for(q.device)
    return _forward(q, k, v, mask, scale, is_causal, keep, min_mass, graph_id, layer, backend)


def _sparse_attention_fake(q, k, v, mask=None, scale=None, is_causal=False, keep=0.2,
                           min_mass=0.95, graph_id=-1, layer=-1):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# q3n::attention runs the short inputs; importing the module registers it.
from q3n_compile.kernels import attention as _dense  # noqa: E402,F401

sparse_attention = contract.register_kernel_op("sparse_attention", _sparse_attention_impl,
                                               _sparse_attention_fake)
