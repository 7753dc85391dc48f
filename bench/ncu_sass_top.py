"""Where a kernel's warps wait, instruction by instruction: the SASS lines of an Nsight Compute
source page (``ncu -i REPORT --page source --print-source sass --csv``) with the most warp-stall
samples, their share of all samples, and the samples summed by opcode.

Why: the summary sections say a tile is latency-bound (one warp a scheduler, a fixed-latency
dependency the top stall) but not which instructions the samples fall on; this names them.

    ncu --set full --profile-from-start off -k regex:qlinear_wg -o /tmp/r python ...
    ncu -i /tmp/r.ncu-rep --page source --print-source sass --csv > sass.csv
    python bench/ncu_sass_top.py sass.csv [--top 40]

The CSV's columns differ between Nsight Compute versions: the script takes the source column
("Source") and the first column whose name starts with "Warp Stall Sampling (All", prints the
header it found, and every other numeric column of the top lines whose name mentions a stall.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # ncu prefixes notes with ==PROF==
    rows = list(csv.reader(lines))
    if not rows:
        sys.exit(f"{args.csv}: no CSV rows")
    if rows[0] and rows[0][0] == "Kernel Name":  # newer versions name the kernel first
        rows = rows[1:]
    head, body = rows[0], rows[1:]
    print("columns:", " | ".join(head))
    try:
        src = head.index("Source")
    except ValueError:
        sys.exit("no 'Source' column")
    samples = [i for i, h in enumerate(head) if h.startswith("Warp Stall Sampling (All")]
    if not samples:
        sys.exit("no 'Warp Stall Sampling (All ...' column")
    col = samples[0]
    stall_cols = [i for i, h in enumerate(head) if "stall" in h.lower() and i != col]
    total = sum(number(r[col]) for r in body if len(r) > col) or 1.0
    by_op = defaultdict(float)
    for r in body:
        if len(r) > col and r[src].strip():
            by_op[r[src].split()[0].split(".")[0] if not r[src].startswith("@")
                  else r[src].split()[1].split(".")[0]] += number(r[col])
    print(f"\n{len(body)} SASS lines, {total:.0f} samples ({head[col]})")
    print("\nsamples by opcode:")
    for op, n in sorted(by_op.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {op:<12} {n:>9.0f} {100 * n / total:5.1f}%")
    print(f"\ntop {args.top} lines:")
    ranked = sorted((r for r in body if len(r) > col), key=lambda r: -number(r[col]))
    for r in ranked[:args.top]:
        extra = " ".join(f"{head[i]}={r[i]}" for i in stall_cols
                         if i < len(r) and number(r[i]) > 0)
        print(f"  {number(r[col]):>7.0f} {100 * number(r[col]) / total:5.1f}%  "
              f"{r[0]:>6} {r[src][:70]:<70} {extra}")


if __name__ == "__main__":
    main()
