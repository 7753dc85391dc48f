"""Prefill attention on one GPU: q3n::attention against SDPA's cuDNN and FlashAttention-2 backends.

bf16, B*S = 16384 tokens, H = 32, D in {64, 128}, causal and not (the shapes of
/work/shared/baselines/h200-2026-11-28.json). Every shape is first checked against SDPA (max abs
error), then each implementation is timed in the same process with triton.testing.do_bench
(median, after warm-up). TFLOP/s counts 4*B*H*S^2*D, halved for causal.

    python bench/bench_attention.py --out bench/results/attention-h200.json
    python bench/bench_attention.py --seqs 4096 --dims 128 --sweep   # try several block configs

Writes JSON (GPU, versions, git commit, date, rows) to --out and prints a table.
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from q3n_compile.kernels import attention as A  # noqa: E402

TOKENS = 16384
HEADS = 32
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
# Candidates for --sweep: (BLOCK_M, BLOCK_N, num_warps, num_stages).
SWEEP = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
         (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 4, 3), (128, 64, 8, 4)]


from q3n_compile.compare import git_commit  # noqa: E402  (one definition for every result file)


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def run_shape(S, D, causal, sweep):
    B = TOKENS // S
    gen = torch.Generator(device="cuda").manual_seed(S * 1000 + D * 2 + causal)
    q, k, v = (torch.randn(B, HEADS, S, D, generator=gen, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    flop = 4 * B * HEADS * S * S * D * (0.5 if causal else 1.0)
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
            row[f"{name}_error"] = str(exc).splitlines()[0][:200]
    for name in ("q3n", *SDPA_BACKENDS):
        row[f"{name}_tflops"] = tflops(row[f"{name}_ms"])
    if sweep:
        row["sweep"] = []
        for bm, bn, w, st in SWEEP:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
            fn = lambda: A._launch(q, k, v, None, None, causal, False, blocks=cfg)  # noqa: E731
            try:
                e = (fn().float() - want.float()).abs().max().item()
                ms = bench(fn)
            except Exception as exc:  # e.g. out of shared memory for this config
                row["sweep"].append(dict(cfg, error=str(exc).splitlines()[0][:200]))
                continue
            row["sweep"].append(dict(cfg, ms=ms, tflops=tflops(ms), max_abs_err=e))
    del q, k, v, out, want
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--sweep", action="store_true", help="also time the SWEEP block configs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")

    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    rows = []
    hdr = (f"{'D':>4} {'S':>6} {'B':>3} {'causal':>6} {'err':>8} {'q3n':>7} {'cudnn':>7} "
           f"{'flash':>7}  TFLOP/s   {'q3n/flash':>9} {'q3n/cudnn':>9}")
    print(hdr)
    fmt = lambda x: "   -   " if x is None else f"{x:7.1f}"  # noqa: E731
    for D in args.dims:
        for S in args.seqs:
            for causal in causals:
                r = run_shape(S, D, causal, args.sweep)
                rows.append(r)
                ratio = lambda other: "    -    " if r[other] is None else (  # noqa: E731
                    f"{r['q3n_tflops'] / r[other]:9.2f}")
                print(f"{D:>4} {S:>6} {r['B']:>3} {str(causal):>6} {r['max_abs_err_vs_sdpa']:8.1e}"
                      f" {fmt(r['q3n_tflops'])} {fmt(r['cudnn_tflops'])} {fmt(r['flash_tflops'])}"
                      f"           {ratio('flash_tflops')} {ratio('cudnn_tflops')}", flush=True)
                for s in r.get("sweep", []):
                    print(f"      sweep {s['BLOCK_M']:>3}x{s['BLOCK_N']:<3} w{s['num_warps']} "
                          f"s{s['num_stages']}: " + (f"{s['tflops']:7.1f} TFLOP/s"
                                                    if "tflops" in s else s["error"]), flush=True)

    result = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        commit=git_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        dtype="bfloat16", tokens=TOKENS, heads=HEADS, timer="triton.testing.do_bench median",
        tflops_formula="4*B*H*S^2*D, halved for causal", rows=rows,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
