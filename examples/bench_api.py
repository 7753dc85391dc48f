"""The bench from Python: what `q3n bench` does, as an API, for your own model or a built-in one.

    python examples/bench_api.py                # a tiny built-in qwen3; on a GPU if there is one
    python examples/bench_api.py OUT_DIR        # also write results.json / .csv / .png there

`q3n_compile.compare.bench` takes a model name (built-in, "minilm", a local transformers folder,
"module:factory") or an nn.Module with example inputs, and named backends or your own specs.
"""

import sys

import torch

from q3n_compile.compare import bench, format_table, write_outputs

# Your own model: any nn.Module and the inputs to call it with.
model = torch.nn.Sequential(torch.nn.LayerNorm(256), torch.nn.Linear(256, 1024), torch.nn.GELU(),
                            torch.nn.Linear(1024, 256))
mine = bench(model, example_inputs=(torch.randn(4, 64, 256),), backends=["q3n"], repeats=5)
print(format_table(mine.rows, mine))

# A built-in decoder: prefill at two lengths, decode with its KV cache, and a custom q3n option set.
result = bench("qwen3", "tiny", seq_lens=[32, 64], decode_batches=[1, 2], decode_steps=4, repeats=3,
               backends={"q3n": {"backend": "q3n", "options": {}},
                         "q3n-no-attention": {"backend": "q3n", "options": {"attention": "off"}}})
print()
print(format_table(result.rows, result))
if len(sys.argv) > 1:
    files = write_outputs(result, sys.argv[1])
    print({k: str(v) for k, v in files.items() if v})
