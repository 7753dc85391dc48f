"""Memory-bound calls timed with the L2 left in two states: full of dirty lines (what
``triton.testing.do_bench`` leaves: it zeroes a 256 MB buffer before each repetition) and full
of clean lines (the same buffer read instead). W4A16 g128 as the op dispatches it, bf16
``F.linear``, torch's int4 kernel, a plain read of the packed weight's bytes and a bf16 copy of
the weight's size, at 1 and 16 rows of the issue's shapes, each as a CUDA-graph replay.

Why: issue 5's 3.4 TB/s goal at 1 and 16 rows is a bandwidth on a weight of 8-123 MB read in
12-50 us. After do_bench's flush the L2 (60 MB on the H200) holds the tail of the zeroed
buffer, dirty: each line the call brings in evicts one that must first be written back to
DRAM, so a call that only reads shares the bus with up to 60 MB of writes it did not make. In a
model the L2 before a linear holds the previous layers' weights and activations, mostly clean.
This script measures how much of the gap is that state and reports both; it changes no
benchmark's method.

    python bench/bench_l2_state.py --out bench/results/l2-state-h200.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_qlinear as BQ  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402

FLUSH_BYTES = 256 << 20  # do_bench's buffer


@triton.jit
def read_kernel(W, OUT, n_words, CHUNK: tl.constexpr):
    """Reads W's int32 words in CHUNK-word pieces, programs striding over them; xors them
    into one word a program so the loads are kept."""
    pid = tl.program_id(0)
    offs = tl.arange(0, CHUNK)
    acc = tl.zeros([CHUNK], dtype=tl.int32)
    for start in range(pid * CHUNK, n_words, tl.num_programs(0) * CHUNK):
        idx = start + offs
        acc ^= tl.load(W + idx, mask=idx < n_words, other=0)
    tl.store(OUT + pid, tl.xor_sum(acc, 0))


def read_fn(words: torch.Tensor, programs: int, chunk: int, warps: int):
    out = torch.empty(programs, dtype=torch.int32, device=words.device)
    n = words.numel()
    return lambda: read_kernel[(programs,)](words, out, n, CHUNK=chunk, num_warps=warps)


def replay_ms(fn, prep, reps: int) -> float:
    """Median ms of a CUDA-graph replay of fn(), `prep()` (the L2's state) before each."""
    g = BQ.captured(fn)
    for _ in range(10):
        prep()
        g.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        prep()
        start.record()
        g.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def launch_variants(M: int, N: int, K: int, dev, sms: int) -> list:
    """(label, launch) of the W4A16 op beside its dispatch: where that is the decode tile
    (qlinear_wgmma.choose_decode), 3 / 5 / 6 stages, one program an SM, 128 columns over
    four programs an SM, no PDL, with XSUM (5 stages too) where it has none; and the dispatch
    without the wg path (gemv1p / mmT)."""
    base = Q.choose_path(M, N, K, 4, 128, "none", torch.bfloat16, dev)
    out = []
    if base.get("path") == "wg" and base.get("SCALE_AFTER"):
        out += [(f"decode {s} stages", dict(base, STAGES=s)) for s in (3, 5, 6)]
        out += [("decode 1 program/SM", dict(base, STREAM=sms)),
                ("decode 128 cols 4/SM", dict(base, BLOCK_N=128, STREAM=4 * sms)),
                ("decode no PDL", dict(base, PDL=False))]
        if not base.get("XSUM"):
            out += [("decode XSUM", dict(base, XSUM=True)),
                    ("decode XSUM 5 stages", dict(base, XSUM=True, STAGES=5))]
    other = Q.choose_path(M, N, K, 4, 128, "none", torch.bfloat16, dev, allow_wg=False)
    return out + [(f"{other['path']} (no wg)", other)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--nk", nargs="+", default=["4096x4096", "12288x4096", "4096x12288",
                                                "28672x8192"])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--variants", action="store_true",
                    help="also the op's launch with other stages / grids / tiles where it "
                         "takes the decode tile, and the dispatch without the wg path")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_l2_state.py needs a CUDA GPU")
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=dev)
    flush.random_()
    states = {
        # do_bench's own preparation.
        "dirty": lambda: flush.zero_(),
        # The same bytes read: the L2 ends full of clean lines of the buffer.
        "clean": lambda: flush.sum(dtype=torch.int64),
    }
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for nk in args.nk:
        N, K = map(int, nk.split("x"))
        w = (torch.randn(N, K, generator=gen, device=dev) / K ** 0.5).to(torch.bfloat16)
        pw = BQ.random_packed(gen, N, K, 4, 128, False)
        packed = pw.nbytes
        words = pw.qweight.reshape(-1)  # the packed codes, int32
        wcopy = torch.empty_like(w)
        impls = {f"read {p // sms}/SM x {c} x {nw}w": (read_fn(words, p, c, nw),
                                                          words.numel() * 4)
                 for p, c, nw in ((2 * sms, 4096, 8), (4 * sms, 2048, 4), (8 * sms, 1024, 4),
                                  (4 * sms, 4096, 8))}
        impls["copy bf16 weight"] = (lambda: wcopy.copy_(w), 2 * w.numel() * 2)
        for M in args.ms:
            x = torch.randn(M, K, generator=gen, device=dev).to(torch.bfloat16)
            fmt = (pw.qweight, pw.scales, pw.zeros, None, None, 4, 128, K, "none")
            calls = dict(impls)
            calls["q3n W4A16"] = (lambda: torch.ops.q3n.qlinear(x, *fmt), packed)
            calls["bf16 F.linear"] = (lambda: F.linear(x, w), w.numel() * 2)
            if args.variants:
                want = torch.ops.q3n.qlinear(x, *fmt)
                for label, cfg in launch_variants(M, N, K, dev, sms):
                    f = (lambda cfg=cfg: Q._launch(x, *fmt, interpreter=False, path=cfg))
                    err = BQ.rel_err(f(), want)
                    if err > BQ.TOL:
                        print(f"  {label}: wrong result, {err:.3g} from the op's", flush=True)
                        continue
                    calls[f"q3n {label}"] = (f, packed)
            fn, err, nbytes, _ = BQ.int4_torch(w, x)
            if fn is not None:
                calls["torch int4"] = (fn, nbytes)
            for name, (fn, nbytes) in calls.items():
                if name.startswith(("read", "copy")) and M != args.ms[0]:
                    continue  # independent of M
                row = dict(N=N, K=K, M=M, impl=name, bytes=nbytes)
                for state, prep in states.items():
                    ms = replay_ms(fn, prep, args.reps)
                    row[f"{state}_ms"] = ms
                    row[f"{state}_tbs"] = nbytes / ms / 1e9
                rows.append(row)
                print(f"{N:>6} {K:>6} {M:>3} {name:<26} {nbytes / 1e6:8.1f} MB | dirty "
                      f"{row['dirty_ms']:.4f} ms {row['dirty_tbs']:.2f} TB/s | clean "
                      f"{row['clean_ms']:.4f} ms {row['clean_tbs']:.2f} TB/s | "
                      f"{row['dirty_ms'] / row['clean_ms']:.2f}x", flush=True)
    BQ.write_result(args.out, dict(BQ.result_header(
        "CUDA-graph replay, median of per-replay CUDA events; before each replay the 256 MB "
        "buffer zeroed (dirty) or read (clean)"), sms=sms, rows=rows))


if __name__ == "__main__":
    main()
