"""Dense bit-plane packing of quantized weights, shared by ``q3n::qlinear`` and the quantizer.

The format (what :class:`PackedWeight` holds) for a linear ``y = x @ W^T`` with ``W`` of shape
``[N, K]`` (out features, in features), quantized to ``bits`` in 2..8:

- **codes** ``q[n, k]`` are unsigned integers in ``[0, 2^bits - 1]``; the weight they stand for is
  ``W[n, k] ≈ (q[n, k] - z[g, n]) * s[g, n]`` with ``g = k // group_size`` (per group of
  ``group_size`` consecutive input channels), or one group per output channel
  (``group_size = -1``, "per-channel"). Symmetric formats have no stored zero point: ``z = 2^(bits-1)``.
- **qweight** ``int32 [R, N]``: the codes in bit planes of widths 8, 4, 2, 1 — ``bits`` written in
  binary picks the planes (6 = 4 + 2, 7 = 4 + 2 + 1, 3 = 2 + 1, 8 = 8). Plane ``p`` holds bits
  ``[o, o + p)`` of every code (``o`` = the widths of the planes before it, widest first) in
  ``K_pad * p / 32`` rows: row ``r`` of the plane holds input channels ``k = r * (32/p) + j`` in
  bits ``[j*p, (j+1)*p)`` of its word, for ``j < 32/p``. Planes follow each other in the order
  8, 4, 2, 1. ``K_pad`` is ``K`` rounded up to a multiple of 32 (padding codes are 0).
  So every bit width is stored densely: ``bits`` bits per weight, ``K_pad * bits / 8 * N`` bytes —
  a 6-bit weight takes 3/4 of a byte, never a whole one. N is the contiguous dimension, so a
  kernel's ``[BLOCK_K, BLOCK_N]`` tile is read as coalesced rows.
- **K-major 8-bit** (:func:`to_kmajor8`), the one other layout: for 8-bit symmetric per-channel
  weights, ``qweight`` int8 ``[N, K_pad]`` holds ``q - 128`` (K contiguous, padding 0), the
  operand int8 tensor cores read as it is (``qlinear_i8``); the same bytes as the 8-bit plane,
  transposed. A ``qweight`` of dtype int8 is this layout, int32 the bit planes.
- **scales** ``[n_groups, N]`` float16 (float32 when a scale is outside float16's normal range);
  **zeros** ``uint8 [n_groups, N]`` integer zero points, or None when symmetric.

Guarantees: :func:`pack_codes` / :func:`unpack_codes` are exact inverses for every width 2..8 and
every K; :func:`dequantize` is the one definition of a packed weight's value (the kernels, their
reference and the quantizer all use it or reproduce it exactly).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

MIN_BITS, MAX_BITS = 2, 8
GROUP_SIZES = (32, 64, 128)
PER_CHANNEL = -1
K_ALIGN = 32


def planes(bits: int) -> tuple[int, ...]:
    """Plane widths for `bits`, widest first: 6 -> (4, 2), 7 -> (4, 2, 1), 8 -> (8,)."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return tuple(p for p in (8, 4, 2, 1) if bits & p)


