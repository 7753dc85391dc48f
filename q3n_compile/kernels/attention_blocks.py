"""Launch parameters of ``q3n::attention``'s prefill kernel: a length-bucketed table, per call.

What this module guarantees:

- :func:`choose_blocks` maps the concrete lengths of one call, the head dim, dtype, causality and
  the GPU's architecture (compute capability major: 9 = Hopper) to ``BLOCK_M, BLOCK_N,
  num_warps, num_stages``. The key length ``Sk`` picks a bucket of :data:`BUCKET_BOUNDS`
  (``Sk <= 64``, ``<= 128``, ... ``<= 16384``, beyond); each bucket has its own parameters.
- The choice is made at run time inside the op, from the lengths it is called with. The op is
  opaque to Dynamo and Inductor, so under ``torch.compile(dynamic=True)`` a new length never
  recompiles a graph; a bucket seen for the first time only compiles (once, cached by Triton) the
  kernel specialisation for its tiles.
- Every tile returned is >= 16 (``tl.dot``'s minimum) and <= the padded lengths of the call.
- Architectures without a table entry are autotuned: on the first call that falls in a bucket, a
  handful of candidates are timed with ``triton.testing.do_bench`` on synthetic inputs and the
  fastest is kept for the process in an ``lru_cache`` (no module-level mutable state). During a
  CUDA graph capture nothing is timed: the rule-of-thumb fallback is used and not cached.
- Triton's interpreter (the CPU lane) always gets 16 x 16 tiles: there the kernel only has to be
  right, and the smallest tiles are the fastest to interpret.
- The prefill kernel's Hopper variant (``tma``: TMA loads; see attention.py) is off in every
  table entry and every autotuned or fallback choice, and then absent from the returned dict.
  On an H200 (Triton 3.6, 2026-11-29) it measured 0.79-1.00x the pointer kernel's TFLOP/s, so no
  entry uses it; the warp-specialised loop (``warp_specialize``) gave NaN and was removed.
- :func:`describe_blocks` gives a JSON-serialisable description (buckets, and the bucket as a
  sympy-printable ``Piecewise`` of the key-length symbol) for the attention pass's report.

How this expresses the article's "blocks of 64 to 512 chosen from the input length": the unit of
key work one program step processes is ``BLOCK_N`` keys of a ``BLOCK_M``-row query tile, and the
table lets it grow with ``Sk``. It cannot reach 512 keys per step in the prefill kernel: K and V
tiles of 512 bf16 keys at D = 128 are 256 KiB per pipeline stage, past the 227 KiB of shared
memory an H200 program may use; the sweep's candidates stop where tiles still fit. In decode
(``attention_decode``), the keys one program owns (its split's chunk) do grow from 64 to 512 and
beyond with ``Sk``.
"""

from __future__ import annotations

import bisect
import functools
import math
import types
from typing import NamedTuple, Optional

import torch
import triton

from q3n_compile.kernels import contract

# Upper bounds (inclusive) on the key length Sk of the buckets; the last one is open.
BUCKET_BOUNDS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, math.inf)

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


