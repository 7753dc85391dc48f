"""A transformers Qwen3 model with written-out ("eager") attention against the same model on SDPA.

The attention issue's model benchmark: ``Qwen3ForCausalLM`` with qwen3 "bench"'s shape (4 layers,
hidden 4096, 32/8 heads of 128, bf16; built by ``hf_models.hf_twin`` from the built-in model, so
the weights are random and shared), one prefill of ``--seq`` tokens (batch 1,
``logits_to_keep=1`` as ``generate`` asks at prefill, so the vocabulary projection of every
position does not hide attention's memory). Rows, all in one run:

- ``eager`` / ``inductor`` / ``q3n``: the model with ``attn_implementation="eager"`` (the S x S
  score matrix written out), run as is, under ``torch.compile`` and under ``backend="q3n"``;
- ``sdpa`` / ``sdpa-inductor``: the same weights with ``attn_implementation="sdpa"``, as is and
  under ``torch.compile`` (the peer the issue names: the written-out model under q3n should be no
  slower and no larger than this).

Per row: latency (CUDA events, median of ``--reps`` warm calls), peak memory (max_memory_allocated
over one warm call from a reset; absolute and above the weights), and the last position's logits
against the ``sdpa`` row (relative error). Writes JSON (GPU, versions, commit, date) to ``--out``.

    python bench/bench_hf_attention_model.py --seq 8192 --out bench/results/hf-attention-model-h200.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import q3n_compile  # noqa: E402
from bench_memory import Device, versions  # noqa: E402  (one timer and version record for bench/)
from q3n_compile.compare import git_commit  # noqa: E402
from q3n_compile.hf_models import hf_twin  # noqa: E402
from q3n_compile.models import build_model  # noqa: E402

ROWS = ("sdpa", "sdpa-inductor", "eager", "inductor", "q3n")


def model_for(row: str, twins: dict):
    model = twins["sdpa" if row.startswith("sdpa") else "eager"]
    if row in ("sdpa", "eager"):
        return model
    if row in ("sdpa-inductor", "inductor"):
        return torch.compile(model, dynamic=False)
    return torch.compile(model, backend="q3n", dynamic=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated from {', '.join(ROWS)}")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu only smoke-tests this script (no memory figures)")
    ap.add_argument("--size", default="bench", help="built-in qwen3 size the twin copies")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown row(s) {unknown}; valid: {', '.join(ROWS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_hf_attention_model.py needs a CUDA GPU (--device cpu only smoke-tests it)")
    dev = Device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    ours = build_model("qwen3", args.size, dtype=dtype, device=args.device)
    twins = {"eager": hf_twin(ours, attn_implementation="eager").eval()}
    twins["sdpa"] = hf_twin(ours, attn_implementation="sdpa").eval()
    del ours
    gc.collect()
    weights = sum(p.numel() * p.element_size() for m in twins.values() for p in m.parameters())
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, twins["eager"].config.vocab_size, (1, args.seq), generator=gen).to(args.device)

    def call(fn):
        return fn(input_ids=ids, logits_to_keep=1, use_cache=False).logits

    results, reference = [], None
    print(f"{'row':<14} {'ms':>8} {'peak GB':>8} {'above wts':>9} {'rel err':>8}", flush=True)
    with torch.no_grad():
        for row in rows:
            torch._dynamo.reset()
            gc.collect()
            dev.empty_cache()
            entry = {"row": row, "seq": args.seq}
            try:
                baseline = dev.allocated()
                fn = model_for(row, twins)
                t0 = time.perf_counter()
                out = call(fn)
                dev.sync()
                entry["first_call_s"] = round(time.perf_counter() - t0, 2)
                call(fn)
                dev.sync()
                dev.reset_peak()
                out = call(fn)
                dev.sync()
                peak = dev.peak()
                logits = out[0, -1].float()
                if row == "sdpa":
                    reference = logits.clone()
                if reference is not None:
                    entry["rel_err_vs_sdpa"] = ((logits - reference).norm() / reference.norm()).item()
                del out
                entry["latency_ms"], entry["latency_all_ms"] = dev.time_calls(lambda *_: call(fn), (), args.reps)
                entry.update(peak_bytes=peak, peak_above_weights_bytes=None if peak is None else peak - baseline)
                if row == "q3n":
                    report = q3n_compile.reports()[-1]
                    entry["q3n_attention"] = {k: report["passes"]["attention"].get(k)
                                              for k in ("status", "rewritten", "matched")}
                del fn
            except Exception as err:  # noqa: BLE001 - one failing row must not cost the others
                entry["error"] = f"{type(err).__name__}: {err}"[:500]
                print(f"{row:<14} failed: {entry['error']}", flush=True)
                results.append(entry)
                continue
            results.append(entry)
            gb = lambda x: "-" if x is None else f"{x / 1e9:.3f}"  # noqa: E731
            err = entry.get("rel_err_vs_sdpa")
            print(f"{row:<14} {entry['latency_ms']:8.2f} {gb(entry['peak_bytes']):>8} "
                  f"{gb(entry['peak_above_weights_bytes']):>9} {'-' if err is None else f'{err:.1e}':>8}",
                  flush=True)

    meta = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", **versions(),
            "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "model": f"transformers Qwen3ForCausalLM, qwen3 {args.size} shape", "seq": args.seq,
            "batch": 1, "weights_bytes_both_twins": weights, "timer": "CUDA events, median",
            "peak": "max_memory_allocated over one warm call; above weights: over the allocation "
                    "before the row (both twins' weights)", "rows": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(meta, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