def padded_k(k: int) -> int:
    return -(-k // K_ALIGN) * K_ALIGN


def plane_rows(bits: int, k: int) -> dict[int, tuple[int, int]]:
    """``{plane width: (first row, rows)}`` in ``qweight`` for `bits` and K = `k`."""
    kp = padded_k(k)
    out, row = {}, 0
    for p in planes(bits):
        rows = kp * p // 32
        out[p] = (row, rows)
        row += rows
    return out


@functools.lru_cache(maxsize=1024)
def plane_starts(bits: int, k: int) -> tuple[int, int, int]:
    """The first ``qweight`` row of the 4-, 2- and 1-bit planes for `bits` and K = `k` (0 for a
    plane `bits` does not have): the kernels' ROW4, ROW2, ROW1. Cached: launch paths call it."""
    rows = plane_rows(bits, k)
    return tuple(rows.get(p, (0, 0))[0] for p in (4, 2, 1))


def packed_rows(bits: int, k: int) -> int:
    return padded_k(k) * bits // 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[N, K]`` (integers in ``[0, 2^bits)``) -> ``qweight`` int32 ``[R, N]``."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [N, K], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    kp = padded_k(k)
    ct = torch.zeros(kp, n, dtype=torch.int64, device=codes.device)
    ct[:k] = c.t()
    out = []
    shift = 0
    for p in planes(bits):
        per_word = 32 // p
        part = (ct >> shift) & ((1 << p) - 1)  # [kp, n]
        part = part.view(kp // per_word, per_word, n)
        weights = (torch.arange(per_word, device=codes.device, dtype=torch.int64) * p)
        words = (part << weights.view(1, per_word, 1)).sum(dim=1)  # [rows, n], < 2^32
        words = torch.where(words >= 2**31, words - 2**32, words)
        out.append(words.to(torch.int32))
        shift += p
    return torch.cat(out, dim=0).contiguous()


def unpack_codes(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """``qweight`` int32 ``[R, N]`` -> codes uint8 ``[N, K]`` (exact inverse of :func:`pack_codes`;
    of :func:`to_kmajor8` for an int8 ``qweight``)."""
    if is_kmajor8(qweight):
        if bits != 8 or qweight.shape[1] != padded_k(k):
            raise ValueError(f"a K-major int8 qweight holds 8-bit codes in [N, {padded_k(k)}] "
                             f"for K={k}; got {bits}-bit, {tuple(qweight.shape)}")
        return (qweight[:, :k].to(torch.int16) + 128).to(torch.uint8).contiguous()
    kp = padded_k(k)
    n = qweight.shape[1]
    if qweight.shape[0] != packed_rows(bits, k):
        raise ValueError(f"qweight has {qweight.shape[0]} rows; {bits}-bit K={k} needs "
                         f"{packed_rows(bits, k)}")
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    codes = torch.zeros(kp, n, dtype=torch.int64, device=qweight.device)
    shift = 0
    for p, (first, rows) in plane_rows(bits, k).items():
        per_word = 32 // p
        w = words[first:first + rows]  # [rows, n]
        sh = (torch.arange(per_word, device=qweight.device, dtype=torch.int64) * p).view(1, per_word, 1)
        part = (w.unsqueeze(1) >> sh) & ((1 << p) - 1)  # [rows, per_word, n]
        codes |= part.reshape(kp, n) << shift
        shift += p
    return codes[:k].t().to(torch.uint8).contiguous()


def scale_dtype_for(scales: torch.Tensor) -> torch.dtype:
    """float16 when every scale is a normal float16 number, else float32."""
    if scales.numel() == 0:
        return torch.float16
    a = scales.abs()
    finfo = torch.finfo(torch.float16)
    ok = bool(((a >= finfo.tiny) | (a == 0)).all()) and bool((a <= finfo.max).all())
    return torch.float16 if ok else torch.float32


@dataclasses.dataclass
class PackedWeight:
    """A quantized ``[N, K]`` weight in the packed format described in the module docstring."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: int  # PER_CHANNEL (-1) or one of GROUP_SIZES
    in_features: int
    out_features: int

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def nbytes(self) -> int:
        t = [self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(x.numel() * x.element_size() for x in t)

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes(), self.scales, self.zeros, self.bits, self.group_size,
                          dtype=dtype)

    def to(self, device) -> "PackedWeight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, qweight=mv(self.qweight), scales=mv(self.scales),
                                   zeros=mv(self.zeros))


def is_kmajor8(qweight: torch.Tensor) -> bool:
    """Whether `qweight` is in the K-major 8-bit layout (int8 ``[N, K_pad]``)."""
    return qweight.dtype == torch.int8


def out_features(qweight: torch.Tensor) -> int:
    """N of a packed weight in either layout."""
    return qweight.shape[0] if is_kmajor8(qweight) else qweight.shape[1]


def to_kmajor8(pw: "PackedWeight") -> "PackedWeight":
    """`pw` (8-bit, symmetric, per-channel, bit planes) in the K-major 8-bit layout: the codes'
    ``q - 128`` as int8 ``[N, K_pad]``, padding channels 0; scales unchanged. Same bytes."""
    if pw.bits != 8 or not pw.symmetric or pw.group_size != PER_CHANNEL:
        raise ValueError("the K-major int8 layout holds 8-bit symmetric per-channel weights, not "
                         f"{pw.bits}-bit g{pw.group_size}" + ("" if pw.symmetric else
                                                               " with zero points"))
    if is_kmajor8(pw.qweight):
        return pw
    k = pw.in_features
    codes = unpack_codes(pw.qweight, 8, k).to(torch.int16) - 128
    w8 = torch.zeros((pw.out_features, padded_k(k)), dtype=torch.int8, device=codes.device)
    w8[:, :k] = codes.to(torch.int8)
    return dataclasses.replace(pw, qweight=w8)


def group_index(k: int, group_size: int, device=None) -> torch.Tensor:
    """Group of each input channel: ``k // group_size`` (all 0 per-channel)."""
    idx = torch.arange(k, device=device)
    return torch.zeros_like(idx) if group_size == PER_CHANNEL else idx // group_size


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
               bits: int, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W[n, k] = (q[n, k] - z[g, n]) * s[g, n]``, computed in `dtype` (float32/float64)."""
    n, k = codes.shape
    g = group_index(k, group_size, codes.device)
    s = scales.to(dtype).t()[:, g]  # [N, K]
    z = (torch.full((), 1 << (bits - 1), dtype=dtype, device=codes.device) if zeros is None
         else zeros.to(dtype).t()[:, g])
    return (codes.to(dtype) - z) * s


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], bits: int,
         group_size: int) -> PackedWeight:
    """Build a :class:`PackedWeight` from codes ``[N, K]``, scales/zeros ``[n_groups, N]``."""
    n, k = codes.shape
    n_groups = 1 if group_size == PER_CHANNEL else k // group_size
    if group_size != PER_CHANNEL and k % group_size:
        raise ValueError(f"group_size {group_size} does not divide K={k}")
    if tuple(scales.shape) != (n_groups, n):
        raise ValueError(f"scales must be [{n_groups}, {n}], got {tuple(scales.shape)}")
    if zeros is not None:
        if tuple(zeros.shape) != (n_groups, n):
            raise ValueError(f"zeros must be [{n_groups}, {n}], got {tuple(zeros.shape)}")
        zeros = zeros.to(torch.uint8).contiguous()
    return PackedWeight(pack_codes(codes, bits), scales.contiguous(), zeros, bits, group_size, k, n)