class Blocks(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    # The prefill kernel's Hopper variant (attention.py: TMA loads). Off in every entry: on an
    # H200 (bench_attention.py --hopper-variants, 2026-11-29) it ran at 0.79-1.00x the pointer
    # kernel. (The warp-specialised loop, once a second flag, gave NaN there and was removed.)
    tma: bool = False

    def as_dict(self) -> dict:
        """The launch parameters; ``tma`` only when set, so a default entry's dict is the four
        tile keys it always was."""
        d = self._asdict()
        if not d["tma"]:
            del d["tma"]
        return d


INTERPRETER_BLOCKS = Blocks(16, 16, 4, 1)

# ---------------------------------------------------------------------------------------------
# The table. One tuple per bucket of BUCKET_BOUNDS: (BLOCK_M, BLOCK_N, num_warps, num_stages).
#
# SEED ENTRIES, TO BE REPLACED BY THE SWEEP: `python bench/bench_attention.py --sweep --out s.json`
# on the H200, then `python bench/bench_attention.py --emit-table s.json` prints this literal.
# The seeds: 128 x 64, 8 warps, 3 stages from Sk > 256 was the best (or within 3% of the best) of
# 9 configs measured on an H200 at S = 4096, bf16, D = 64/128, causal or not; D = 256: 128 x 64,
# 8 warps, 2 stages won there (533 TFLOP/s against 420 for 64 x 32). Short keys get smaller query
# tiles (more programs for short prompts) and fewer stages (fewer key blocks to pipeline): a
# judgement, not a measurement.
# Key: (arch major, padded head dim, causal); float16 uses the bfloat16 entries (same element
# size and tensor-core path). Padded head dims 16 and 32 use the 64 entries.
# An entry may add a flag, (BLOCK_M, BLOCK_N, num_warps, num_stages, tma), to run the prefill
# kernel's TMA variant; none does: it measured 0.79-1.00x the pointer kernel on an H200.
# BEGIN GENERATED TABLE_16BIT (bench_attention.py --emit-table --apply rewrites this block)
TABLE_16BIT_SOURCE = 'swept: NVIDIA H200 2026-11-28 commit 159f90f+quant-wip'
TABLE_16BIT = {
    (9, 64, False): (
        (64, 64, 4, 2),  # Sk <= 64: swept at S=64: 112 TFLOP/s
        (128, 64, 8, 3),  # Sk <= 128: swept at S=128: 185 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 256: swept at S=256: 266 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 512: swept at S=512: 346 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 1024: swept at S=1024: 404 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 2048: swept at S=2048: 426 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 4096: swept at S=4096: 449 TFLOP/s
        (128, 64, 8, 3),  # Sk <= 8192: swept at S=8192: 453 TFLOP/s
        (128, 64, 8, 3),  # Sk <= 16384: swept at S=16384: 458 TFLOP/s
        (128, 64, 8, 3),  # Sk > 16384: not swept
    ),
    (9, 64, True): (
        (64, 32, 4, 2),  # Sk <= 64: swept at S=64: 53 TFLOP/s
        (64, 64, 4, 2),  # Sk <= 128: swept at S=128: 96 TFLOP/s
        (64, 64, 4, 2),  # Sk <= 256: swept at S=256: 157 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 512: swept at S=512: 229 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 1024: swept at S=1024: 308 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 2048: swept at S=2048: 362 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 4096: swept at S=4096: 401 TFLOP/s
        (128, 64, 8, 3),  # Sk <= 8192: swept at S=8192: 419 TFLOP/s
        (128, 64, 8, 3),  # Sk <= 16384: swept at S=16384: 433 TFLOP/s
        (128, 64, 8, 3),  # Sk > 16384: not swept
    ),
    (9, 128, False): (
        (64, 32, 4, 2),  # Sk <= 64: swept at S=64: 128 TFLOP/s
        (64, 32, 4, 2),  # Sk <= 128: swept at S=128: 200 TFLOP/s
        (64, 32, 4, 2),  # Sk <= 256: swept at S=256: 282 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 512: swept at S=512: 373 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 1024: swept at S=1024: 448 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 2048: swept at S=2048: 490 TFLOP/s
        (128, 64, 8, 3),  # Sk <= 4096: swept at S=4096: 495 TFLOP/s
        (128, 128, 8, 3),  # Sk <= 8192: swept at S=8192: 498 TFLOP/s
        (128, 128, 8, 3),  # Sk <= 16384: swept at S=16384: 502 TFLOP/s
        (128, 128, 8, 3),  # Sk > 16384: not swept
    ),
    (9, 128, True): (
        (64, 32, 4, 2),  # Sk <= 64: swept at S=64: 63 TFLOP/s
        (64, 32, 4, 2),  # Sk <= 128: swept at S=128: 113 TFLOP/s
        (64, 32, 4, 2),  # Sk <= 256: swept at S=256: 182 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 512: swept at S=512: 252 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 1024: swept at S=1024: 343 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 2048: swept at S=2048: 418 TFLOP/s
        (128, 64, 8, 3),  # Sk <= 4096: swept at S=4096: 448 TFLOP/s
        (64, 64, 4, 3),  # Sk <= 8192: swept at S=8192: 492 TFLOP/s
        (128, 64, 8, 3),  # Sk <= 16384: swept at S=16384: 506 TFLOP/s
        (128, 64, 8, 3),  # Sk > 16384: not swept
    ),
    (9, 256, False): (
        (64, 32, 4, 2),  # Sk <= 64: not swept
        (64, 32, 4, 2),  # Sk <= 128: not swept
        (64, 32, 4, 2),  # Sk <= 256: not swept
        (128, 64, 8, 2),  # Sk <= 512: not swept
        (128, 64, 8, 2),  # Sk <= 1024: not swept
        (128, 64, 8, 2),  # Sk <= 2048: not swept
        (128, 64, 8, 2),  # Sk <= 4096: not swept
        (128, 64, 8, 2),  # Sk <= 8192: not swept
        (128, 64, 8, 2),  # Sk <= 16384: not swept
        (128, 64, 8, 2),  # Sk > 16384: not swept
    ),
    (9, 256, True): (
        (64, 32, 4, 2),  # Sk <= 64: not swept
        (64, 32, 4, 2),  # Sk <= 128: not swept
        (64, 32, 4, 2),  # Sk <= 256: not swept
        (128, 64, 8, 2),  # Sk <= 512: not swept
        (128, 64, 8, 2),  # Sk <= 1024: not swept
        (128, 64, 8, 2),  # Sk <= 2048: not swept
        (128, 64, 8, 2),  # Sk <= 4096: not swept
        (128, 64, 8, 2),  # Sk <= 8192: not swept
        (128, 64, 8, 2),  # Sk <= 16384: not swept
        (128, 64, 8, 2),  # Sk > 16384: not swept
    ),
}
# END GENERATED TABLE_16BIT

# float32 on Hopper: the previous rule (not swept). Twice the bytes per element, so half the key
# tile of the 16-bit entries keeps the pipeline stages inside shared memory.
_FP32_HOPPER = {64: (128, 32, 8, 3), 128: (128, 32, 8, 3), 256: (64, 16, 4, 2)}
_FP32_HOPPER_SHORT = {64: (64, 32, 4, 2), 128: (64, 32, 4, 2), 256: (64, 16, 4, 2)}


def _build_table() -> types.MappingProxyType:
    """(padded head dim, dtype name, causal, arch major) -> per-bucket Blocks; read-only."""
    table = {}
    for (arch, d, causal), row in TABLE_16BIT.items():
        if len(row) != len(BUCKET_BOUNDS):
            raise ValueError(f"TABLE_16BIT[{(arch, d, causal)}] has {len(row)} buckets, "
                             f"BUCKET_BOUNDS has {len(BUCKET_BOUNDS)}: regenerate it with "
                             "bench/bench_attention.py --emit-table")
        blocks = tuple(Blocks(*cfg) for cfg in row)
        for dtype in ("bfloat16", "float16"):
            table[(d, dtype, causal, arch)] = blocks
    for d in (64, 128, 256):
        row = tuple(Blocks(*(_FP32_HOPPER_SHORT[d] if bound <= 256 else _FP32_HOPPER[d]))
                    for bound in BUCKET_BOUNDS)
        for causal in (False, True):
            table[(d, "float32", causal, 9)] = row
    return types.MappingProxyType(table)


BLOCK_TABLE = _build_table()


cdiv = contract.cdiv


def pow2_at_least_16(n: int) -> int:
    """The power of two >= max(n, 16): a tile dimension (tl.dot takes nothing under 16)."""
    return max(16, 1 << (max(1, n) - 1).bit_length())


_pow2_at_least_16 = pow2_at_least_16


def table_head_dim(head_dim: int) -> int:
    """The head dim a table key uses: padded to a power of two, 16 and 32 share 64's entries
    (their tiles are smaller than 64's in every dimension, so 64's choices fit)."""
    return max(64, _pow2_at_least_16(head_dim))


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"q3n::attention has no block table for {dtype}; "
                         f"supported: {', '.join(_DTYPE_NAMES.values())}") from None


