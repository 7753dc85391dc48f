"""The `q3n` command.

- ``q3n bench``: before/after comparison of eager, Inductor and q3n (under named option sets) on
  one model, on whatever device is there: compile time, prefill latency, decode tokens/s with a KV
  cache, generate() tokens/s, peak memory, error against eager; a table, JSON, CSV and a PNG.
- ``q3n plot RESULTS.json``: draw the bench's PNG from its JSON (needs matplotlib).
- ``q3n dump SCRIPT.py [ARGS...]``: runs a user's script with graph dumps on and prints where each
  compiled graph went, with one line per pass.
- ``q3n quant-search --model bert --budget 0.05 --out cfg.json``: chooses weight bits per linear
  (the fewest bytes within a relative output error budget per layer, on calibration inputs),
  prints a table per layer and saves the ``quant_config`` to give ``torch.compile`` (see
  :mod:`q3n_compile.quant.search`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any, Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from .compare import BACKEND_SETS

    parser = argparse.ArgumentParser(prog="q3n", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser(
        "bench", help="compare eager, Inductor and q3n on one model (latency, decode, memory, errors)",
        description="Compile one model several ways and compare them: prefill latency (time to first "
        "token), decode tokens/s with a KV cache, generate() tokens/s, peak GPU memory, compile time, "
        "error against eager. Writes a table, results.json, results.csv and results.png.",
    )
    bench.add_argument("--model", default="qwen3",
                       help="built-in (qwen3, llama, gpt2, bert, qwen3-next), minilm (real weights), a local "
                       "transformers model folder, or module:factory / file.py:factory (default: qwen3)")
    bench.add_argument("--size", default="tiny", help="built-in model size: tiny (default) or bench")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    bench.add_argument("--dtype", default=None,
                       help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)")
    bench.add_argument("--batch", type=int, nargs="+", default=None,
                       help="prefill batch sizes (default 1; for minilm: how many of the shipped sentences)")
    bench.add_argument("--seq-len", type=int, nargs="+", default=None,
                       help="prefill lengths (default: 64 on cpu; 512 2048 8192 on cuda)")
    bench.add_argument("--decode-batch", type=int, nargs="+", default=None,
                       help="decode batch sizes (default: 1 on cpu; 1 8 on cuda)")
    bench.add_argument("--decode-context", type=int, default=None,
                       help="prompt length before decoding (default: 32 on cpu; 1024 on cuda)")
    bench.add_argument("--decode-steps", type=int, default=None,
                       help="timed decode steps (default: 16 on cpu; 32 on cuda)")
    bench.add_argument("--no-decode", action="store_true", help="skip the decode phase")
    bench.add_argument("--no-prefill", action="store_true", help="skip the prefill phase")
    bench.add_argument("--generate", type=int, default=0, metavar="N",
                       help="also time transformers' model.generate of N new tokens (static cache) per backend")
    bench.add_argument("--generate-batch", type=int, default=None, metavar="B",
                       help="batch size of --generate (default: the first decode batch size)")
    bench.add_argument("--backends", default=None,
                       help=f"comma-separated from {', '.join(BACKEND_SETS)}, or 'all' (default: all but "
                       "inductor-cudagraphs; on cpu also without inductor-max-autotune); eager always runs")
    bench.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="q3n option for every q3n backend (value parsed as JSON, else a string)")
    bench.add_argument("--q3n-set", action="append", default=[], metavar="NAME=JSON",
                       help="an extra q3n backend NAME with these options, e.g. 'noattn={\"attention\": \"off\"}'")
    bench.add_argument("--repeats", type=int, default=None, help="timed calls per case, at most (default: 10 cpu, 20 cuda)")
    bench.add_argument("--warmup", type=int, default=None, help="untimed calls after compiling (default: 2 cpu, 3 cuda)")
    bench.add_argument("--time-budget", type=float, default=None,
                       help="seconds of timed calls per case; fewer repeats when calls are slow (default 2 cpu, 3 cuda)")
    bench.add_argument("--dynamic", choices=("true", "false", "auto"), default="true",
                       help="torch.compile(dynamic=...): true (default) compiles one graph for every length and batch; "
                       "false specialises each shape; auto is torch's default")
    bench.add_argument("--no-specialize-float", action="store_true",
                       help="compile without torch._dynamo.config.specialize_float: the model's float "
                            "attributes (norm eps, attention scaling) then reach every backend as 0-d "
                            "tensors made on each call, as under torch's default (more host time a step)")
    bench.add_argument("--warm-cache", action="store_true",
                       help="keep Inductor's FX-graph and AOTAutograd caches on (compile times are cold by default)")
    bench.add_argument("--attn-implementation", default=None,
                       help="transformers attention for transformers models: eager or sdpa (default: the model's; "
                       "eager for the generate twins of the built-in decoders)")
    bench.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default 0)")
    bench.add_argument("--keep-weights", action="store_true",
                       help="keep the high-precision weights of quantized backends' model copies (by "
                            "default they are released after compiling, as a deployment would, so "
                            "peak memory counts the packed weights only)")
    bench.add_argument("--threads", type=int, default=None,
                       help="torch.set_num_threads for CPU runs (default: torch's); 1 steadies timings on a busy machine")
    bench.add_argument("--out", default=None,
                       help="folder for results.json/.csv/.png (default ./q3n_bench/<model>-<size>-<device>-<time>)")
    bench.add_argument("--no-plot", action="store_true", help="do not draw results.png")
    bench.add_argument("--quiet", action="store_true", help="no progress lines")

    plot = sub.add_parser("plot", help="draw the PNG of a q3n bench results.json (needs matplotlib)")
    plot.add_argument("results", help="a results.json written by q3n bench, or the results.partial.jsonl "
                                      "of a run that was stopped")
    plot.add_argument("--out", default=None, help="PNG path (default: results.png beside the JSON)")

    dump = sub.add_parser("dump", help="run SCRIPT.py with graph dumps on")
    dump.add_argument("--dir", default="q3n_dump", help="where the dumps go (default ./q3n_dump)")
    dump.add_argument("script")
    dump.add_argument("args", nargs=argparse.REMAINDER)

    qs = sub.add_parser(
        "quant-search", help="choose weight bits per layer within an error budget; save the quant_config",
        description="Calibrate a model on sample inputs, then give each linear the fewest weight bytes "
        "whose relative output error (on those inputs, layer by layer) is within --budget. Prints a table "
        "per layer and saves the chosen quant_config as JSON: torch.compile(model, backend='q3n', "
        "options={'quant_config': json.load(open(OUT))}). The budget is per layer: errors compound "
        "through depth, so the model's output error is larger.",
    )
    qs.add_argument("--model", default="bert",
                    help="built-in model (qwen3, llama, gpt2, bert, qwen3-next) or minilm (real weights; "
                    "calibrates on the shipped sentences)")
    qs.add_argument("--size", default="tiny", help="built-in model size: tiny (default) or bench")
    qs.add_argument("--budget", type=float, default=0.02,
                    help="relative output error allowed per layer, in (0, 1) (default 0.02)")
    qs.add_argument("--batches", type=int, default=None, help="calibration batches (default 4; minilm: "
                    "how many of the shipped sentences, one per batch, default all)")
    qs.add_argument("--batch", type=int, default=2, help="sequences per calibration batch (default 2)")
    qs.add_argument("--seq-len", type=int, default=32, help="calibration sequence length (default 32)")
    qs.add_argument("--bits", type=int, nargs="+", default=None,
                    help="weight bit widths to try (default 3 4 5 6 8; 16 = keep is always the fallback)")
    qs.add_argument("--activation-bits", type=int, default=16,
                    help="activation precision of every candidate: 16 (weight-only, default), 8 "
                    "(dynamic int8/fp8 per token) or 12")
    qs.add_argument("--activation-group-size", default=None,
                    help="with 8/12-bit activations: one scale per token (default, 'token') or per "
                    "token and 32/64/128 input channels")
    qs.add_argument("--include-heads", action="store_true", help="also search lm_head and other heads")
    qs.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default 0)")
    qs.add_argument("--out", default=None, help="write the chosen quant_config here (JSON)")
    qs.add_argument("--report", default=None, help="write the whole search (every layer, every format "
                    "tried) here (JSON)")
    qs.add_argument("--quiet", action="store_true", help="no progress lines")

    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args, bench)
    if args.command == "plot":
        return _plot(args)
    if args.command == "quant-search":
        return _quant_search(args, qs)
    return _dump(args)


def _with_activations(candidates: tuple, args: argparse.Namespace,
                      parser: argparse.ArgumentParser) -> tuple:
    """The weight-format candidates with --activation-bits (and --activation-group-size)."""
    act_bits, group = args.activation_bits, args.activation_group_size
    if act_bits not in (16, 12, 8):
        parser.error(f"--activation-bits {act_bits} is not supported; use 16 (weight-only), 8 or 12")
    if group is not None and str(group).lower() not in ("token", "-1"):
        if act_bits == 16:
            parser.error(f"--activation-group-size {group} needs quantized activations: add "
                         "--activation-bits 8 (or 12), or drop --activation-group-size")
        if group not in ("32", "64", "128"):
            parser.error(f"--activation-group-size {group} is not supported; use 32, 64, 128 or "
                         "'token' (one scale per token)")
        return tuple((b, act_bits, g, int(group)) for b, _a, g in candidates)
    return tuple((b, act_bits, g) for b, _a, g in candidates)


def _quant_search(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from .models import HF_MODEL_NAMES, MODEL_NAMES, SIZES
    from .quant import clear
    from .quant.search import DEFAULT_CANDIDATES, format_table, search_precision

    models = MODEL_NAMES + HF_MODEL_NAMES + ("minilm",)
    if args.model not in models:
        parser.error(f"unknown model {args.model!r}; choose from {', '.join(models)}")
    if args.size not in SIZES:
        parser.error(f"unknown size {args.size!r}; choose from {', '.join(SIZES)}")
    if not 0 < args.budget < 1:
        parser.error(f"--budget {args.budget:g} is not a relative error in (0, 1); e.g. 0.02 keeps "
                     "each layer's output within 2% of high precision")
    for flag in ("batches", "batch", "seq_len"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} takes a positive integer, got {getattr(args, flag)}")
    candidates = DEFAULT_CANDIDATES
    if args.bits:
        bad = [b for b in args.bits if b not in (2, 3, 4, 5, 6, 7, 8)]
        if bad:
            parser.error(f"--bits {bad[0]} is not supported; use widths from 2 to 8")
        # Per bit width: the automatic group (128 where it divides K), group 32 for 2-3 bits
        # (which need small groups), per channel for 8 bits.
        candidates = tuple((b, 16, -1 if b == 8 else (32 if b <= 3 else 0))
                           for b in sorted(set(args.bits)))
    candidates = _with_activations(candidates, args, parser)

    torch.manual_seed(args.seed)
    progress = None if args.quiet else _search_progress
    label = args.model if args.model == "minilm" else f"{args.model}/{args.size}"
    groups = {0: "", -1: " per channel"}
    act = "" if args.activation_bits == 16 else f"A{args.activation_bits}"
    if len(candidates[0]) > 3:
        act += f" act-g{candidates[0][3]}"
    print(f"q3n quant-search: {label}, budget {args.budget:g} per layer, formats "
          f"{', '.join(f'W{c[0]}{act}' + groups.get(c[2], f' g{c[2]}') for c in candidates)}",
          file=sys.stderr, flush=True)
    try:
        model, batches = _search_model(args)
    except Exception as err:  # noqa: BLE001 - a model that cannot be built is reported, not raised
        print(f"q3n quant-search: error: cannot build {label}: {err}", file=sys.stderr)
        return 2
    clear()
    with torch.no_grad():
        result = search_precision(model, batches, budget=args.budget, candidates=candidates,
                                  include_heads=args.include_heads, progress=progress)
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result["quant_config"], indent=1) + "\n")
        print(f"\nwrote {args.out} (quant_config: torch.compile(model, backend='q3n', "
              "options={'quant_config': json.load(open(...))}))")
    if args.report:
        Path(args.report).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.report}")
    return 0


def _search_model(args: argparse.Namespace):
    """(model, calibration batches) for quant-search."""
    if args.model == "minilm":
        from .hf_models import load_minilm, load_sentences

        tokenizer, model = load_minilm()
        sentences = load_sentences()[: args.batches]  # [:None]: all
        return model, [dict(tokenizer([s], return_tensors="pt")) for s in sentences]
    from .models import build_model, example_inputs

    model = build_model(args.model, args.size, seed=args.seed)
    batches = [example_inputs(args.model, model, args.batch, args.seq_len, seed=args.seed + 1 + i)
               for i in range(args.batches or 4)]
    return model, batches


def _search_progress(entry: dict) -> None:
    err = entry.get("rel_err")
    print(f"  [{entry['index'] + 1}/{entry['total']}] {entry['layer']}: {entry['format']}"
          + ("" if err is None else f" (rel err {err:.4f})"), file=sys.stderr, flush=True)


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from .compare import (BACKEND_SETS, DEFAULT_BACKENDS_CPU, DEFAULT_BACKENDS_CUDA, bench, default_device,
                          format_table, git_commit, parse_backend_set, rows_as_json, write_outputs)
    from .config import Q3NConfig, Q3NConfigError
    from .hf_models import ModelLoadError, is_factory_spec
    from .models import HF_MODEL_NAMES, MODEL_NAMES, SIZES

    builtin = MODEL_NAMES + HF_MODEL_NAMES + ("minilm",)
    model = args.model
    if model not in builtin and not os.path.isdir(model) and not is_factory_spec(model):
        if os.sep in model or model.startswith((".", "~")):
            parser.error(f"model folder {model!r} does not exist")
        parser.error(f"unknown model {model!r}; choose from {', '.join(builtin)}, a local transformers "
                     "model folder, or module:factory")
    if args.size not in SIZES:
        parser.error(f"unknown size {args.size!r}; choose from {', '.join(SIZES)}")
    device = args.device or default_device()
    if device not in ("cpu", "cuda"):
        parser.error(f"unknown --device {device!r}; use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    dtype = None
    if args.dtype:
        dtype = getattr(torch, args.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            parser.error(f"unknown --dtype {args.dtype!r}; use float32, bfloat16 or float16")
    for flag in ("batch", "seq_len", "decode_batch"):
        values = getattr(args, flag) or []
        if any(v < 1 for v in values):
            parser.error(f"--{flag.replace('_', '-')} takes positive integers, got {values}")
    for flag in ("decode_context", "decode_steps", "repeats", "generate_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} takes a positive integer, got {value}")
    if args.generate < 0:
        parser.error(f"--generate takes a number of new tokens >= 0, got {args.generate}")

    options = dict(_parse_option(parser, o) for o in args.option)
    if args.backends is None:
        names = list(DEFAULT_BACKENDS_CUDA if device == "cuda" else DEFAULT_BACKENDS_CPU)
    elif args.backends.strip() == "all":
        names = list(BACKEND_SETS)
    else:
        names = [b.strip() for b in args.backends.split(",") if b.strip()]
    backends: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == "eager":
            continue
        if name not in BACKEND_SETS:
            parser.error(f"unknown backend {name!r}; choose from eager, {', '.join(BACKEND_SETS)}")
        backends[name] = json.loads(json.dumps(BACKEND_SETS[name]))
    for text in args.q3n_set:
        try:
            name, spec = parse_backend_set(text)
        except ValueError as err:
            parser.error(f"--q3n-set {err}")
        backends[name] = spec
    for name, spec in backends.items():
        if spec["backend"] != "q3n":
            continue
        spec["options"].update(options)
        try:
            Q3NConfig.from_options(spec["options"], mode=spec.get("mode"))
        except Q3NConfigError as err:
            parser.error(f"backend {name}: {err}")

    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads takes a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    dynamic = {"true": True, "false": False, "auto": None}[args.dynamic]
    decode_batches = [] if args.no_decode else args.decode_batch
    if args.no_prefill:
        args.seq_len = []
    progress = None if args.quiet else (lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    print(f"q3n bench: {model}{'/' + args.size if model in MODEL_NAMES + HF_MODEL_NAMES else ''} on {device}; "
          f"backends: eager, {', '.join(backends)}", file=sys.stderr, flush=True)
    out = Path(args.out) if args.out else _default_out(model, args.size, device)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "results.partial.jsonl"
    # First line: what is known of the run before it starts (the full meta comes with results.json).
    started = {"meta": {"label": f"{model}{'/' + args.size if model in MODEL_NAMES + HF_MODEL_NAMES else ''}",
                        "device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                        "torch": torch.__version__, "commit": git_commit(),
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "argv": sys.argv}}
    partial.write_text(json.dumps(started) + "\n")

    def save_row(row) -> None:
        # One JSON line per measured row: a run stopped half-way still leaves its figures.
        with partial.open("a") as f:
            f.write(json.dumps(rows_as_json([row])[0], default=str) + "\n")

    try:
        result = bench(
            model, args.size, device=device, dtype=dtype, backends=backends, seq_lens=args.seq_len,
            batches=args.batch, decode_batches=decode_batches, decode_context=args.decode_context,
            decode_steps=args.decode_steps, generate=args.generate, generate_batch=args.generate_batch,
            repeats=args.repeats, warmup=args.warmup,
            time_budget_s=args.time_budget, dynamic=dynamic, warm_cache=args.warm_cache,
            specialize_float=not args.no_specialize_float,
            attn_implementation=args.attn_implementation, seed=args.seed,
            release_weights=not args.keep_weights, progress=progress, on_row=save_row,
        )
    except ModelLoadError as err:
        print(f"q3n bench: error: cannot build the model: {err}", file=sys.stderr)
        return 2
    print(format_table(result.rows, result))
    files = write_outputs(result, out, plot=not args.no_plot)
    partial.unlink()  # results.json now holds every row
    print(f"\nwrote {files['json']}\nwrote {files['csv']}")
    if files["png"]:
        print(f"wrote {files['png']}")
    elif files["png_error"]:
        print(f"q3n bench: {files['png_error']}", file=sys.stderr)
    failed = [r for r in result.rows if r.error]
    if failed:
        names = ", ".join(dict.fromkeys(r.backend for r in failed))
        print(f"q3n bench: {len(failed)} case(s) failed ({names}); the errors are in the table and in "
              f"{files['json']} (rows[].error, rows[].reports[].traceback)", file=sys.stderr)
    return 1 if failed else 0


def _default_out(model: str, size: str, device: str) -> Path:
    slug = Path(model).name if os.path.isdir(model) else model.replace(":", "-").replace("/", "-")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("q3n_bench") / f"{slug}-{size}-{device}-{stamp}"


def _plot(args: argparse.Namespace) -> int:
    from .bench_plot import PlotUnavailable, plot_results

    path = Path(args.results)
    try:
        if path.suffix == ".jsonl":
            # The rows a run saved as it measured them (results.partial.jsonl): no run metadata.
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            meta = dict(lines[0]["meta"]) if lines and "meta" in lines[0] else {}
            meta["label"] = f"{meta.get('label', path.name)} (rows saved during a run)"
            data = {"meta": meta, "rows": [r for r in lines if "meta" not in r]}
        else:
            data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"q3n plot: cannot read {path}: {err}", file=sys.stderr)
        return 2
    try:
        png = plot_results(data, args.out or path.with_suffix(".png"))
    except PlotUnavailable as err:
        print(f"q3n plot: {err}", file=sys.stderr)
        return 2
    print(f"wrote {png}")
    return 0


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
