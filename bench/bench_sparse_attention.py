"""Block-sparse prefill attention on one GPU: q3n::sparse_attention against q3n::attention and SDPA
FlashAttention-2, with the kept attention weight it measures.

bf16, D = 128, H = 32 (no GQA, so SDPA flash runs as is), B*S = 16384 tokens, S in {4096, 8192,
16384}, causal and not, keep = 0.2. Two kinds of inputs, named in every row:

- ``random``: q, k, v ~ N(0, 1) i.i.d. Attention is flat (each row spreads its weight over all
  keys), the worst case for sparsity: the kept mass is low and the default threshold (0.95) makes
  the op fall back to dense.
- ``local``: q and k are the same smooth positional signal (sin/cos of the position at 64
  frequencies from 1 to 1e-4 rad/token, amplitude 1.5) plus N(0, 0.5^2) noise per head, v ~ N(0,1):
  each row attends mostly near itself, as many heads of trained models do. Synthetic, not a model.

Timed per shape with triton.testing.do_bench (median ms, after warm-up):
- ``sparse_ms``: the op as configured (min_mass 0.95: selection + sampled mass + one launch that
  runs sparse or dense as decided);
- ``sparse_forced_ms``: min_mass 0, always sparse (the kernel's own speed at keep = 0.2);
- ``select_ms``: the selection and the sampled mass alone (torch ops);
- ``dense_ms``: q3n::attention; ``flash_ms``: SDPA with the FlashAttention-2 backend.
Also the kept mass, the decision, the fraction of dense work the lists keep, and the forced-sparse
output's error against dense q3n (max abs, relative L2: what sparsity costs in accuracy).

    python bench/bench_sparse_attention.py --out bench/results/sparse_attention-h200.json --commit abc123

Writes JSON (GPU, versions, date, commit, rows) to --out and prints a table.
"""

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from q3n_compile.compare import git_commit  # noqa: E402
from q3n_compile.kernels import attention_sparse as S  # noqa: E402

TOKENS = 16384
HEADS = 32
D = 128
KEEP = 0.2
MIN_MASS = 0.95


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def make_inputs(kind, B, S_, gen):
    shape = (B, HEADS, S_, D)
    v = torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32)
    if kind == "random":
        q = torch.randn(*shape, generator=gen, device="cuda")
        k = torch.randn(*shape, generator=gen, device="cuda")
    else:
        pos = torch.arange(S_, device="cuda", dtype=torch.float32)[:, None]
        freqs = torch.exp(-torch.arange(D // 2, device="cuda") / (D // 2) * math.log(1e4))
        sig = 1.5 * torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], -1)
        q = sig + 0.5 * torch.randn(*shape, generator=gen, device="cuda")
        k = sig + 0.5 * torch.randn(*shape, generator=gen, device="cuda")
    return tuple(x.to(torch.bfloat16) for x in (q, k, v))


def run_shape(kind, S_, causal):
    B = max(1, TOKENS // S_)
    gen = torch.Generator(device="cuda").manual_seed(S_ * 10 + causal + (kind == "local") * 7)
    q, k, v = make_inputs(kind, B, S_, gen)
    scale = 1 / math.sqrt(D)
    sparse = lambda mm: torch.ops.q3n.sparse_attention(q, k, v, None, None, causal, KEEP, mm)  # noqa: E731
    dense = lambda: torch.ops.q3n.attention(q, k, v, None, None, causal)  # noqa: E731

    sel = S.select(q, k, None, scale, causal, KEEP, MIN_MASS)
    ref = dense().float()
    forced = sparse(0.0).float()
    configured = sparse(MIN_MASS).float()
    diff = forced - ref
    row = dict(
        inputs=kind, S=S_, B=B, H=HEADS, D=D, causal=causal, keep=KEEP, min_mass=MIN_MASS,
        block=sel.block, kept_mass=float(sel.mass),
        kept_mass_min_head=float(sel.mass_rows.double().mean(-1).min()),
        sampled_rows_per_head=len(sel.rows),
        ran="dense" if int(sel.dense) else "sparse",
        work_fraction_if_sparse=float(sel.counts.sum() / sel.allowed.sum()),
        forced_sparse_max_abs_err_vs_dense=diff.abs().max().item(),
        forced_sparse_rel_l2_vs_dense=(diff.norm() / ref.norm()).item(),
        configured_max_abs_err_vs_dense=(configured - ref).abs().max().item(),
    )
    del ref, forced, configured, diff
    row["sparse_ms"] = bench(lambda: sparse(MIN_MASS))
    row["sparse_forced_ms"] = bench(lambda: sparse(0.0))
    row["select_ms"] = bench(lambda: S.select(q, k, None, scale, causal, KEEP, MIN_MASS))
    row["dense_ms"] = bench(dense)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            row["flash_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    except RuntimeError as exc:
        row["flash_ms"] = None
        row["flash_error"] = str(exc).splitlines()[0][:200]
    del q, k, v
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--inputs", nargs="+", choices=["random", "local"], default=["random", "local"])
    ap.add_argument("--commit", default=None,
                    help="the commit benchmarked (the device copy has no .git; default: git's)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sparse_attention.py needs a CUDA GPU")

    rows = []
    print(f"{'inputs':>6} {'S':>6} {'B':>2} {'causal':>6} {'mass':>6} {'ran':>6} {'work':>5} "
          f"{'relL2':>7} {'sparse':>7} {'forced':>7} {'select':>7} {'dense':>7} {'flash':>7}  "
          f"forced/dense forced/flash  (ms)")
    fmt = lambda x: "   -   " if x is None else f"{x:7.3f}"  # noqa: E731
    for kind in args.inputs:
        for S_ in args.seqs:
            for causal in (False, True):
                r = run_shape(kind, S_, causal)
                rows.append(r)
                vs = lambda other: "    -    " if not r[other] else (  # noqa: E731
                    f"{r['sparse_forced_ms'] / r[other]:9.2f}")
                print(f"{kind:>6} {S_:>6} {r['B']:>2} {str(causal):>6} {r['kept_mass']:6.3f} "
                      f"{r['ran']:>6} {r['work_fraction_if_sparse']:5.2f} "
                      f"{r['forced_sparse_rel_l2_vs_dense']:7.1e} {fmt(r['sparse_ms'])} "
                      f"{fmt(r['sparse_forced_ms'])} {fmt(r['select_ms'])} {fmt(r['dense_ms'])} "
                      f"{fmt(r['flash_ms'])}  {vs('dense_ms')}    {vs('flash_ms')}", flush=True)

    result = dict(
        bench="sparse_attention", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__, commit=args.commit or git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(), dtype="bfloat16",
        tokens=TOKENS, heads=HEADS, head_dim=D, timer="triton.testing.do_bench median (ms)",
        inputs_doc={"random": "q, k, v ~ N(0, 1) i.i.d.: flat attention",
                    "local": "q, k = 1.5 * sin/cos(position * 64 freqs in [1e-4, 1]) + N(0, 0.25); "
                             "v ~ N(0, 1): attention near the diagonal (synthetic)"},
        rows=rows,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
