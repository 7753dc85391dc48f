"""The `q3n` command.

- ``q3n bench``: before/after comparison of eager and compiled runs of a built-in model on
  whatever device is there (latency, compile time, peak memory, error against eager).
- ``q3n dump SCRIPT.py [ARGS...]``: runs a user's script with graph dumps on and prints where each
  compiled graph went, with one line per pass.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any, Sequence

# Named configurations `q3n bench --backends` accepts; "eager" always runs as the baseline.
BACKEND_SETS: dict[str, dict[str, Any]] = {
    "inductor": {"backend": "inductor"},
    "q3n": {"backend": "q3n", "options": {}},
    "q3n+inductor": {"backend": "q3n", "options": {"executor": "inductor"}},
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="q3n", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="compare eager with compiled runs of a built-in model")
    bench.add_argument("--model", default="qwen3")
    bench.add_argument("--size", default="tiny")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    bench.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--seq-len", type=int, nargs="+", default=None, help="default: 64 on cpu, 512 2048 on cuda")
    bench.add_argument("--backends", default="q3n", help=f"comma-separated from {', '.join(BACKEND_SETS)}")
    bench.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="q3n option for every q3n backend (value parsed as JSON, else a string)")
    bench.add_argument("--repeats", type=int, default=None)
    bench.add_argument("--out", default=None, help="folder for results.json")

    dump = sub.add_parser("dump", help="run SCRIPT.py with graph dumps on")
    dump.add_argument("--dir", default="q3n_dump", help="where the dumps go (default ./q3n_dump)")
    dump.add_argument("script")
    dump.add_argument("args", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args, parser)
    return _dump(args)


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from .compare import compare, default_device, format_table, rows_as_json
    from .models import MODEL_NAMES, SIZES

    if args.model not in MODEL_NAMES:
        parser.error(f"unknown model {args.model!r}; choose from {', '.join(MODEL_NAMES)}")
    if args.size not in SIZES:
        parser.error(f"unknown size {args.size!r}; choose from {', '.join(SIZES)}")
    device = args.device or default_device()
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    dtype = None
    if args.dtype:
        dtype = getattr(torch, args.dtype, None)
        if not isinstance(dtype, torch.dtype):
            parser.error(f"unknown --dtype {args.dtype!r}; use float32, bfloat16 or float16")
    options = dict(_parse_option(parser, o) for o in args.option)
    backends = {}
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if name == "eager":
            continue
        if name not in BACKEND_SETS:
            parser.error(f"unknown backend {name!r}; choose from eager, {', '.join(BACKEND_SETS)}")
        spec = json.loads(json.dumps(BACKEND_SETS[name]))
        if spec["backend"] == "q3n":
            spec["options"].update(options)
        backends[name] = spec
    seq_lens = args.seq_len or ([512, 2048] if device == "cuda" else [64])

    print(f"q3n bench: {args.model}/{args.size} on {device}, batch {args.batch}, lengths {seq_lens}",
          file=sys.stderr)
    rows = compare(
        args.model, args.size, device=device, dtype=dtype, batch=args.batch, seq_lens=seq_lens,
        backends=backends, repeats=args.repeats,
        progress=lambda msg: print(f"  … {msg}", file=sys.stderr, flush=True),
    )
    print(format_table(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"model": args.model, "size": args.size, "device": device,
                "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                "torch": torch.__version__}
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows_as_json(rows)}, indent=2))
        print(f"wrote {out / 'results.json'}")
    return 1 if any(r.error for r in rows) else 0


def _parse_option(parser: argparse.ArgumentParser, text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        parser.error(f"--option takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _dump(args: argparse.Namespace) -> int:
    import q3n_compile

    folder = Path(args.dir).resolve()
    os.environ["Q3N_DUMP"] = str(folder)
    sys.argv = [args.script, *args.args]
    code = 0
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        reports = q3n_compile.reports()
        print(f"\nq3n dump: {len(reports)} graph(s) compiled with backend='q3n', dumps under {folder}")
        for report in reports:
            print(f"graph {report['graph_id']}: {report['dump_dir'] or '(not dumped: options set dump_dir)'}")
            for name, p in report["passes"].items():
                why = p["detail"].get("reason") or p["detail"].get("error") or ""
                print(f"  {name:<12} {p['status']:<16} matched {p['matched']:>3}  rewritten {p['rewritten']:>3}"
                      f"  {p['time_s'] * 1e3:7.2f} ms  {why}".rstrip())
    return code


if __name__ == "__main__":
    sys.exit(main())