def bucket_index(seq_len_k: int) -> int:
    """Index of the first bucket whose (inclusive) upper bound holds ``seq_len_k``."""
    return bisect.bisect_left(BUCKET_BOUNDS, seq_len_k)


@functools.lru_cache(maxsize=None)
def device_arch(index: int) -> int:
    """Compute capability major of CUDA device ``index`` (9 for Hopper)."""
    return torch.cuda.get_device_capability(index)[0]


@functools.lru_cache(maxsize=None)
def shared_memory_limit(index: int) -> int:
    """Bytes of shared memory one program may use on CUDA device ``index`` (227 KiB on Hopper)."""
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def pipelined_bytes(cfg: dict, head_dim: int, head_dim_v: int, elem: int, mask_elem: int) -> int:
    """Shared memory the prefill kernel's pipeline takes: each stage holds a K and a V tile and,
    with a mask, its [BLOCK_M, BLOCK_N] tile (mask_elem bytes per entry, 0 without a mask).
    Matches what Triton 3.6 asked for on an H200: BLOCK 128x128, D 128, bf16, 3 stages, bf16
    additive mask -> 3 * (2 * 128 * 128 * 2 + 128 * 128 * 2) = 294912 bytes."""
    dk, dv = _pow2_at_least_16(head_dim), _pow2_at_least_16(head_dim_v)
    per_stage = cfg["BLOCK_N"] * (dk + dv) * elem + cfg["BLOCK_M"] * cfg["BLOCK_N"] * mask_elem
    return cfg["num_stages"] * per_stage


