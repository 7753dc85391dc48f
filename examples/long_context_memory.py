"""Peak memory as the context grows: eager, Inductor and q3n on long prefill inputs.

    python examples/long_context_memory.py                       # GPU: bench-size qwen3, 1k..8k tokens
    python examples/long_context_memory.py --lengths 256 1024    # CPU: tiny model

The design's claim is that q3n needs less memory on long inputs (63% of the peak above 2048
tokens): tiled attention never materialises the S x S scores, and the memory plan puts the
intermediate buffers in one arena (q3n's executor: `--backends inductor,q3n,q3n+arena` on a GPU,
where the default executor hands the rest of the graph to Inductor, which measured leaner
there). On a GPU this script runs the bench's prefill phase at growing
lengths and prints the peak allocated memory and what was allocated above the weights and inputs
(activations), per backend, and q3n's ratio to each. On a CPU torch cannot report a peak, so it
prints q3n's own memory-plan figures from the report instead (arena against the naive sum of all
intermediate buffers).
"""

import argparse

import torch

from q3n_compile.compare import bench

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", default="qwen3")
parser.add_argument("--size", default=None, help="default: bench on a GPU, tiny on a CPU")
parser.add_argument("--lengths", type=int, nargs="+", default=None)
parser.add_argument("--backends", default="inductor,q3n")
args = parser.parse_args()

cuda = torch.cuda.is_available()
size = args.size or ("bench" if cuda else "tiny")
lengths = args.lengths or ([1024, 2048, 4096, 8192] if cuda else [128, 512])
backends = [b for b in args.backends.split(",") if b]
result = bench(args.model, size, seq_lens=lengths, backends=backends, decode_batches=[], repeats=5 if cuda else 2,
               progress=lambda m: print("  " + m, flush=True))

rows = {(r.backend, r.seq_len): r for r in result.rows}
names = ["eager", *backends]
print(f"\n{args.model}/{size} on {result.meta['gpu'] or 'cpu'}, batch 1, {result.meta['dtype']}")
if cuda:
    print(f"{'S':>6}  " + "  ".join(f"{n + ' peak/act MiB':>26}" for n in names) + "  q3n/eager  q3n/inductor")
    for s in lengths:
        cells = []
        for n in names:
            r = rows.get((n, s))
            cells.append(f"{'FAILED':>26}" if r is None or r.error else
                         f"{r.peak_alloc_mib:>14.0f} / {r.activation_mib:>9.0f}")
        q, e, i = rows.get(("q3n", s)), rows.get(("eager", s)), rows.get(("inductor", s))
        ratio = lambda a, b: f"{a.peak_alloc_mib / b.peak_alloc_mib:9.2f}" if a and b and not a.error and not b.error else "        -"
        print(f"{s:>6}  " + "  ".join(cells) + f"  {ratio(q, e)}  {ratio(q, i):>12}")
else:
    print("torch reports no peak memory on the CPU; q3n's memory plan (from its report) instead:")
    for s in lengths:
        r = rows.get(("q3n", s))
        reports = [rep for row in result.rows if row.backend == "q3n" for rep in row.reports if "memory" in rep]
        plan = reports[-1]["memory"] if reports else {}
        if r is None or r.error:
            print(f"  S={s}: q3n failed: {r.error if r else 'not run'}")
        elif plan.get("status") != "applied":
            print(f"  S={s}: memory plan {plan.get('status', 'not run')!r} (nothing planned yet)")
            break
        else:
            traced = ", ".join(str(v) for v in (plan.get("symbols") or {}).values()) or "?"
            print(f"  q3n's arena: {plan.get('arena_bytes', 0) / 2**10:.0f} KiB for {plan.get('buffer_count')} "
                  f"intermediate buffers whose naive sum is {plan.get('naive_bytes', 0) / 2**10:.0f} KiB "
                  f"(sizes at the traced length {traced})")
            break
print("\nlatency (ms) for scale:")
for s in lengths:
    print(f"  S={s:>6}: " + ", ".join(
        f"{n} {rows[(n, s)].latency_ms:.2f}" for n in names if (n, s) in rows and not rows[(n, s)].error))
