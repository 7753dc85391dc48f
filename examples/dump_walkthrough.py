"""Write q3n's graph dumps for a small model and show where to look.

    python examples/dump_walkthrough.py [DUMP_DIR]

The same dumps come from `q3n dump your_script.py` or `Q3N_DUMP=dir python your_script.py`.
"""

import sys
from pathlib import Path

import torch

import q3n_compile
from q3n_compile.models import build_model, example_inputs

dump_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "q3n_dump")
model = build_model("llama", "tiny")
(input_ids,) = example_inputs("llama", model, 1, 16, device="cpu")
with torch.no_grad():
    torch.compile(model, backend="q3n", options={"dump_dir": str(dump_dir)})(input_ids)

folder = Path(q3n_compile.reports()[-1]["dump_dir"])
print(f"dumps in {folder}:")
for path in sorted(folder.iterdir()):
    print(f"  {path.name:<22} {path.stat().st_size:>8} bytes")
print(f"""
Read them in this order:
  {folder / '00_captured.py'}   the ATen graph q3n received (dtype and shape on every value)
  {folder}/NN_<pass>.diff       what each pass changed, in pipeline order
  {folder / 'summary.json'}     the report: per pass status, matched/rewritten, reasons
  {folder / 'graph.html'}       open in a browser: nodes q3n created are coloured by pass
""")
