"""Attention on one GPU: q3n::attention against SDPA, a block-config sweep, and decode bandwidth.

Modes (bf16; every timing is triton.testing.do_bench's median after warm-up, which clears L2
before each run; inputs are random, never zeros):

- default, prefill: B*S = 16384 tokens, H = 32, D in {64, 128}, causal and not (the shapes of
  /work/shared/baselines/h200-2026-11-28.json); each shape is checked against SDPA (max abs
  error), then q3n, SDPA cuDNN, FlashAttention-2 and memory-efficient, and FlexAttention
  (``torch.compile``d, causal through a block mask) are timed. TFLOP/s counts 4*B*H*S^2*D,
  halved for causal.
- ``--sweep``: for the same shapes (S = 64 ... 16384), time candidate (BLOCK_M, BLOCK_N, warps,
  stages) configs of the prefill kernel; writes after every shape, stops at ``--budget-s``.
- ``--hopper-variants``: for the same prefill shapes, the table's config against the same tiles
  with TMA loads (``tma``), retried with one stage less if it does not fit shared memory. Each
  variant is checked against SDPA before it is timed (warmup 10 ms, rep 40 ms: a few runs at
  S = 16384); one that fails to compile or run is recorded with its ``error`` and the run goes
  on. Rows carry ``variant`` and what actually ran (``ran``: a fallback to the pointer kernel
  shows there). TMA needs sm_90+ (before, only the table's config is timed, and the run says
  so). About a minute on an H200, mostly compiles; stops starting shapes after ``--budget-s``
  (150 s). Measured on an H200 (2026-11-29, ``--seqs 1024 4096 16384``): TMA is correct but
  0.79-1.00x the pointer kernel, so no table entry uses it; a warp-specialised variant
  (``tma_ws``) gave NaN on 11 of 12 shapes and was removed.
- ``--emit-table SWEEP.json``: print the ``TABLE_16BIT`` literal of
  q3n_compile/kernels/attention_blocks.py from a sweep (fastest config per bucket; buckets the
  sweep did not measure keep their current entries); ``--apply`` writes it into that file.
- ``--decode``: one decode step, Sq = 1, B = 8, GQA 32/8, D = 128, L in {1k, 4k, 16k, 64k} keys:
  q3n's split-KV kernel against every SDPA backend available, in TB/s of K+V bytes read
  (2*B*Hkv*L*D*2 bytes), each timed twice: do_bench (a Python call per step, host overhead
  included where it exceeds the GPU time) and from a CUDA graph of 20 calls (``graph``: the
  kernels alone, as a captured decode step runs them; the calls cycle through enough input
  copies to exceed L2 three times, so no call finds its K/V in L2). ``host us``: wall time per
  call of 200 back-to-back calls (the op; under inference_mode; q3n's launcher without the
  dispatcher). Plus a static cache (16k slots, 4k filled, bool mask) with and without skipping
  masked keys. About a minute on an H200. ``--decode-sweep`` also times decode tile/occupancy
  overrides (a few minutes more).

    python bench/bench_attention.py --out bench/results/attention-h200.json
    python bench/bench_attention.py --sweep --out sweep.json && \\
        python bench/bench_attention.py --emit-table sweep.json
    python bench/bench_attention.py --decode --commit $(git rev-parse HEAD) --out decode.json
    python bench/bench_attention.py --hopper-variants --out bench/results/attention-hopper.json

Writes JSON (GPU, versions, commit, date, rows) to --out and prints a table.
"""

import argparse
import datetime
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from q3n_compile.compare import git_commit  # noqa: E402  (one definition for every result file)
from q3n_compile.kernels import attention as A  # noqa: E402
from q3n_compile.kernels import attention_blocks as AB  # noqa: E402
from q3n_compile.kernels import attention_decode as AD  # noqa: E402

TOKENS = 16384
HEADS = 32
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}
PREFILL_PEERS = (*SDPA_BACKENDS, "flex")
DECODE_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION}

# Sweep candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages). Long keys: the measured 128 x 64
# and its neighbours, up to 128-key blocks (256 at D = 64: the widest tile that fits shared
# memory, the article's "larger blocks for longer inputs"). Short keys: small query tiles.
# All fit an H200's shared memory (checked with Triton 3.6's sm_90 compile, no GPU needed); at
# D = 128 the 4-warp 128-row tiles are left out: ptxas spills them (120-128 B of stack).
SWEEP_LONG = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
              (64, 64, 4, 3)]
