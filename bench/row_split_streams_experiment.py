"""Experiment (not dispatched): the row split's two launches on two streams, so that the rest's
few rows run on the SMs the head's one wave leaves idle.

Why: at 129-192 rows of 12288 x 4096 the head's 128 rows take 96 programs of one SM each
(WIDE_TMA, 128 x 128 tiles), so 36 of the H200's 132 SMs wait while it runs; the split as
dispatched (path "rowsplit") runs the rest after it. Here the rest is launched on a side
stream forked before the head (both branches of one CUDA graph), its stream-K grid capped at
``--caps`` programs on each idle SM or not capped, in either host order. Timed with the one
launch, the split in one stream, the op as dispatched (since s41, the concurrent split where
``qlinear_wgmma.rest_beside_head`` takes it) and bf16 ``F.linear`` in the same process;
outputs checked against the one launch.

    python bench/row_split_streams_experiment.py --out bench/results/row-split-streams.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_qlinear as BQ  # noqa: E402
from q3n_compile.kernels import contract  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402

GROUP = 128


def head_programs(cfg: dict, head: int, N: int) -> int:
    if cfg.get("STREAM"):
        return cfg["STREAM"]
    return (contract.cdiv(head, cfg["BLOCK_M"]) * contract.cdiv(N, cfg["BLOCK_N"])
            * cfg.get("SPLIT_K", 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ms", type=int, nargs="+", default=[129, 136, 144, 160, 176, 192])
    ap.add_argument("--nk", nargs="+", default=["12288x4096", "14336x4096"])
    ap.add_argument("--caps", type=int, nargs="+", default=[2],
                    help="the rest's stream-K programs a head-idle SM (one variant each)")
    ap.add_argument("--sym", action="store_true", help="symmetric weights (no zero points)")
    ap.add_argument("--act", choices=["none", "int8", "fp8"], default="none",
                    help="activations (the rule measured 16-bit ones only)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("row_split_streams_experiment.py needs a CUDA GPU")
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    gen = torch.Generator(device=dev).manual_seed(0)
    side = torch.cuda.Stream()
    rows = []
    for N, K, M, x, bf16 in BQ.bf16_cases(gen, args.nk, args.ms):
        pw = BQ.random_packed(gen, N, K, 4, GROUP, args.sym)
        fmt = (pw.qweight, pw.scales, pw.zeros, None, None, 4, GROUP, K, args.act)
        head = M - M % 128
        kw = dict(symmetric=args.sym, allow_row_split=False)
        head_cfg = Q.choose_path(head, N, K, 4, GROUP, args.act, x.dtype, dev, **kw)
        rest_cfg = Q.choose_path(M - head, N, K, 4, GROUP, args.act, x.dtype, dev, **kw)
        idle = max(1, sms - head_programs(head_cfg, head, N))

        def capped(per_sm):
            return dict(rest_cfg, STREAM=min(rest_cfg["STREAM"], per_sm * idle)) \
                if rest_cfg.get("STREAM") else rest_cfg
        one_cfg = Q.choose_path(M, N, K, 4, GROUP, args.act, x.dtype, dev, **kw)

        def two_streams(rest_path, rest_first):
            def run():
                y = torch.empty((M, N), dtype=x.dtype, device=dev)
                cur = torch.cuda.current_stream()
                side.wait_stream(cur)

                def rest():
                    with torch.cuda.stream(side):
                        Q._launch(x[head:], *fmt, interpreter=False, path=rest_path,
                                  out=y[head:])

                if rest_first:
                    rest()
                Q._launch(x[:head], *fmt, interpreter=False, path=head_cfg, out=y[:head])
                if not rest_first:
                    rest()
                cur.wait_stream(side)
                return y
            return run

        calls = {
            "one": lambda: Q._launch(x, *fmt, interpreter=False, path=one_cfg),
            "split": lambda: Q._launch(x, *fmt, interpreter=False,
                                       path=dict(path="rowsplit", HEAD=head)),  # one stream
            "streams_head_first": two_streams(rest_cfg, False),
        }
        for per_sm in args.caps:
            calls[f"streams_cap{per_sm}_head_first"] = two_streams(capped(per_sm), False)
        calls["streams_cap2_rest_first"] = two_streams(capped(2), True)
        # The op as dispatched (the concurrent split where its rule takes it).
        calls["op"] = lambda: torch.ops.q3n.qlinear(x, *fmt)
        want = calls["one"]()
        row = dict(N=N, K=K, M=M, sym=args.sym, act=args.act, bf16_ms=bf16, head_cfg=head_cfg,
                   rest_cfg=rest_cfg, idle_sms=idle)
        for name, fn in calls.items():
            row[f"{name}_rel_err_vs_one"] = BQ.rel_err(fn(), want)
        BQ.time_parts(calls, row)
        rows.append(row)
        times = {k[:-3]: row[k] for k in row if k.endswith("_ms") and row[k]}
        line = " ".join(f"{k} {t:.4f}" for k, t in times.items())
        best = min(t for k, t in times.items() if k != "bf16")
        err = max(row[k] for k in row if k.endswith("_vs_one"))
        print(f"{N:>6} {K:>6} {M:>4} idle {idle:>3} | {line} | one/best "
              f"{row['one_ms'] / best:.2f}x | errs {err:.1e}", flush=True)
    BQ.write_result(args.out, dict(BQ.result_header("CUDA-graph replay, do_bench median"),
                                   sms=sms, rows=rows))


if __name__ == "__main__":
    main()