def fit_shared_memory(cfg: dict, head_dim: int, head_dim_v: int, elem: int, mask_elem: int,
                      limit: int) -> dict:
    """`cfg` with fewer pipeline stages (down to 2), then narrower key tiles (down to 16), until
    :func:`pipelined_bytes` fits `limit`. The table's entries were swept without a mask; a mask
    tile per stage can push one past the GPU (BERT's padding mask at 8192 keys did)."""
    cfg = dict(cfg)
    while pipelined_bytes(cfg, head_dim, head_dim_v, elem, mask_elem) > limit:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif cfg["BLOCK_N"] > 16:
            cfg["BLOCK_N"] //= 2
        else:
            break
    return cfg


def _current_arch() -> int:
    if not torch.cuda.is_available():
        raise ValueError("choose_blocks: no CUDA device to read the architecture from; pass "
                         "arch= (e.g. 9 for Hopper) or interpreter=True")
    return device_arch(torch.cuda.current_device())


def _fallback(head_dim: int, dtype: torch.dtype) -> Blocks:
    """Rule of thumb where neither the table nor a timing is available (e.g. during a CUDA
    graph capture on an untabled GPU): the seed's long-sequence choice."""
    d = table_head_dim(head_dim)
    if dtype == torch.float32:
        return Blocks(*_FP32_HOPPER[d])
    return Blocks(*TABLE_16BIT[(9, d, False)][-1])