SWEEP_LONG_D64 = [(128, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 3), (128, 256, 8, 2)]
SWEEP_SHORT = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (128, 64, 8, 3)]
SWEEP_SEQS = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
# Decode sweep: (BLOCK_N, num_stages, programs_per_sm or None for the occupancy probe).
DECODE_SWEEP = [(bn, st, pps) for bn in (32, 64, 128) for st in (2, 3, 4)
                for pps in (None, 2, 4, 8) if not (bn == 128 and st == 4)]


def bench(fn, warmup=25, rep=100):
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def environment(commit=None):
    major, minor = torch.cuda.get_device_capability()
    return dict(gpu=torch.cuda.get_device_name(), capability=[major, minor],
                sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
                torch=torch.__version__, triton=triton.__version__,
                commit=commit or git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat())


def write_json(path, data):
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))


def _err(exc):
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Prefill comparison


def prefill_inputs(S, D, causal):
    B = max(1, TOKENS // S)
    gen = torch.Generator(device="cuda").manual_seed(S * 1000 + D * 2 + causal)
    q, k, v = (torch.randn(B, HEADS, S, D, generator=gen, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    flop = 4 * B * HEADS * S * S * D * (0.5 if causal else 1.0)
    return B, q, k, v, flop


def run_shape(S, D, causal):
    B, q, k, v, flop = prefill_inputs(S, D, causal)
    tflops = lambda ms: None if ms is None else flop / (ms * 1e-3) / 1e12  # noqa: E731

    ours = lambda: torch.ops.q3n.attention(q, k, v, None, None, causal)  # noqa: E731
    out = ours()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    err = (out.float() - want.float()).abs().max().item()

    row = dict(S=S, B=B, H=HEADS, D=D, causal=causal, max_abs_err_vs_sdpa=err,
               blocks=A.choose_blocks(S, S, D, q.dtype, causal))
    row["q3n_ms"] = bench(ours)
    for name, backend in SDPA_BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                row[f"{name}_ms"] = bench(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        except RuntimeError as exc:  # backend not available for this shape/build
            row[f"{name}_ms"] = None
            row[f"{name}_error"] = _err(exc)
    try:
        flex = _flex_attention(S, causal)
        row["flex_ms"] = bench(lambda: flex(q, k, v))
    except Exception as exc:  # noqa: BLE001 — a peer that cannot run is recorded, the rest runs
        row["flex_ms"] = None
        row["flex_error"] = _err(exc)
    for name in ("q3n", *PREFILL_PEERS):
        row[f"{name}_tflops"] = tflops(row[f"{name}_ms"])
    del q, k, v, out, want
    torch.cuda.empty_cache()
    return row


def _flex_attention(S, causal):
    """FlexAttention compiled once per shape (its block mask is built for the length), as its
    docs recommend: ``torch.compile(flex_attention)`` with a causal ``mask_mod`` or none.

    Dynamo is reset first: one compiled function reused over the whole grid reaches dynamo's
    recompile limit (8) after eight shapes and then silently runs flex_attention uncompiled
    (~50x slower; seen on an H200, 2026-11-29), which would make every later figure wrong."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    if not causal:
        return lambda q, k, v: compiled(q, k, v)
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, S, S,
                             device="cuda")
    return lambda q, k, v: compiled(q, k, v, block_mask=mask)


def run_prefill(args):
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    rows = []
    print(f"{'D':>4} {'S':>6} {'B':>3} {'causal':>6} {'err':>8} {'q3n':>7} {'cudnn':>7} "
          f"{'flash':>7} {'effic.':>7} {'flex':>7}  TFLOP/s   {'q3n/flex':>9} {'q3n/cudnn':>9}")
    fmt = lambda x: "   -   " if x is None else f"{x:7.1f}"  # noqa: E731
    for D in args.dims:
        for S in args.seqs:
            for causal in causals:
                r = run_shape(S, D, causal)
                rows.append(r)
                ratio = lambda other: "    -    " if r[other] is None else (  # noqa: E731
                    f"{r['q3n_tflops'] / r[other]:9.2f}")
                print(f"{D:>4} {S:>6} {r['B']:>3} {str(causal):>6} {r['max_abs_err_vs_sdpa']:8.1e}"
                      f" {fmt(r['q3n_tflops'])} {fmt(r['cudnn_tflops'])} {fmt(r['flash_tflops'])}"
                      f" {fmt(r['efficient_tflops'])} {fmt(r['flex_tflops'])}"
                      f"           {ratio('flex_tflops')} {ratio('cudnn_tflops')}", flush=True)
    write_json(args.out, dict(environment(args.commit), mode="prefill", dtype="bfloat16",
                              tokens=TOKENS, heads=HEADS,
                              timer="triton.testing.do_bench median",
                              tflops_formula="4*B*H*S^2*D, halved for causal", rows=rows))


# ---------------------------------------------------------------------------------------------
# Hopper variant of the prefill kernel: TMA loads (0.79-1.00x the pointer kernel on an H200,
# 2026-11-29; the warp-specialised variant gave NaN there and was removed)

HOPPER_VARIANTS = ("default", "tma")
# A variant whose max |error| against SDPA exceeds this is reported wrong and not timed (the
# sweep's threshold: bf16 attention of unit-normal inputs stays near 1e-2).
MAX_ABS_ERR = 0.1


def _fewer_stages_ladder(cfg):
    """``cfg``, then one stage less: a variant's own shared memory (the TMA copies' barriers)
    may not fit next to the table's stage count."""
    return [cfg] + ([dict(cfg, num_stages=cfg["num_stages"] - 1)] if cfg["num_stages"] > 1
                    else [])


def hopper_variant_configs(table_cfg, capability_major):
    """[(variant, [launch parameters to try in order])] for one shape: the table's config and
    the same tiles with TMA. Before sm_90 only the default."""
    base = {k: table_cfg[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
    variants = [("default", [base])]
    if capability_major < 9:
        return variants
    return variants + [("tma", _fewer_stages_ladder(dict(base, tma=True)))]


def _variant_row(q, k, v, causal, want, flop, tries, reference_out):
    """Check then time one variant: the first config of ``tries`` that compiles and runs."""
    row, errors = {}, []
    for cfg in tries:
        fn = lambda cfg=cfg: A._launch(q, k, v, None, None, causal, False, blocks=cfg)  # noqa: E731
        try:
            ran = A.prefill_variant(q, k, v, None, None, causal, blocks=cfg)
            out = fn()
            err = (out.float() - want.float()).abs().max().item()
            diff = None if reference_out is None else (
                (out.float() - reference_out.float()).abs().max().item())
        except Exception as exc:  # noqa: BLE001 - compile failure, out of shared memory, ...
            errors.append(f"{cfg}: {_err(exc)}")
            continue
        row.update(blocks=cfg, ran=ran, max_abs_err_vs_sdpa=err, max_abs_diff_vs_default=diff)
        if not err <= MAX_ABS_ERR:  # NaN included
            row["error"] = f"wrong result: max abs err {err:.3g} vs SDPA"
            return row, out
        ms = bench(fn, warmup=10, rep=40)
        row.update(ms=ms, tflops=flop / (ms * 1e-3) / 1e12)
        return row, out
    row.update(blocks=tries[-1], error="; ".join(errors))
    return row, None


def hopper_shape_rows(S, D, causal, capability_major):
    """Rows (one per variant) for one prefill shape; ratios are against the default's TFLOP/s."""
    B, q, k, v, flop = prefill_inputs(S, D, causal)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    table_cfg = A.choose_blocks(S, S, D, q.dtype, causal)
    rows, default_out = [], None
    for variant, tries in hopper_variant_configs(table_cfg, capability_major):
        row, out = _variant_row(q, k, v, causal, want, flop, tries, default_out)
        if variant == "default":
            default_out = out
        rows.append(dict(S=S, B=B, H=HEADS, D=D, causal=causal, variant=variant, **row))
    base = rows[0].get("tflops")
    for r in rows:
        r["ratio_vs_default"] = r["tflops"] / base if base and r.get("tflops") else None
    del q, k, v, want, default_out
    torch.cuda.empty_cache()
    return rows


def _hopper_cell(r, table_stages):
    """A variant's TFLOP/s and ratio; ``!`` when the pointer kernel ran instead (a fallback),
    ``-`` when it ran with one stage less than the table's config."""
    if r is None:
        return f"{'skipped':>17}"
    if r.get("tflops") is None:
        return f"{'error':>17}"
    marks = ("!" if r.get("ran") and r["variant"] != "default" and not r["ran"]["tma"] else "")
    marks += "-" if r["blocks"]["num_stages"] < table_stages else ""
    ratio = "" if r["variant"] == "default" or r["ratio_vs_default"] is None else (
        f" ({r['ratio_vs_default']:4.2f}x)")
    return f"{r['tflops']:6.1f}{ratio}{marks}".rjust(17)


def hopper_summary_line(rows):
    """One printed line per shape: TFLOP/s per variant and its ratio to the default."""
    r0 = rows[0]
    stages = r0["blocks"]["num_stages"]
    cells = [_hopper_cell(next((r for r in rows if r["variant"] == v), None), stages)
             for v in HOPPER_VARIANTS]
    return f"{r0['D']:>4} {r0['S']:>6} {str(r0['causal']):>6} " + " ".join(cells)


def run_hopper_variants(args):
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    major = torch.cuda.get_device_capability()[0]
    data = dict(environment(args.commit), mode="hopper-variants", dtype="bfloat16",
                tokens=TOKENS, heads=HEADS, variants=list(HOPPER_VARIANTS),
                timer="triton.testing.do_bench median (warmup 10 ms, rep 40 ms)",
                tflops_formula="4*B*H*S^2*D, halved for causal", rows=[], complete=False)
    if major < 9:
        print(f"sm_{major}x: the TMA variant needs sm_90+; it is skipped, only the table's "
              "config is timed")
    print("TFLOP/s (ratio to the table's config); ! = fell back to the pointer kernel, "
          "- = one stage less; errors are in the JSON rows")
    print(f"{'D':>4} {'S':>6} {'causal':>6} {'default':>17} {'tma':>17}")
    start = time.monotonic()
    budget = 150.0 if args.budget_s is None else args.budget_s
    for D in sorted(args.dims, reverse=True):
        for causal in causals:
            for S in args.seqs:
                if time.monotonic() - start > budget:
                    print(f"budget of {budget} s spent: stopping (JSON is partial)")
                    write_json(args.out, data)
                    return
                rows = hopper_shape_rows(S, D, causal, major)
                data["rows"].extend(rows)
                write_json(args.out, data)
                print(hopper_summary_line(rows) + f"  [{time.monotonic() - start:4.0f} s]",
                      flush=True)
    data["complete"] = True
    write_json(args.out, data)


# ---------------------------------------------------------------------------------------------
# Block-config sweep and the table it produces


def sweep_candidates(S, D):
    """Candidates for one shape, clamped to the sequence as choose_blocks would, deduplicated."""
    base = SWEEP_SHORT if S < 512 else SWEEP_LONG + (SWEEP_LONG_D64 if D <= 64 else [])
    if S < 512 and D <= 64:
        base = base + [(128, 64, 4, 2)]
    clamp = lambda n: min(n, max(16, triton.next_power_of_2(S)))  # noqa: E731
    return list(dict.fromkeys((clamp(m), clamp(n), w, st) for m, n, w, st in base))


def sweep_shape(S, D, causal):
    B, q, k, v, flop = prefill_inputs(S, D, causal)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    results = []
    for bm, bn, w, st in sweep_candidates(S, D):
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
        fn = lambda: A._launch(q, k, v, None, None, causal, False, blocks=cfg)  # noqa: E731
        try:
            err = (fn().float() - want.float()).abs().max().item()
            ms = bench(fn, warmup=5, rep=30)
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for this config
            results.append(dict(cfg, error=_err(exc)))
            continue
        results.append(dict(cfg, ms=ms, tflops=flop / (ms * 1e-3) / 1e12, max_abs_err=err))
    table = A.choose_blocks(S, S, D, q.dtype, causal)
    del q, k, v, want
    torch.cuda.empty_cache()
    ok = [r for r in results if "ms" in r and r["max_abs_err"] < 0.1]
    best = min(ok, key=lambda r: r["ms"]) if ok else None
    return dict(S=S, B=B, H=HEADS, D=D, causal=causal, results=results, best=best,
                table_choice=table)


def run_sweep(args):
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    seqs = args.seqs if args.seqs_given else SWEEP_SEQS
    data = dict(environment(args.commit), mode="sweep", dtype="bfloat16", tokens=TOKENS,
                heads=HEADS, timer="triton.testing.do_bench median (warmup 5 ms, rep 30 ms)",
                bucket_bounds=[None if math.isinf(b) else b for b in AB.BUCKET_BOUNDS],
                rows=[], complete=False)
    start = time.monotonic()
    # Larger head dims first (128 is what Qwen3/Llama use): a budget cut drops the others' tail.
    for D in sorted(args.dims, reverse=True):
        for causal in causals:
            for S in seqs:
                if time.monotonic() - start > args.budget_s:
                    print(f"budget of {args.budget_s} s spent: stopping (JSON is partial)")
                    write_json(args.out, data)
                    return
                row = sweep_shape(S, D, causal)
                data["rows"].append(row)
                write_json(args.out, data)
                b = row["best"]
                print(f"D={D:>3} S={S:>5} causal={causal!s:>5}: best "
                      + (f"{b['BLOCK_M']}x{b['BLOCK_N']} w{b['num_warps']} s{b['num_stages']} "
                         f"{b['tflops']:6.1f} TFLOP/s" if b else "none ran")
                      + f"  (table: {row['table_choice']})  [{time.monotonic() - start:5.0f} s]",
                      flush=True)
    data["complete"] = True
    write_json(args.out, data)


def table_from_sweep(sweeps):
    """TABLE_16BIT (as attention_blocks holds it) updated with the sweeps' fastest configs.

    A row's best config goes to the bucket holding its S; the open bucket takes the largest
    measured S's choice when it was not measured itself; other unmeasured buckets keep theirs.
    """
    table = {key: list(row) for key, row in AB.TABLE_16BIT.items()}
    measured = {}
    for sweep in sweeps:
        arch = sweep["capability"][0]
        for row in sweep["rows"]:
            if not row.get("best"):
                continue
            key = (arch, AB.table_head_dim(row["D"]), bool(row["causal"]))
            b = row["best"]
            measured.setdefault(key, {})[AB.bucket_index(row["S"])] = (
                (b["BLOCK_M"], b["BLOCK_N"], b["num_warps"], b["num_stages"]), row["S"],
                b["tflops"])
    for key, buckets in measured.items():
        row = table.setdefault(key, list(table.get((9, key[1], key[2]), [None] * len(
            AB.BUCKET_BOUNDS))))
        for i, (cfg, _, _) in buckets.items():
            row[i] = cfg
        last = len(AB.BUCKET_BOUNDS) - 1
        if last not in buckets:
            row[last] = buckets[max(buckets)][0]
    return {key: tuple(row) for key, row in table.items()}, measured


def table_literal(sweeps):
    table, measured = table_from_sweep(sweeps)
    src = ", ".join(f"{s['gpu']} {s['date'][:10]} commit {s.get('commit')}" for s in sweeps)
    lines = ["# BEGIN GENERATED TABLE_16BIT (bench_attention.py --emit-table --apply rewrites "
             "this block)",
             f"TABLE_16BIT_SOURCE = {('swept: ' + src)!r}",
             "TABLE_16BIT = {"]
    for key in sorted(table):
        lines.append(f"    {key!r}: (")
        for i, cfg in enumerate(table[key]):
            bound = AB.BUCKET_BOUNDS[i]
            where = f"Sk > {AB.BUCKET_BOUNDS[i - 1]}" if math.isinf(bound) else f"Sk <= {bound}"
            note = measured.get(key, {}).get(i)
            how = f"swept at S={note[1]}: {note[2]:.0f} TFLOP/s" if note else "not swept"
            lines.append(f"        {tuple(cfg)!r},  # {where}: {how}")
        lines.append("    ),")
    lines += ["}", "# END GENERATED TABLE_16BIT"]
    return "\n".join(lines) + "\n"


def apply_table(literal, path=Path(AB.__file__)):
    text = path.read_text()
    pattern = re.compile(r"# BEGIN GENERATED TABLE_16BIT.*?# END GENERATED TABLE_16BIT\n", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no '# BEGIN/END GENERATED TABLE_16BIT' block to replace")
    path.write_text(pattern.sub(lambda _: literal, text, count=1))


# ---------------------------------------------------------------------------------------------
# Decode


def decode_inputs(L, B=8, Hq=32, Hkv=8, D=128, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed + L)
    q = torch.randn(B, Hq, 1, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, L, D, generator=gen, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    return q, k, v


GRAPH_CALLS = 20
GRAPH_REPLAYS = 15


def _l2_bytes():
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)


def input_sets(first, make, nbytes):
    """``first`` and then ``make(1), make(2), ...``: enough input sets of ``nbytes`` each that
    together they exceed L2 three times."""
    n = max(1, math.ceil(3 * _l2_bytes() / max(nbytes, 1)))
    return [first] + [make(i) for i in range(1, n)]


def graph_ms(fns, context=None):
    """Median ms per call of ``fns`` (cycled, GRAPH_CALLS calls) replayed from one CUDA graph:
    the GPU time of the calls without the host's. ``context``: a context manager factory active
    while warming up and capturing (an SDPA backend choice)."""
    import contextlib

    context = context or contextlib.nullcontext
    calls = [fns[i % len(fns)] for i in range(max(GRAPH_CALLS, len(fns)))]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), context():
        for fn in fns:  # compile / pick algorithms outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with context(), torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(GRAPH_REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    del graph
    return sorted(times)[len(times) // 2]


def host_us(fn, n=200):
    """Wall µs per call of n back-to-back calls: the host's cost per call as long as the GPU
    keeps up (n is small enough that the launch queue never fills)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def _in_inference_mode(fn):
    def run():
        with torch.inference_mode():
            return fn()
    return run


def decode_row(L, sweep):
    import contextlib

    B, Hq, Hkv, D = 8, 32, 8, 128
    q, k, v = decode_inputs(L, B, Hq, Hkv, D)
    nbytes = 2 * B * Hkv * L * D * 2
    tbps = lambda ms: None if ms is None else nbytes / (ms * 1e-3) / 1e12  # noqa: E731
    ours = lambda: torch.ops.q3n.attention(q, k, v, None, None, False)  # noqa: E731
    out = ours()
    plan = AD.plan(B, Hq, Hkv, 1, L, D, D, q.dtype, False, mask_kind=0, interpreter=False,
                   device=q.device)
    row = dict(L=L, B=B, Hq=Hq, Hkv=Hkv, D=D, Sq=1, kv_bytes=nbytes, plan=plan)
    row["q3n_ms"] = bench(ours)
    row["q3n_tbps"] = tbps(row["q3n_ms"])
    sets = input_sets((q, k, v), lambda i: decode_inputs(L, B, Hq, Hkv, D, seed=100 + i),
                      nbytes)
    row["graph_input_sets"] = len(sets)
    graph_fns = [lambda s=s: torch.ops.q3n.attention(s[0], s[1], s[2], None, None, False)
                 for s in sets]
    row["q3n_graph_ms"] = graph_ms(graph_fns)
    row["q3n_graph_tbps"] = tbps(row["q3n_graph_ms"])
    row["q3n_host_us"] = host_us(ours)
    row["q3n_host_us_inference_mode"] = host_us(_in_inference_mode(ours))
    row["q3n_host_us_launcher_only"] = host_us(
        lambda: A._launch(q, k, v, None, None, False, False))
    want = None
    for name, backend in {"default": None, **DECODE_BACKENDS}.items():
        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        context = contextlib.nullcontext if backend is None else (
            lambda backend=backend: sdpa_kernel(backend))
        try:
            with context():
                res, ms = fn(), bench(fn)
                if backend is None:
                    row["sdpa_default_host_us"] = host_us(fn)
        except RuntimeError as exc:  # backend not available for this shape/build
            row[f"sdpa_{name}_ms"], row[f"sdpa_{name}_tbps"] = None, None
            row[f"sdpa_{name}_graph_ms"], row[f"sdpa_{name}_graph_tbps"] = None, None
            row[f"sdpa_{name}_error"] = _err(exc)
            continue
        want = res if want is None else want
        row[f"sdpa_{name}_ms"], row[f"sdpa_{name}_tbps"] = ms, tbps(ms)
        try:
            gms = graph_ms([lambda s=s: F.scaled_dot_product_attention(
                s[0], s[1], s[2], enable_gqa=True) for s in sets], context)
        except RuntimeError as exc:  # e.g. a backend that cannot be captured
            gms, row[f"sdpa_{name}_graph_error"] = None, _err(exc)
        row[f"sdpa_{name}_graph_ms"], row[f"sdpa_{name}_graph_tbps"] = gms, tbps(gms)
    row["max_abs_err_vs_sdpa"] = (out.float() - want.float()).abs().max().item()
    if sweep:
        row["sweep"] = []
        for bn, st, pps in DECODE_SWEEP:
            over = dict(BLOCK_N=bn, num_stages=st)
            if pps is not None:
                over["programs_per_sm"] = pps
            fn = lambda: A._launch(q, k, v, None, None, False, False, decode=over)  # noqa: E731
            try:
                err = (fn().float() - want.float()).abs().max().item()
                ms = bench(fn, warmup=10, rep=40)
                gms = graph_ms([lambda s=s: A._launch(s[0], s[1], s[2], None, None, False, False,
                                                      decode=over) for s in sets])
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                row["sweep"].append(dict(over, error=_err(exc)))
                continue
            p = AD.plan(B, Hq, Hkv, 1, L, D, D, q.dtype, False, mask_kind=0, interpreter=False,
                        device=q.device, overrides=over)
            row["sweep"].append(dict(over, ms=ms, tbps=tbps(ms), graph_ms=gms,
                                     graph_tbps=tbps(gms), max_abs_err=err,
                                     splits=p["splits"], residency=p["residency"]))
    del q, k, v, out, sets, graph_fns
    torch.cuda.empty_cache()
    return row


def static_cache_row(slots=16384, filled=4096):
    """A static cache of `slots` keys with `filled` valid ones (bool mask, as HF's SDPA path
    passes): q3n with and without skipping masked keys, and SDPA with the same mask."""
    B, Hq, Hkv, D = 8, 32, 8, 128
    q, k, v = decode_inputs(slots, B, Hq, Hkv, D, seed=1)
    keep = torch.zeros(B, 1, 1, slots, dtype=torch.bool, device="cuda")
    keep[..., :filled] = True
    filled_bytes = 2 * B * Hkv * filled * D * 2
    tbps = lambda ms: None if ms is None else filled_bytes / (ms * 1e-3) / 1e12  # noqa: E731
    row = dict(case="static cache", slots=slots, filled=filled, B=B, Hq=Hq, Hkv=Hkv, D=D,
               filled_kv_bytes=filled_bytes, tbps_of="filled K+V bytes")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]):
        want = F.scaled_dot_product_attention(q, k[:, :, :filled], v[:, :, :filled],
                                              enable_gqa=True)
    # Each input set is a whole cache (16k slots, 0.5 GB): one set already exceeds L2.
    for name, over in (("q3n", None), ("q3n_no_skip", dict(skip_dead=False))):
        fn = lambda: A._launch(q, k, v, keep, None, False, False, decode=over or {})  # noqa: E731
        row[f"{name}_max_abs_err"] = (fn().float() - want.float()).abs().max().item()
        row[f"{name}_ms"] = bench(fn)
        row[f"{name}_tbps"] = tbps(row[f"{name}_ms"])
        row[f"{name}_graph_ms"] = graph_ms([fn])
        row[f"{name}_graph_tbps"] = tbps(row[f"{name}_graph_ms"])
    try:
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep,  # noqa: E731
                                                    enable_gqa=True)
        row["sdpa_ms"] = bench(fn)
        row["sdpa_tbps"] = tbps(row["sdpa_ms"])
        row["sdpa_graph_ms"] = graph_ms([fn])
        row["sdpa_graph_tbps"] = tbps(row["sdpa_graph_ms"])
    except RuntimeError as exc:
        row.setdefault("sdpa_ms", None)
        row["sdpa_error"] = _err(exc)
    return row


def run_decode(args):
    rows = []
    data = dict(environment(args.commit), mode="decode", dtype="bfloat16",
                timer="triton.testing.do_bench median (L2 cleared per run); *_graph_*: median "
                      f"per call of {GRAPH_CALLS} calls replayed from a CUDA graph, inputs "
                      "cycled to exceed L2 3x; *_host_us: wall time per call of 200 calls",
                tbps_formula="2*B*Hkv*L*D*2 bytes (K and V, bf16) / time", rows=rows,
                static_cache=None)
    names = ("default", *DECODE_BACKENDS)
    print("TB/s of K+V bytes: do_bench / CUDA graph; host: us per call (op, inference_mode, "
          "launcher only; SDPA default)")
    print(f"{'L':>6} {'q3n':>11} " + " ".join(f"{n:>11}" for n in names)
          + "  host us: q3n  inf  launch sdpa   err   splits")
    fmt = lambda x: "   -" if x is None else f"{x:4.2f}"  # noqa: E731
    pair = lambda r, p: f"{fmt(r[p + '_tbps']):>5}/{fmt(r[p + '_graph_tbps']):<5}"  # noqa: E731
    for L in args.decode_lens:
        r = decode_row(L, args.decode_sweep)
        rows.append(r)
        write_json(args.out, data)  # after every row: a cut-short run keeps what it measured
        host = (r["q3n_host_us"], r["q3n_host_us_inference_mode"], r["q3n_host_us_launcher_only"],
                r.get("sdpa_default_host_us"))
        print(f"{L:>6} {pair(r, 'q3n')} " + " ".join(pair(r, f"sdpa_{n}") for n in names)
              + "  " + " ".join("  -" if h is None else f"{h:5.0f}" for h in host)
              + f" {r['max_abs_err_vs_sdpa']:8.1e} {r['plan']['splits']:>3} "
              f"({r['plan']['residency']})", flush=True)
        for s in r.get("sweep", []):
            print(f"       sweep BLOCK_N={s['BLOCK_N']:>3} stages={s['num_stages']} "
                  f"per_sm={s.get('programs_per_sm', 'auto')!s:>4}: "
                  + (f"{s['tbps']:5.2f} TB/s, graph {fmt(s['graph_tbps'])}, splits {s['splits']}"
                     if "tbps" in s else s["error"]), flush=True)
    static = data["static_cache"] = static_cache_row()
    write_json(args.out, data)
    print(f"static cache {static['slots']} slots, {static['filled']} filled (TB/s of filled K+V,"
          f" do_bench / graph): q3n {pair(static, 'q3n')}, without skipping "
          f"{pair(static, 'q3n_no_skip')}, SDPA with mask {fmt(static.get('sdpa_tbps'))}/"
          f"{fmt(static.get('sdpa_graph_tbps'))}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    ap.add_argument("--seqs", type=int, nargs="+", default=None,
                    help="prefill lengths (default 512..16384; --sweep: 64..16384)")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--sweep", action="store_true", help="time candidate prefill block configs")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="--sweep / --hopper-variants stop starting new shapes after this many "
                         "seconds (default 200 / 150)")
    ap.add_argument("--hopper-variants", action="store_true",
                    help="time the prefill kernel's TMA variant against the table's config "
                         "(H200, 2026-11-29: TMA 0.79-1.00x the pointer kernel, so no table "
                         "entry uses it; the warp-specialised variant gave NaN and was removed)")
    ap.add_argument("--emit-table", type=Path, nargs="+", metavar="SWEEP_JSON",
                    help="print the TABLE_16BIT literal from sweep JSON(s); no GPU needed")
    ap.add_argument("--apply", action="store_true",
                    help="with --emit-table: write it into q3n_compile/kernels/attention_blocks.py")
    ap.add_argument("--decode", action="store_true", help="decode bandwidth against SDPA")
    ap.add_argument("--decode-lens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--decode-sweep", action="store_true",
                    help="with --decode: also time tile/occupancy overrides (minutes more)")
    ap.add_argument("--commit", default=None, help="commit recorded in the JSON (default: git)")
    args = ap.parse_args()
    args.seqs_given = args.seqs is not None
    if args.seqs is None:
        args.seqs = [512, 1024, 2048, 4096, 8192, 16384]

    if args.emit_table:
        literal = table_literal([json.loads(p.read_text()) for p in args.emit_table])
        print(literal, end="")
        if args.apply:
            apply_table(literal)
            print(f"# written into {AB.__file__}", file=sys.stderr)
        return
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU (except --emit-table)")
    if args.sweep:
        if args.budget_s is None:
            args.budget_s = 200.0
        run_sweep(args)
    elif args.hopper_variants:
        run_hopper_variants(args)
    elif args.decode:
        run_decode(args)
    else:
        run_prefill(args)
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
