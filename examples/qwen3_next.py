"""A Qwen3-Next-style model (transformers' Qwen3NextForCausalLM, random weights) under q3n.

    python examples/qwen3_next.py                 # tiny config; on a GPU if there is one
    python examples/qwen3_next.py --size bench    # Qwen3-Next-80B-A3B layer widths, 4 layers, 64 experts

Qwen3-Next mixes three linear-attention layers (gated delta rule) with one gated full-attention
layer, routes its feed-forward through a mixture of experts, and uses zero-centred RMSNorm. q3n's
attention pass can only rewrite the full-attention layer; the report says what it matched. Without
flash-linear-attention installed, transformers runs the linear-attention layers with its torch
reference, which Dynamo traces (a loop over 64-token chunks). The script compiles the forward,
compares it with eager, prints the per-pass report, then generates a few tokens with a static
cache and the decode step compiled by q3n.
"""

import argparse
import time

import torch

import q3n_compile
from q3n_compile.hf_models import build_qwen3_next, generate_tokens

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--size", default="tiny", choices=["tiny", "bench"])
parser.add_argument("--length", type=int, default=40)
parser.add_argument("--new-tokens", type=int, default=6, help="0: skip the generate() part")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model = build_qwen3_next(args.size, dtype=dtype, device=device)
config = model.config
print(f"Qwen3-Next {args.size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
      f"layers {config.layer_types}, {config.num_experts} experts (top {config.num_experts_per_tok}), "
      f"attention {config.num_attention_heads}/{config.num_key_value_heads} heads of {config.head_dim} with output gate")

gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, config.vocab_size, (2, args.length), generator=gen).to(device)
with torch.no_grad():
    ref = model(ids)
    start = time.perf_counter()
    out = torch.compile(model, backend="q3n")(ids)
    print(f"q3n compile + first call: {time.perf_counter() - start:.1f} s")
err = (out.float() - ref.float()).abs().max().item()
print(f"max abs error vs eager: {err:.3e}  (logits scale {ref.float().abs().max().item():.2f})")

for report in q3n_compile.reports():
    print(f"graph {report['graph_id']}:")
    for name, p in report["passes"].items():
        why = p["detail"].get("reason") or p["detail"].get("error") or ""
        reasons = sorted(p.get("declined", {}).items(), key=lambda kv: -kv[1])
        declined = "; ".join(f"declined x{v}: {k}" for k, v in reasons[:3]) + (" ..." if len(reasons) > 3 else "")
        print(f"  {name:<12} {p['status']:<16} matched {p['matched']:>3} rewritten {p['rewritten']:>3}  "
              f"{why} {declined}".rstrip())
    print("  q3n ops:", {k: v for k, v in report["ops"].items() if k.startswith("q3n")} or "none")

if args.new_tokens <= 0:
    raise SystemExit(0)
q3n_compile.reset_reports()
with torch.no_grad():
    eager_tokens = generate_tokens(model.hf, ids[:, :8], args.new_tokens, None)
    start = time.perf_counter()
    q3n_tokens = generate_tokens(model.hf, ids[:, :8], args.new_tokens, {"backend": "q3n"})
    took = time.perf_counter() - start
print(f"generate (static cache, decode step compiled by q3n, {took:.1f} s with compilation): "
      f"{q3n_tokens[0].tolist()}  same as eager: {torch.equal(q3n_tokens, eager_tokens)}")