def candidates(head_dim: int, dtype: torch.dtype) -> tuple:
    """Configs the autotuner times for an untabled architecture (a handful: each costs a Triton
    compile on first use). Configs that do not fit a GPU's shared memory fail and are skipped."""
    d = table_head_dim(head_dim)
    if d <= 128:
        cands = [(128, 64, 8, 3), (128, 64, 4, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)]
    else:
        cands = [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)]
    if dtype == torch.float32:
        cands = [(m, max(16, n // 2), w, s) for m, n, w, s in cands]
    return tuple(Blocks(*c) for c in dict.fromkeys(cands))


def _representative_len(bucket: int) -> int:
    """The length the autotuner times a bucket at: its upper bound (twice the last finite one
    for the open bucket), capped where the timing would take too long for a first call."""
    bound = BUCKET_BOUNDS[bucket]
    return int(min(16384, 2 * BUCKET_BOUNDS[-2] if math.isinf(bound) else bound))


@functools.lru_cache(maxsize=None)
def _autotuned(d: int, dtype: str, causal: bool, arch: int, bucket: int, device: int) -> Blocks:
    """Times :func:`candidates` on device ``device`` at the bucket's representative length and
    returns the fastest. Cached per key for the life of the process."""
    from q3n_compile.kernels import attention  # the kernel module imports this one

    torch_dtype = {v: k for k, v in _DTYPE_NAMES.items()}[dtype]
    S = _representative_len(bucket)
    B, H = max(1, 8192 // S), 16
    with torch.cuda.device(device):
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, S, d, generator=gen, device="cuda").to(torch_dtype)
                   for _ in range(3))
        timed = []
        for cfg in candidates(d, torch_dtype):
            fn = functools.partial(attention._launch, q, k, v, None, None, causal, False,
                                   blocks=cfg.as_dict())
            try:
                timed.append((triton.testing.do_bench(fn, warmup=5, rep=20,
                                                      return_mode="median"), cfg))
            except Exception:  # noqa: BLE001 - a config that does not fit this GPU is skipped
                continue
    if not timed:
        raise RuntimeError(f"q3n::attention: no block config of {candidates(d, torch_dtype)} "
                           f"runs on CUDA device {device} (sm_{arch}x, D={d}, {dtype}); add a "
                           "table entry for this architecture in kernels/attention_blocks.py")
    return min(timed, key=lambda t: t[0])[1]


def bucket_blocks(seq_len_k: int, head_dim: int, dtype: torch.dtype, causal: bool,
                  arch: int, device: Optional[int] = None) -> Blocks:
    """The bucket's parameters before clamping to the call's lengths."""
    key = (table_head_dim(head_dim), dtype_name(dtype), bool(causal), int(arch))
    bucket = bucket_index(seq_len_k)
    row = BLOCK_TABLE.get(key)
    if row is not None:
        return row[bucket]
    if torch.cuda.is_current_stream_capturing():
        return _fallback(head_dim, dtype)
    index = torch.cuda.current_device() if device is None else device
    return _autotuned(*key, bucket, index)


def choose_blocks(seq_len_q: int, seq_len_k: int, head_dim: int, dtype: torch.dtype,
                  causal: bool, *, interpreter: bool = False, arch: Optional[int] = None,
                  device: Optional[int] = None) -> dict:
    """Launch parameters for one prefill call (dict of BLOCK_M, BLOCK_N, num_warps, num_stages;
    plus ``tma`` only for an entry that turns the Hopper variant on).

    ``arch`` defaults to the current CUDA device's compute capability major; ``device`` is the
    CUDA device an untabled architecture is autotuned on (default: the current one).
    Tiles are clamped to the padded lengths so a short prompt does not compute empty rows.
    """
    if interpreter:
        cfg = INTERPRETER_BLOCKS
    else:
        cfg = bucket_blocks(seq_len_k, head_dim, dtype, causal,
                            _current_arch() if arch is None else arch, device)
    return cfg._replace(BLOCK_M=min(cfg.BLOCK_M, _pow2_at_least_16(seq_len_q)),
                        BLOCK_N=min(cfg.BLOCK_N, _pow2_at_least_16(seq_len_k))).as_dict()


# ---------------------------------------------------------------------------------------------
# Description for reports


def _piecewise(values: list, symbol: str) -> str:
    """``Piecewise((v0, Sk <= b0), (v1, Sk <= b1), ..., (vn, True))`` with equal neighbours
    merged; a single value is printed as itself."""
    import sympy

    sk = sympy.Symbol(symbol, integer=True, nonnegative=True)
    pieces = []
    for value, bound in zip(values, BUCKET_BOUNDS):
        if pieces and pieces[-1][0] == value:
            pieces.pop()
        pieces.append((value, bound))
    if len(pieces) == 1:
        return str(sympy.Integer(pieces[0][0]))
    args = [(sympy.Integer(v), sympy.true if math.isinf(b) else sk <= b) for v, b in pieces]
    return str(sympy.Piecewise(*args))


def describe_prefill(head_dim: int, dtype: torch.dtype, causal: bool, arch, *,
                     symbol: str = "Sk") -> dict:
    """JSON-serialisable description of the prefill tiles for one key; ``arch`` is a compute
    capability major, ``"interpreter"`` or ``"reference"`` (no kernel runs)."""
    d = table_head_dim(head_dim)
    desc = dict(
        key=dict(head_dim=int(head_dim), table_head_dim=d, dtype=dtype_name(dtype),
                 causal=bool(causal), arch=arch),
        chosen="per call at run time from the concrete key length (no recompile under dynamic "
               "shapes); BLOCK_M is then clamped to max(16, next_pow2(Sq)) and BLOCK_N to "
               "max(16, next_pow2(Sk))",
        bucket_bounds=[None if math.isinf(b) else b for b in BUCKET_BOUNDS],
        bucket_expr=_piecewise(list(range(len(BUCKET_BOUNDS))), symbol),
    )
    if arch == "reference":
        return dict(desc, source="reference (torch, no tiles)", buckets=[], block_n_expr=None)
    if arch == "interpreter":
        rows = [INTERPRETER_BLOCKS] * len(BUCKET_BOUNDS)
        source = "interpreter (16 x 16 tiles)"
    else:
        rows = BLOCK_TABLE.get((d, dtype_name(dtype), bool(causal), int(arch)))
        source = "table" if rows is not None else "autotune on the first call of each bucket"
        if rows is not None and dtype != torch.float32:
            source += f" ({TABLE_16BIT_SOURCE})"
    if rows is None:
        cands = [c.as_dict() for c in candidates(head_dim, dtype)]
        buckets = [dict(max_seq_len_k=b, blocks=None) for b in desc["bucket_bounds"]]
        return dict(desc, source=source, candidates=cands, buckets=buckets, block_n_expr=None)
    buckets = [dict(max_seq_len_k=b, **cfg.as_dict())
               for b, cfg in zip(desc["bucket_bounds"], rows)]
    return dict(desc, source=source, buckets=buckets,
                block_n_expr=_piecewise([cfg.BLOCK_N for cfg in rows], symbol))
