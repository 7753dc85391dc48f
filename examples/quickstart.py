"""Compile a small built-in model with q3n and compare it with eager.

    python examples/quickstart.py            # on a GPU if there is one, else on the CPU

Shows the three things a new user needs: the one-line compile, the output check against eager,
and the report that says what each q3n pass did to the graph.
"""

import json
import time

import torch

import q3n_compile
from q3n_compile.models import build_model, example_inputs

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model = build_model("qwen3", "tiny", dtype=dtype, device=device)
(input_ids,) = example_inputs("qwen3", model, 2, 128, device=device)

compiled = torch.compile(model, backend="q3n", dynamic=True)

with torch.no_grad():
    start = time.perf_counter()
    out = compiled(input_ids)  # the first call compiles
    print(f"first call (compile) {time.perf_counter() - start:.2f} s")
    ref = model(input_ids)
print("max abs error vs eager:", (out.float() - ref.float()).abs().max().item())

report = q3n_compile.reports()[-1]
for name, entry in report["passes"].items():
    print(f"{name:<12} {entry['status']:<16} rewritten {entry['rewritten']}")
print("q3n ops in the final graph:", json.dumps({k: v for k, v in report["ops"].items() if k.startswith("q3n")}))
