"""Before/after comparison (``q3n bench``): one model run eagerly and compiled several ways.

:func:`bench` compiles one model with each backend of a run (eager as the baseline, Inductor,
Inductor with ``max-autotune-no-cudagraphs``, q3n under named option sets) and measures, per
backend:

- **prefill** — latency of a full forward (time to first token) at each batch size and length;
- **decode** — per-token latency and tokens/s of greedy steps with a KV cache (the built-in
  decoders' static cache of :func:`q3n_compile.models.new_kv_cache`; transformers' ``StaticCache``
  for transformers models), after a prompt of ``decode_context`` tokens that is prefilled eagerly
  (as transformers' ``generate`` does; the built-in decoders' in slices of the batch whose
  attention scores fit :data:`PREFILL_SCORES_BYTES`);
- **generate** — tokens/s of transformers' ``model.generate`` with a static cache and the backend
  set through ``compile_config`` (the built-in decoders run as their transformers twins, same
  weights);
- **embed** — for ``minilm`` (real weights): cosine similarity of each sentence embedding against
  eager's, on the sentences shipped in ``q3n_compile/data/sentences.txt``;

and for each case: compile time (the first call of a case that compiled a graph, compilation and
one run; "-" when the case reused the graphs of an earlier one, as ``dynamic=True`` lets it),
median latency and its spread (half the interquartile range) over repeats after warm-up (CUDA
events on a GPU), peak memory on a GPU (allocated and reserved, and the allocated peak above what
was allocated before the run — activations and workspaces), and the error of the output against
eager (max abs and relative) and, on the CPU for small models, against the model in float64.

A backend that fails is reported in its rows with its error; the other rows still run. Each
backend compiles its own copy of the model, from a clean Dynamo state; by default Inductor's and
AOTAutograd's on-disk caches are off, so compile times are cold (``warm_cache=True`` keeps them).
Every backend's rows run while the eager model (the reference) is alive, so on a GPU each peak
counts eager's weights besides the backend's own copy. A backend with a ``quant_config`` has its
copy's quantized high-precision weights released after the first compile of each phase
(:func:`q3n_compile.release_quantized_weights`, as a deployment would), so its peak counts the
packed weights, not both forms; ``release_weights=False`` (``q3n bench --keep-weights``) keeps
them. ``backends[label]["released"]`` gives what was freed.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import datetime
import functools
import gc
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from . import __version__

SCHEMA = "q3n-bench/1"

# The design's mixed-precision quantization (DESIGN.md): FFN W4A8, attention W6A12, norms fp16.
QUANT_CONFIG: dict[str, Any] = {
    "ffn_layers": {"weight_bits": 4, "activation_bits": 8},
    "attn_layers": {"weight_bits": 6, "activation_bits": 12},
    "norm_layers": {"dtype": "float16"},
}

# Named backends. "eager" is always the first row and the baseline of every error.
BACKEND_SETS: dict[str, dict[str, Any]] = {
    "inductor": {"backend": "inductor"},
    "inductor-max-autotune": {"backend": "inductor", "mode": "max-autotune-no-cudagraphs"},
    "inductor-cudagraphs": {"backend": "inductor", "mode": "reduce-overhead"},
    "q3n": {"backend": "q3n", "options": {}},
    "q3n+arena": {"backend": "q3n", "options": {"executor": "q3n"}},
    "q3n+inductor": {"backend": "q3n", "options": {"executor": "inductor"}},
    "q3n+quant": {"backend": "q3n", "options": {"quant_config": QUANT_CONFIG}},
    "q3n+sparse": {"backend": "q3n", "options": {"attention": "sparse"}},
    "q3n+cudagraphs": {"backend": "q3n", "options": {"cuda_graphs": True}},
    "q3n+arena+cudagraphs": {"backend": "q3n", "options": {"executor": "q3n", "cuda_graphs": True}},
    "q3n+inductor+cudagraphs": {"backend": "q3n", "options": {"executor": "inductor", "cuda_graphs": True}},
}


def parse_backend_set(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=JSON`` (``q3n bench --q3n-set``, the bench scripts' ``--set``) as (NAME, a q3n
    backend spec with those options); ValueError saying what is wrong otherwise."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise ValueError(f"takes NAME=JSON, got {text!r}")
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}: the options are not JSON ({err}): {raw!r}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{name}: the options must be a JSON object, got {raw!r}")
    return name, {"backend": "q3n", "options": options}


def named_backend(name: str, extra: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The spec of backend `name`: None for eager, else one of `extra` (from
    :func:`parse_backend_set`) or :data:`BACKEND_SETS`; ValueError naming the choices."""
    if name == "eager":
        return None
    if name in extra:
        return extra[name]
    if name not in BACKEND_SETS:
        raise ValueError(f"unknown backend {name!r}: name eager, one of {', '.join(BACKEND_SETS)}, "
                         "or define it with NAME=JSON")
    return BACKEND_SETS[name]


DEFAULT_BACKENDS_CUDA = ("inductor", "inductor-max-autotune", "q3n", "q3n+arena", "q3n+quant", "q3n+sparse")
# On the CPU max-autotune only slows compilation down; CUDA graphs need a GPU; and q3n's passes with
# Inductor for the rest can stall on OpenMP spinning around q3n's Python ops (README, "Known problem").
DEFAULT_BACKENDS_CPU = ("inductor", "q3n", "q3n+quant", "q3n+sparse")

PHASES = ("prefill", "decode", "generate", "embed")

# What the goals compare (q3n against Inductor, same run).
GOALS = {
    "ttft": "time to first token <= 0.75 x Inductor's",
    "decode_tokens_per_s": "decode tokens/s >= 1.3 x Inductor's",
    "peak_memory": "peak memory below Inductor's",
    "compile_time": "compile time no longer than Inductor's",
}

# fp64 references are built on the CPU only for models up to this many parameters.
FP64_MAX_PARAMS = 50_000_000


@dataclass
class Row:
    """One measured case: one backend, one phase, one (batch, length)."""

    backend: str
    seq_len: int
    batch: int
    phase: str = "prefill"
    new_tokens: int | None = None
    compile_s: float | None = None
    latency_ms: float | None = None
    latency_spread_ms: float | None = None
    latency_min_ms: float | None = None
    repeats: int | None = None
    tokens_per_s: float | None = None
    speedup_vs_eager: float | None = None
    peak_alloc_mib: float | None = None
    peak_reserved_mib: float | None = None
    activation_mib: float | None = None
    max_abs_err: float | None = None
    rel_err: float | None = None
    rel_err_vs_fp64: float | None = None
    cosine_min: float | None = None
    cosine_mean: float | None = None
    token_match: float | None = None
    graphs: int | None = None
    graph_breaks: int | None = None
    error: str | None = None
    note: str | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)


CSV_FIELDS = tuple(f.name for f in dataclasses.fields(Row) if f.name != "reports")


@dataclass
class BenchResult:
    meta: dict[str, Any]
    backends: dict[str, dict[str, Any]]
    rows: list[Row]
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(r.error for r in self.rows)

    def as_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "meta": self.meta, "backends": self.backends, "notes": self.notes,
                "summary": self.summary, "rows": rows_as_json(self.rows)}


class BenchError(ValueError):
    """Bad arguments to :func:`bench` (unknown backend, model that cannot be built, ...)."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def defaults(device: str) -> dict[str, Any]:
    """The measurement defaults on ``device`` (the CPU's are small, so the first command is quick)."""
    if device == "cuda":
        return dict(seq_lens=[512, 2048, 8192], batches=[1], decode_batches=[1, 8], decode_context=1024,
                    decode_steps=32, repeats=20, warmup=3, time_budget_s=3.0)
    return dict(seq_lens=[64], batches=[1], decode_batches=[1], decode_context=32, decode_steps=16,
                repeats=10, warmup=2, time_budget_s=2.0)


def resolve_backends(names: Iterable[str] | dict[str, dict[str, Any]] | None, *, device: str,
                     options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """``{label: spec}`` for backend names (or a ready mapping); ``options`` go to every q3n spec."""
    if names is None:
        names = DEFAULT_BACKENDS_CUDA if device == "cuda" else DEFAULT_BACKENDS_CPU
    if isinstance(names, dict):
        specs = {k: json.loads(json.dumps(v)) for k, v in names.items()}
    else:
        specs = {}
        for name in names:
            if name == "eager":
                continue
            if name not in BACKEND_SETS:
                raise BenchError(f"unknown backend {name!r}; choose from eager, {', '.join(BACKEND_SETS)}")
            specs[name] = json.loads(json.dumps(BACKEND_SETS[name]))
    for spec in specs.values():
        if spec.get("backend", "q3n") == "q3n" and options:
            spec.setdefault("options", {}).update(json.loads(json.dumps(options)))
    specs.pop("eager", None)
    return specs


# --------------------------------------------------------------------------------------------
# Workloads: what a model name turns into
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """A model and how to drive it: inputs for a (batch, length), decoding, generation."""

    label: str
    kind: str  # builtin | hf-causal | hf-encoder | custom | minilm
    model: nn.Module
    make_inputs: Callable[[int, int], Any] | None = None
    fixed_inputs: Any = None  # custom factories and minilm: the one input they come with
    decode: str | None = None  # "builtin" (models.KVCache) | "hf" (transformers StaticCache) | None
    max_len: int | None = None
    sentences: list[str] | None = None
    hf_for_generate: Callable[[], nn.Module] | None = None
    notes: list[str] = field(default_factory=list)


def load_workload(model: str | nn.Module, size: str = "tiny", *, device: str, dtype: torch.dtype,
                  seed: int = 0, attn_implementation: str | None = None,
                  example_inputs: Any = None) -> Workload:
    """Turn ``model`` into a :class:`Workload`.

    ``model``: a built-in name (qwen3, llama, gpt2, bert, qwen3-next), ``minilm``, a local
    transformers model folder, ``module:factory`` / ``file.py:factory``, or an ``nn.Module`` (with
    ``example_inputs``). Raises :class:`q3n_compile.hf_models.ModelLoadError` when it cannot.
    """
    from . import hf_models
    from .models import DECODER_NAMES, HF_MODEL_NAMES, MODEL_NAMES, build_model, example_inputs as inputs_for

    if isinstance(model, nn.Module):
        return _module_workload("module", model.to(device).eval(), example_inputs, device)
    if model in MODEL_NAMES:
        m = build_model(model, size, dtype=dtype, device=device, seed=seed)
        w = Workload(label=f"{model}/{size}", kind="builtin", model=m,
                     make_inputs=lambda b, s: inputs_for(model, m, b, s, device=device, seed=seed))
        if model in DECODER_NAMES:
            w.decode = "builtin"
            w.max_len = m.config.max_position if model == "gpt2" else None
            w.hf_for_generate = lambda: hf_models.hf_twin(m, attn_implementation=attn_implementation or "eager")
        else:
            w.max_len = m.config.max_position
        return w
    if model in HF_MODEL_NAMES:
        m = hf_models.build_qwen3_next(size, dtype=dtype, device=device, seed=seed,
                                       attn_implementation=attn_implementation)
        return Workload(label=f"{model}/{size}", kind="hf-causal", model=m,
                        make_inputs=lambda b, s: inputs_for(model, m, b, s, device=device, seed=seed),
                        decode="hf", max_len=m.config.max_position_embeddings,
                        hf_for_generate=lambda: m.hf)
    if model == "minilm":
        tokenizer, m = hf_models.load_minilm(dtype=dtype, device=device, attn_implementation=attn_implementation)
        sentences = hf_models.load_sentences()
        batch = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
        fixed = {k: v.to(device) for k, v in batch.items()}
        return Workload(label="minilm (all-MiniLM-L6-v2)", kind="minilm", model=m, fixed_inputs=fixed,
                        sentences=sentences)
    if os.path.isdir(model):
        m, kind = hf_models.load_local(model, dtype=dtype, device=device, attn_implementation=attn_implementation)
        return _hf_workload(str(model), m, kind, device, seed)
    if hf_models.is_factory_spec(model):
        m, inputs = hf_models.load_factory(model, device=device, dtype=dtype, size=size)
        m = m.to(device).eval()
        if inputs is None and _is_hf(m):
            hf = m
            causal = hasattr(hf, "generate") and hasattr(hf, "lm_head") or "CausalLM" in type(hf).__name__
            wrapper = hf_models.CausalLMLogits(hf) if causal else hf_models.EncoderHidden(hf)
            return _hf_workload(model, wrapper, "causal" if causal else "encoder", device, seed)
        if inputs is None:
            raise hf_models.ModelLoadError(
                f"{model} returned a model without example inputs; return (model, example_inputs) "
                "or a transformers model")
        return _module_workload(model, m, inputs, device)
    names = ", ".join(MODEL_NAMES + HF_MODEL_NAMES + ("minilm",))
    raise hf_models.ModelLoadError(
        f"unknown model {model!r}; choose from {names}, a local transformers model folder, "
        "or module:factory")


def _first_sentences(inputs: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    mask = inputs["attention_mask"][:n]
    length = int(mask.sum(-1).max())
    return {k: v[:n, :length] for k, v in inputs.items()}


def _is_hf(m: nn.Module) -> bool:
    return hasattr(m, "config") and hasattr(m.config, "model_type")


def _hf_workload(label: str, m: nn.Module, kind: str, device: str, seed: int) -> Workload:
    vocab = m.config.vocab_size
    limit = getattr(m.config, "max_position_embeddings", None)

    def make(batch: int, seq_len: int):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen, dtype=torch.int64).to(device)
        if kind == "causal":
            return (ids,)
        mask = torch.ones(batch, seq_len, dtype=torch.int64)
        if seq_len >= 2 and batch >= 2:
            mask[-1, seq_len - max(1, seq_len // 4):] = 0
        return (ids, mask.to(device))

    if kind == "causal":
        return Workload(label=label, kind="hf-causal", model=m, make_inputs=make, decode="hf", max_len=limit,
                        hf_for_generate=lambda: m.hf)
    return Workload(label=label, kind="hf-encoder", model=m, make_inputs=make, max_len=limit)


def _module_workload(label: str, m: nn.Module, inputs: Any, device: str) -> Workload:
    inputs = _to_device(inputs, device)
    return Workload(label=label, kind="custom", model=m, fixed_inputs=inputs)


def _to_device(x: Any, device: str) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(_to_device(v, device) for v in x)
    return x


def _shape_of(inputs: Any) -> tuple[int, int]:
    """(batch, length) of an input: the first tensor's first two sizes (0 when absent)."""
    first = _first_tensor(inputs, strict=False)
    if first is None or first.dim() == 0:
        return 0, 0
    return first.shape[0], (first.shape[1] if first.dim() > 1 else 0)


# --------------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------------


def bench(
    model: str | nn.Module = "qwen3",
    size: str = "tiny",
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    backends: Iterable[str] | dict[str, dict[str, Any]] | None = None,
    options: dict[str, Any] | None = None,
    seq_lens: Sequence[int] | None = None,
    batches: Sequence[int] | None = None,
    decode_batches: Sequence[int] | None = None,
    decode_context: int | None = None,
    decode_steps: int | None = None,
    generate: int = 0,
    generate_batch: int | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    time_budget_s: float | None = None,
    dynamic: bool | None = True,
    specialize_float: bool = True,
    warm_cache: bool = False,
    attn_implementation: str | None = None,
    example_inputs: Any = None,
    seed: int = 0,
    release_weights: bool = True,
    progress: Callable[[str], None] | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> BenchResult:
    """Measure ``model`` eagerly and under each backend; see the module docstring.

    ``backends``: names from :data:`BACKEND_SETS` or ``{label: {"backend", "mode", "options"}}``
    (default: all but ``inductor-cudagraphs``; on the CPU also without ``inductor-max-autotune``).
    ``options`` are added to every q3n backend's options. ``decode_batches=[]`` skips decoding;
    ``generate=N`` adds the ``generate`` phase with N new tokens (batch ``generate_batch``, default the
    first decode batch size, prompt ``decode_context`` tokens); ``seq_lens=[]`` skips prefill. ``dynamic`` is passed to
    ``torch.compile`` (True: one graph serves every length and batch). ``specialize_float``
    (default True) compiles every backend with ``torch._dynamo.config.specialize_float``: the
    model's float attributes (norm eps, attention scaling) become constants instead of 0-d tensors
    Dynamo makes on every call, ~0.2 ms of host time a decode step on qwen3 "bench" under
    ``dynamic=True`` (H200 host, s13run2); a q3n report names them under
    ``runtime.float_inputs`` when they are passed. Lengths and batch sizes
    default by device (:func:`defaults`). ``on_row`` is called with each row as soon as it is
    measured (the CLI saves rows as they come, so a run that is killed keeps what it measured).
    ``release_weights`` (default True): release the quantized weights of a backend's model copy
    after its first compile of each phase (module docstring).
    """
    import q3n_compile

    from . import hf_models

    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    d = defaults(device)
    explicit_sizes = seq_lens is not None or batches is not None
    explicit_batch = batches is not None
    seq_lens = list(d["seq_lens"] if seq_lens is None else seq_lens)
    batches = list(batches or d["batches"])
    decode_batches = list(d["decode_batches"] if decode_batches is None else decode_batches)
    decode_context = decode_context or d["decode_context"]
    decode_steps = decode_steps or d["decode_steps"]
    repeats = repeats or d["repeats"]
    warmup = d["warmup"] if warmup is None else warmup
    time_budget_s = time_budget_s or d["time_budget_s"]
    specs = resolve_backends(backends, device=device, options=options)
    started = time.perf_counter()

    workload = load_workload(model, size, device=device, dtype=dtype, seed=seed,
                             attn_implementation=attn_implementation, example_inputs=example_inputs)
    notes = list(workload.notes)
    eager = workload.model
    n_params = sum(p.numel() for p in eager.parameters())

    # What runs: (phase, batch, length) cases.
    cases: list[tuple[str, int, int]] = []
    if workload.kind == "minilm":
        if explicit_batch and batches[0] < len(workload.sentences):
            # An explicit batch size takes the first sentences (re-padded to their longest).
            workload.fixed_inputs = _first_sentences(workload.fixed_inputs, batches[0])
        b, s = _shape_of(workload.fixed_inputs)
        cases.append(("embed", b, s))
    elif workload.fixed_inputs is not None:
        b, s = _shape_of(workload.fixed_inputs)
        cases.append(("prefill", b, s))
        if explicit_sizes:
            notes.append("the model came with its own example inputs: --seq-len/--batch do not apply")
    else:
        for s in seq_lens:
            if workload.max_len and s > workload.max_len:
                notes.append(f"length {s} skipped: the model takes at most {workload.max_len} tokens")
                continue
            for b in batches:
                cases.append(("prefill", b, s))
    if workload.decode and decode_batches:
        max_len = decode_context + 1 + warmup + decode_steps
        if workload.max_len and max_len > workload.max_len:
            notes.append(f"decode skipped: context + steps ({max_len}) exceed the model's {workload.max_len} positions")
        else:
            cases += [("decode", b, decode_context) for b in decode_batches]
    elif decode_batches and workload.kind not in ("minilm",) and not workload.decode:
        notes.append(f"decode skipped: {workload.label} has no KV cache path (decoders only)")
    gen_model: nn.Module | None = None
    if generate:
        if workload.hf_for_generate is None:
            notes.append(f"generate skipped: {workload.label} is not a transformers-style causal LM")
        else:
            try:
                gen_model = workload.hf_for_generate()
                gen_batch = generate_batch or (decode_batches[0] if decode_batches else 1)
                cases.append(("generate", gen_batch, decode_context))
            except Exception as err:  # noqa: BLE001 — reported, the rest runs
                notes.append(f"generate skipped: {type(err).__name__}: {err}")

    fp64 = None
    if device == "cpu" and n_params <= FP64_MAX_PARAMS and any(c[0] in ("prefill", "embed") for c in cases):
        try:
            fp64 = copy.deepcopy(eager).to(torch.float64)
        except Exception as err:  # noqa: BLE001
            notes.append(f"no float64 reference: {type(err).__name__}: {err}")

    labels = ["eager", *specs]
    total = len(labels) * len(cases)
    done = 0
    rows: list[Row] = []
    references: dict[Any, Any] = {}  # eager outputs by case; "fp64_error" if float64 cannot run
    backend_info: dict[str, dict[str, Any]] = {"eager": {"spec": None}}

    def tick(label: str, case: tuple[str, int, int]) -> None:
        nonlocal done
        done += 1
        if progress:
            width = 20
            filled = round(width * (done - 1) / max(total, 1))
            phase, b, s = case
            what = f"{phase} B={b} S={s}" if phase != "generate" else f"generate B={b} prompt={s} +{generate}"
            progress(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {time.perf_counter() - started:6.1f}s"
                     f"  {workload.label}  {what}: {label}")

    with _bench_context(warm_cache, specialize_float):
        for label in labels:
            spec = specs.get(label)
            backend_info[label] = {"spec": spec}
            module: nn.Module | None = None
            torch._dynamo.reset()
            _free(device)
            try:
                module = eager if spec is None else copy.deepcopy(eager)
            except Exception as err:  # noqa: BLE001
                for case in cases:
                    tick(label, case)
                    rows.append(Row(backend=label, phase=case[0], batch=case[1], seq_len=case[2],
                                    error=f"cannot copy the model: {type(err).__name__}: {err}"))
                continue
            prefill_fn: Callable | None = None
            all_reports: list[dict[str, Any]] = []
            after_compile = None
            if release_weights and spec is not None and (spec.get("options") or {}).get("quant_config"):
                after_compile = functools.partial(_release, module, backend_info[label])
            for case in cases:
                tick(label, case)
                phase, b, s = case
                row = Row(backend=label, phase=phase, batch=b, seq_len=s)
                q3n_compile.reset_reports()
                graphs0, breaks0 = _dynamo_counts()
                try:
                    if phase in ("prefill", "embed"):
                        if prefill_fn is None:
                            prefill_fn = compiled(module, spec, dynamic)
                        inputs = workload.fixed_inputs if workload.fixed_inputs is not None else workload.make_inputs(b, s)
                        _measure_forward(row, prefill_fn, inputs, device, repeats, warmup, time_budget_s,
                                         references, fp64, phase, after_compile)
                    elif phase == "decode":
                        _measure_decode(row, workload, module, spec, dynamic, decode_steps, device, warmup,
                                        references, after_compile)
                    elif phase == "generate":
                        _measure_generate(row, gen_model, spec, generate, device, repeats, warmup, references,
                                          workload, seed)
                except Exception as err:  # one failing backend must not hide the others
                    row.error = f"{type(err).__name__}: {err}".strip()
                    row.reports = [{"traceback": traceback.format_exc()}]
                    _free(device)
                graphs1, breaks1 = _dynamo_counts()
                if spec is None:
                    row.compile_s = None  # eager compiles nothing
                else:
                    row.graphs, row.graph_breaks = graphs1 - graphs0, breaks1 - breaks0
                    if row.graphs == 0:
                        row.compile_s = None  # the case reused graphs compiled earlier
                reports = q3n_compile.reports()
                if reports and not row.error:
                    row.reports = reports
                all_reports += reports
                rows.append(row)
                if on_row is not None:
                    on_row(row)
            backend_info[label]["passes"] = _pass_summary(all_reports)
            backend_info[label]["fallbacks"] = [f for r in all_reports for f in r.get("fallbacks", [])]
            # after_compile holds the model copy too: dropped here, so the _free below finds it
            # gone and prunes its packed weights before the next backend's peak is measured.
            del module, prefill_fn, after_compile
            if gen_model is not None:
                hf_models.forget_compiled_call(gen_model)
            _free(device)
        torch._dynamo.reset()

    if "fp64_error" in references:
        notes.append(references["fp64_error"])
    for label, info in backend_info.items():
        freed = info.get("released")
        if freed and freed["parameters"]:
            mib = freed["bytes"] / 2**20
            notes.append(f"{label}: {freed['parameters']} quantized weights of its model copy "
                         f"({mib:.{0 if mib >= 10 else 2}f} MiB) released after compiling "
                         "(release_quantized_weights), as a deployment would"
                         + ("; its peak counts the packed weights" if device == "cuda" else "")
                         + " (--keep-weights keeps them)")
    _speedups(rows)
    rows = _ordered(rows, labels)
    meta = _meta(workload, model, size, device, dtype, n_params, dict(
        seq_lens=seq_lens, batches=batches, decode_batches=decode_batches, decode_context=decode_context,
        decode_steps=decode_steps, generate=generate, generate_batch=generate_batch, repeats=repeats, warmup=warmup,
        time_budget_s=time_budget_s, dynamic=dynamic, specialize_float=specialize_float,
        warm_cache=warm_cache, attn_implementation=attn_implementation, seed=seed))
    meta["wall_s"] = round(time.perf_counter() - started, 2)
    result = BenchResult(meta=meta, backends=backend_info, rows=rows, notes=notes)
    result.summary = summarize(rows)
    return result


def compare(
    model: str = "qwen3",
    size: str = "tiny",
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    batch: int = 1,
    seq_lens: Sequence[int] = (64,),
    backends: dict[str, dict[str, Any]] | None = None,
    repeats: int | None = None,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Prefill rows only (the first version's API): eager and each of ``backends``."""
    result = bench(model, size, device=device, dtype=dtype, batches=[batch], seq_lens=seq_lens,
                   backends=backends or {"q3n": {"backend": "q3n", "options": {}}}, repeats=repeats,
                   warmup=warmup, decode_batches=[], dynamic=None, progress=progress)
    return result.rows


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def compiled(module: nn.Module, spec: dict[str, Any] | None, dynamic: bool | None) -> Callable:
    """`module` under torch.compile as the backend spec says (``{"backend", "mode", "options"}``,
    as :func:`named_backend` gives it; its own "dynamic" wins over `dynamic`); `module` itself
    for eager (spec None)."""
    if spec is None:
        return module
    kwargs: dict[str, Any] = {"backend": spec.get("backend", "q3n")}
    if spec.get("options"):
        kwargs["options"] = spec["options"]
    if spec.get("mode"):
        kwargs["mode"] = spec["mode"]
    return torch.compile(module, dynamic=spec.get("dynamic", dynamic), **kwargs)


@contextlib.contextmanager
def _bench_context(warm_cache: bool, specialize_float: bool = True):
    """Room for every recompile of a run (lengths, batches, decode); cold caches unless asked;
    float attributes specialised unless asked not to (see :func:`bench`)."""
    from torch._dynamo import config as dynamo_config

    patches: list[Any] = [dynamo_config.patch(recompile_limit=64, accumulated_recompile_limit=4096,
                                              specialize_float=specialize_float)]
    if not warm_cache:
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config

        patches.append(inductor_config.patch(fx_graph_cache=False, autotune_local_cache=False))
        patches.append(functorch_config.patch(enable_autograd_cache=False))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        with torch.no_grad():
            yield


def _dynamo_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _free(device: str) -> None:
    gc.collect()
    # A finished backend's model copy is gone; its calibration statistics and packed weights
    # must not count in the next backend's peak.
    from .quant import prune

    prune()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class _Timer:
    """Per-call wall times in ms: CUDA events on a GPU (recorded around each call), else perf_counter."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.pairs: list[Any] = []

    @contextlib.contextmanager
    def time(self):
        if self.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            yield
            end.record()
            self.pairs.append((begin, end))
        else:
            t0 = time.perf_counter()
            yield
            self.pairs.append((time.perf_counter() - t0) * 1e3)

    def times(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [b.elapsed_time(e) for b, e in self.pairs]
        return list(self.pairs)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _memory(row: Row, device: str):
    """Peak allocated/reserved while the block runs, and the allocated peak above the start."""
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    yield
    torch.cuda.synchronize()
    row.peak_alloc_mib = torch.cuda.max_memory_allocated() / 2**20
    row.peak_reserved_mib = torch.cuda.max_memory_reserved() / 2**20
    row.activation_mib = (torch.cuda.max_memory_allocated() - base) / 2**20


def _stats(row: Row, times: list[float]) -> None:
    row.repeats = len(times)
    row.latency_ms = statistics.median(times)
    row.latency_min_ms = min(times)
    if len(times) >= 4:
        q = statistics.quantiles(times, n=4)
        row.latency_spread_ms = (q[2] - q[0]) / 2
    else:
        row.latency_spread_ms = (max(times) - min(times)) / 2


def _call(fn: Callable, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return fn(**inputs)
    if isinstance(inputs, (tuple, list)):
        return fn(*inputs)
    return fn(inputs)


def _release(module: nn.Module, info: dict[str, Any]) -> None:
    """Free `module`'s quantized high-precision weights (idempotent); tallied in `info`."""
    from .quant.release import release_quantized_weights

    result = release_quantized_weights(module)
    tally = info.setdefault("released", {"parameters": 0, "bytes": 0, "kept": {}})
    tally["parameters"] += len(result["released"])
    tally["bytes"] += result["bytes_released"]
    tally["kept"].update(result["kept"])


def _measure_forward(row: Row, fn, inputs, device, repeats, warmup, budget, references, fp64, phase,
                     after_compile: Callable[[], None] | None = None) -> None:
    key = (phase, row.batch, row.seq_len)
    _sync(device)
    start = time.perf_counter()
    first = _first_tensor(_call(fn, inputs))
    _sync(device)
    row.compile_s = time.perf_counter() - start
    del first
    if after_compile is not None:
        after_compile()
    for _ in range(warmup):
        _call(fn, inputs)
    # As many repeats as fit in the time budget (at least 3), at most `repeats`.
    probe = _Timer(device)
    with probe.time():
        _call(fn, inputs)
    one = max(probe.times()[0], 1e-3)
    n = int(min(repeats, max(3, budget * 1e3 // one)))
    timer = _Timer(device)
    with _memory(row, device):
        for _ in range(n):
            with timer.time():
                _call(fn, inputs)
    _stats(row, timer.times())
    out = _first_tensor(_call(fn, inputs)).detach().clone()  # clone: CUDA graphs reuse outputs
    if row.batch and row.seq_len:
        row.tokens_per_s = row.batch * row.seq_len * 1e3 / row.latency_ms
    if row.backend == "eager":
        references[key] = out.cpu() if device == "cuda" else out
        if fp64 is not None and "fp64_error" not in references:
            try:
                references[("fp64",) + key] = _first_tensor(_call(fp64, _to_fp64(inputs))).detach()
            except Exception as err:  # noqa: BLE001 — some kernels have no float64 (grouped_mm)
                references["fp64_error"] = f"no float64 reference: {type(err).__name__}: {_one_line(str(err), 120)}"
    _errors(row, out, references.get(key), references.get(("fp64",) + key))
    if phase == "embed":
        ref = references.get(key)
        if ref is not None:
            cos = nn.functional.cosine_similarity(out.float(), ref.to(out.device).float(), dim=-1)
            row.cosine_min, row.cosine_mean = cos.min().item(), cos.mean().item()


def _errors(row: Row, out: torch.Tensor, ref: torch.Tensor | None, exact: torch.Tensor | None) -> None:
    if ref is not None:
        ref = ref.to(out.device).float()
        diff = out.float() - ref
        row.max_abs_err = diff.abs().max().item()
        row.rel_err = (diff.norm() / ref.norm().clamp_min(1e-30)).item()
    if exact is not None:
        d64 = out.detach().double().cpu() - exact
        row.rel_err_vs_fp64 = (d64.norm() / exact.norm().clamp_min(1e-30)).item()


# The decode cases' prompt goes through the eager model (not timed), whose attention holds
# [rows, heads, prompt, cache length] fp32 scores: 32 GiB for 256 rows at context 1024, which
# ran out of memory on the H200 after the earlier cases (s30run6). The built-in decoders'
# prompt is prefilled in slices of the batch whose scores fit this budget, each writing its
# rows of the cache in place through views.
PREFILL_SCORES_BYTES = 4 << 30


def prefill_rows(heads: int, prompt_len: int, cache_len: int, batch: int,
                 budget: int | None = None) -> int:
    """Batch rows per slice of the eager prompt prefill: the most whose fp32 scores ``[rows,
    heads, prompt_len, cache_len]`` stay within `budget` (at least one, at most `batch`)."""
    budget = PREFILL_SCORES_BYTES if budget is None else budget
    per_row = 4 * heads * prompt_len * cache_len
    return max(1, min(batch, budget // max(per_row, 1)))


class _Decoder:
    """One decoding session: a cache, an eager prefill, then compiled single-token steps.

    The prefill runs the eager reference model (``workload.model``): the backend's copy has the
    same weights, and a quantized backend's copy may have released them (:func:`_release`)."""

    def __init__(self, workload: Workload, module: nn.Module, step_fn: Callable, batch: int, max_len: int,
                 device: str):
        self.workload, self.step_fn, self.device = workload, step_fn, device
        self.module = workload.model
        self.batch, self.max_len = batch, max_len
        if workload.decode == "builtin":
            from .models import new_kv_cache

            self.cache = new_kv_cache(module, batch, max_len)
        else:
            from transformers import StaticCache

            hf = module.hf
            self.cache = StaticCache(config=hf.config, max_cache_len=max_len)
        # Positions as separate tensors made up front: nothing is allocated or copied per step.
        self.positions = [torch.tensor([p], device=device) for p in range(max_len)]

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(prompt.shape[1], device=self.device)
        # The last position's logits as their own tensor: a view would keep the prompt's
        # [batch, context, vocab] logits alive through the timed steps and their peak memory.
        if self.workload.decode != "builtin":
            return self.module.hf(input_ids=prompt, past_key_values=self.cache, cache_position=pos,
                                  use_cache=True).logits[:, -1:].clone()
        from .models import KVCache

        B = prompt.shape[0]
        rows = prefill_rows(self.module.config.num_heads, prompt.shape[1], self.max_len, B)
        last = []
        for i in range(0, B, rows):
            part = KVCache(keys=[k[i:i + rows] for k in self.cache.keys],
                           values=[v[i:i + rows] for v in self.cache.values])
            last.append(self.module(prompt[i:i + rows], kv_cache=part, cache_position=pos)[:, -1:])
        return torch.cat(last)

    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        pos = self.positions[position]
        if self.workload.decode == "builtin":
            return self.step_fn(token, kv_cache=self.cache, cache_position=pos)
        return self.step_fn(input_ids=token, past_key_values=self.cache, cache_position=pos, use_cache=True).logits


def _measure_decode(row, workload, module, spec, dynamic, steps, device, warmup, references,
                    after_compile: Callable[[], None] | None = None) -> None:
    context, batch = row.seq_len, row.batch
    row.new_tokens = steps
    max_len = context + 1 + warmup + steps
    target = module if workload.decode == "builtin" else module.hf
    step_fn = compiled(target, spec, dynamic)
    dec = _Decoder(workload, module, step_fn, batch, max_len, device)
    gen = torch.Generator(device="cpu").manual_seed(1234 + batch)
    vocab = workload.model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    logits = dec.prefill(prompt)
    token = logits.argmax(-1)
    _sync(device)
    start = time.perf_counter()
    first_logits = dec.step(token, context).detach().clone()
    _sync(device)
    row.compile_s = time.perf_counter() - start
    if after_compile is not None:
        after_compile()
    tokens = [first_logits.argmax(-1)]
    position = context + 1
    for _ in range(warmup):
        tokens.append(dec.step(tokens[-1], position).argmax(-1))
        position += 1
    timer = _Timer(device)
    with _memory(row, device):
        for _ in range(steps):
            with timer.time():
                logits = dec.step(tokens[-1], position)
            tokens.append(logits.argmax(-1))
            position += 1
    _stats(row, timer.times())
    row.tokens_per_s = batch * 1e3 / row.latency_ms
    key = ("decode", batch, context)
    seq = torch.cat(tokens, dim=1).cpu()
    if row.backend == "eager":
        references[key] = (first_logits.cpu() if device == "cuda" else first_logits, seq)
    ref = references.get(key)
    if ref is not None:
        _errors(row, first_logits, ref[0], None)
        row.token_match = (seq == ref[1]).float().mean().item()


def _measure_generate(row, hf_model, spec, new_tokens, device, repeats, warmup, references, workload, seed) -> None:
    from .hf_models import forget_compiled_call, generate_tokens

    row.new_tokens = new_tokens
    forget_compiled_call(hf_model)
    gen = torch.Generator(device="cpu").manual_seed(seed + 7)
    prompt = torch.randint(0, hf_model.config.vocab_size, (row.batch, row.seq_len), generator=gen).to(device)
    _sync(device)
    start = time.perf_counter()
    out = generate_tokens(hf_model, prompt, new_tokens, spec)
    _sync(device)
    row.compile_s = time.perf_counter() - start
    for _ in range(max(1, warmup)):
        generate_tokens(hf_model, prompt, new_tokens, spec)
    n = max(2, min(repeats, 5))
    times = []
    with _memory(row, device):
        for _ in range(n):
            _sync(device)
            t0 = time.perf_counter()
            out = generate_tokens(hf_model, prompt, new_tokens, spec)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    _stats(row, times)
    row.tokens_per_s = row.batch * new_tokens * 1e3 / row.latency_ms
    row.note = "latency_ms is one whole generate() call (eager prefill + compiled decode steps)"
    key = ("generate", row.batch, row.seq_len)
    if row.backend == "eager":
        references[key] = out.cpu()
    if key in references:
        row.token_match = (out.cpu() == references[key]).float().mean().item()


# --------------------------------------------------------------------------------------------
# Summaries and output
# --------------------------------------------------------------------------------------------


def _speedups(rows: list[Row]) -> None:
    eager = {(r.phase, r.batch, r.seq_len): r.latency_ms for r in rows if r.backend == "eager" and r.latency_ms}
    for r in rows:
        base = eager.get((r.phase, r.batch, r.seq_len))
        if base and r.latency_ms:
            r.speedup_vs_eager = base / r.latency_ms


def _ordered(rows: list[Row], labels: list[str]) -> list[Row]:
    order = {label: i for i, label in enumerate(labels)}
    cases: dict[tuple[str, int, int], int] = {}
    for r in rows:
        cases.setdefault((r.phase, r.batch, r.seq_len), len(cases))
    return sorted(rows, key=lambda r: (PHASES.index(r.phase) if r.phase in PHASES else 9,
                                       cases[(r.phase, r.batch, r.seq_len)], order.get(r.backend, 99)))


def _pass_summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per pass across a backend's graphs: statuses seen and matched/rewritten totals."""
    out: dict[str, Any] = {}
    for report in reports:
        for name, p in report.get("passes", {}).items():
            entry = out.setdefault(name, {"status": [], "matched": 0, "rewritten": 0})
            if p.get("status") not in entry["status"]:
                entry["status"].append(p.get("status"))
            entry["matched"] += p.get("matched") or 0
            entry["rewritten"] += p.get("rewritten") or 0
    if reports:
        out["_graphs"] = len(reports)
    return out


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarize(rows: Sequence[Row]) -> dict[str, Any]:
    """Each compiled backend against Inductor (the issue's goals) and against eager.

    Ratios are geometric means over the cases both ran: ``ttft`` = latency / Inductor's (lower is
    better, goal <= 0.75), ``decode_tokens_per_s`` = tokens/s / Inductor's (goal >= 1.3),
    ``peak_memory`` = peak allocated / Inductor's (GPU only; goal < 1), ``compile_time`` = total
    compile seconds / Inductor's (goal <= 1).
    """
    by = {(r.backend, r.phase, r.batch, r.seq_len): r for r in rows if not r.error}
    backends = list(dict.fromkeys(r.backend for r in rows))
    compile_total = {b: sum(r.compile_s or 0 for r in rows if r.backend == b and not r.error) for b in backends}
    out: dict[str, Any] = {"goals": GOALS, "vs": {}}
    for base in ("inductor", "eager"):
        if base not in backends:
            continue
        table = {}
        for b in backends:
            if b == base:
                continue
            ttft, tps, mem = [], [], []
            for (bb, phase, batch, s), r in by.items():
                if bb != b:
                    continue
                ref = by.get((base, phase, batch, s))
                if ref is None:
                    continue
                if phase == "prefill" and r.latency_ms and ref.latency_ms:
                    ttft.append(r.latency_ms / ref.latency_ms)
                if phase == "decode" and r.tokens_per_s and ref.tokens_per_s:
                    tps.append(r.tokens_per_s / ref.tokens_per_s)
                if phase in ("prefill", "decode") and r.peak_alloc_mib and ref.peak_alloc_mib:
                    mem.append(r.peak_alloc_mib / ref.peak_alloc_mib)
            entry = {
                "ttft": _geomean(ttft),
                "decode_tokens_per_s": _geomean(tps),
                "peak_memory": _geomean(mem),
                "compile_time": (compile_total[b] / compile_total[base]) if compile_total.get(base) else None,
            }
            if base == "inductor":
                entry["met"] = {
                    "ttft": None if entry["ttft"] is None else entry["ttft"] <= 0.75,
                    "decode_tokens_per_s": None if entry["decode_tokens_per_s"] is None
                    else entry["decode_tokens_per_s"] >= 1.3,
                    "peak_memory": None if entry["peak_memory"] is None else entry["peak_memory"] < 1.0,
                    "compile_time": None if entry["compile_time"] is None else entry["compile_time"] <= 1.0,
                }
            table[b] = entry
        out["vs"][base] = table
    out["compile_s_total"] = compile_total
    return out


def rows_as_json(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(header: Sequence[str], lines: list[Sequence[str]]) -> str:
    lines = [tuple(header), *[tuple(line) for line in lines]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def format_table(rows: Sequence[Row], result: BenchResult | None = None) -> str:
    """The terminal report: one table per phase, then q3n's passes and the comparison with Inductor."""
    out: list[str] = []
    mem = any(r.peak_alloc_mib is not None for r in rows)

    errors: list[str] = []

    def failed(r: Row, n: int) -> tuple[str, ...]:
        errors.append(f"{r.backend} {r.phase} B={r.batch} S={r.seq_len}: {_one_line(r.error or '')}")
        return (f"FAILED [{len(errors)}]",) + ("-",) * (n - 1)

    prefill = [r for r in rows if r.phase == "prefill"]
    if prefill:
        header = ["backend", "B", "S", "compile s", "latency ms", "± ms", "tok/s", "x eager"]
        header += ["peak MiB", "act MiB"] if mem else []
        header += ["max err", "rel err", "vs fp64"]
        lines = []
        for r in prefill:
            head = (r.backend, str(r.batch), str(r.seq_len))
            if r.error:
                lines.append(head + failed(r, len(header) - 3))
                continue
            cells = [_fmt(r.compile_s, ".2f"), _fmt(r.latency_ms, ".3f"), _fmt(r.latency_spread_ms, ".3f"),
                     _fmt(r.tokens_per_s, ".0f"), _fmt(r.speedup_vs_eager, ".2f")]
            cells += [_fmt(r.peak_alloc_mib, ".0f"), _fmt(r.activation_mib, ".0f")] if mem else []
            cells += [_fmt(r.max_abs_err, ".2e"), _fmt(r.rel_err, ".2e"), _fmt(r.rel_err_vs_fp64, ".2e")]
            lines.append(head + tuple(cells))
        out += ["prefill (time to first token)", _table(header, lines)]
    decode = [r for r in rows if r.phase == "decode"]
    if decode:
        header = ["backend", "B", "context", "steps", "compile s", "step ms", "± ms", "tok/s", "x eager"]
        header += ["peak MiB", "act MiB"] if mem else []
        header += ["max err", "rel err", "same tokens"]
        lines = []
        for r in decode:
            head = (r.backend, str(r.batch), str(r.seq_len), str(r.new_tokens or "-"))
            if r.error:
                lines.append(head + failed(r, len(header) - 4))
                continue
            cells = [_fmt(r.compile_s, ".2f"), _fmt(r.latency_ms, ".3f"), _fmt(r.latency_spread_ms, ".3f"),
                     _fmt(r.tokens_per_s, ".1f"), _fmt(r.speedup_vs_eager, ".2f")]
            cells += [_fmt(r.peak_alloc_mib, ".0f"), _fmt(r.activation_mib, ".0f")] if mem else []
            cells += [_fmt(r.max_abs_err, ".2e"), _fmt(r.rel_err, ".2e"), _fmt(r.token_match, ".0%")]
            lines.append(head + tuple(cells))
        out += ["", "decode (KV cache, one token per step; step ms = per-token latency)", _table(header, lines)]
    generate = [r for r in rows if r.phase == "generate"]
    if generate:
        header = ["backend", "B", "prompt", "new", "compile s", "generate ms", "± ms", "tok/s", "x eager",
                  "same tokens"]
        lines = []
        for r in generate:
            head = (r.backend, str(r.batch), str(r.seq_len), str(r.new_tokens or "-"))
            if r.error:
                lines.append(head + failed(r, len(header) - 4))
                continue
            lines.append(head + (_fmt(r.compile_s, ".2f"), _fmt(r.latency_ms, ".1f"), _fmt(r.latency_spread_ms, ".1f"),
                                 _fmt(r.tokens_per_s, ".1f"), _fmt(r.speedup_vs_eager, ".2f"),
                                 _fmt(r.token_match, ".0%")))
        out += ["", "generate (transformers model.generate, static cache)", _table(header, lines)]
    embed = [r for r in rows if r.phase == "embed"]
    if embed:
        header = ["backend", "sentences", "padded S", "compile s", "latency ms", "± ms", "x eager",
                  "cos min", "cos mean", "max err", "vs fp64"]
        lines = []
        for r in embed:
            head = (r.backend, str(r.batch), str(r.seq_len))
            if r.error:
                lines.append(head + failed(r, len(header) - 3))
                continue
            lines.append(head + (_fmt(r.compile_s, ".2f"), _fmt(r.latency_ms, ".3f"), _fmt(r.latency_spread_ms, ".3f"),
                                 _fmt(r.speedup_vs_eager, ".2f"), _fmt(r.cosine_min, ".6f"),
                                 _fmt(r.cosine_mean, ".6f"), _fmt(r.max_abs_err, ".2e"),
                                 _fmt(r.rel_err_vs_fp64, ".2e")))
        out += ["", "embed (sentence embeddings; cosine similarity against eager)", _table(header, lines)]
    if errors:
        out += ["", "failures (full tracebacks in results.json: rows[].reports[].traceback)"]
        out += [f"[{i}] {e}" for i, e in enumerate(errors, 1)]
    if result is not None:
        passes = [(label, info["passes"]) for label, info in result.backends.items()
                  if info.get("passes")]
        if passes:
            lines = []
            for label, summary in passes:
                parts = []
                for name, p in summary.items():
                    if name.startswith("_"):
                        continue
                    status = "/".join(p["status"])
                    counts = f" {p['rewritten']}/{p['matched']}" if p["matched"] else ""
                    parts.append(f"{name} {status}{counts}")
                fallbacks = result.backends[label].get("fallbacks") or []
                reasons = list(dict.fromkeys(f"{f.get('stage')}: {_one_line(str(f.get('reason')), 80)}"
                                             for f in fallbacks))
                fb = "none" if not fallbacks else f"{len(fallbacks)} ({'; '.join(reasons[:2])})"
                lines.append((label, str(summary.get("_graphs", 0)), ", ".join(parts), fb))
            out += ["", "q3n passes (status, rewritten/matched, over the backend's graphs; fallbacks: where q3n "
                        "ran something other than what was asked)",
                    _table(("backend", "graphs", "passes", "fallbacks"), lines)]
        vs = result.summary.get("vs", {}).get("inductor")
        if vs:
            lines = []
            for label, e in vs.items():
                spec = result.backends.get(label, {}).get("spec") or {}
                if label == "eager" or not spec:
                    continue
                # The goals are q3n's; other backends are shown for scale, without flags.
                met = e.get("met", {}) if spec.get("backend") == "q3n" else {}

                def cell(key, spec):
                    v = e.get(key)
                    if v is None:
                        return "-"
                    return f"{v:{spec}}" + (" ok" if met.get(key) else " --" if met.get(key) is False else "")
                lines.append((label, cell("ttft", ".2f"), cell("decode_tokens_per_s", ".2f"),
                              cell("peak_memory", ".2f"), cell("compile_time", ".2f")))
            out += ["", "against Inductor (ratios, geometric mean over cases; ok = the issue's goal is met: "
                        "TTFT <= 0.75, decode tok/s >= 1.3, memory < 1, compile <= 1)",
                    _table(("backend", "TTFT x", "decode tok/s x", "peak mem x", "compile x"), lines)]
        for note in result.notes:
            out.append(f"note: {note}")
    return "\n".join(out)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_csv(rows: Sequence[Row], path: str | os.PathLike) -> Path:
    path = Path(path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        d = asdict(r)
        writer.writerow({k: ("" if d[k] is None else d[k]) for k in CSV_FIELDS})
    path.write_text(buf.getvalue())
    return path


def write_outputs(result: BenchResult, out_dir: str | os.PathLike, *, plot: bool = True) -> dict[str, Any]:
    """results.json, results.csv and (when matplotlib is there) results.png in ``out_dir``.

    Returns ``{"json": path, "csv": path, "png": path | None, "png_error": message | None}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {"json": out / "results.json", "csv": out / "results.csv", "png": None,
                             "png_error": None}
    write_csv(result.rows, files["csv"])
    if plot:
        from .bench_plot import PlotUnavailable, plot_results

        try:
            files["png"] = plot_results(result.as_json(), out / "results.png")
        except PlotUnavailable as err:
            files["png_error"] = str(err)
        except Exception as err:  # noqa: BLE001 — a plot must never cost the JSON and CSV
            files["png_error"] = f"the plot failed ({type(err).__name__}: {err}); retry with: q3n plot results.json"
    data = result.as_json()
    data["files"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in files.items()}
    files["json"].write_text(json.dumps(data, indent=2, default=_json_default))
    return files


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value)


def _meta(workload: Workload, model: Any, size: str, device: str, dtype: torch.dtype, n_params: int,
          params: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "model": model if isinstance(model, str) else type(model).__name__,
        "label": workload.label,
        "kind": workload.kind,
        "size": size if workload.kind in ("builtin",) or model == "qwen3-next" else None,
        "parameters": n_params,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "q3n": __version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
    meta.update(params)
    return meta


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def git_commit() -> str | None:
    """The checkout's commit ("-dirty" with uncommitted changes to tracked files), or None
    outside a git checkout (the device machine's copy of the tree has no .git).

    ``Q3N_COMMIT`` overrides it: a copy of the tree exported from a commit (``git archive``) sits
    inside another checkout, whose commit git would report instead.
    """
    if os.environ.get("Q3N_COMMIT"):
        return os.environ["Q3N_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return None
    commit = head.stdout.strip() if head.returncode == 0 else ""
    return (commit + ("-dirty" if dirty else "")) if commit else None


def _first_tensor(out: Any, strict: bool = True) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0], strict)
    if isinstance(out, dict) and out:
        for value in out.values():
            t = _first_tensor(value, strict=False)
            if t is not None:
                return t
    if hasattr(out, "to_tuple"):
        return _first_tensor(out.to_tuple(), strict)
    if strict:
        raise TypeError(f"cannot find a tensor in the model's output ({type(out).__name__})")
    return None


def _to_fp64(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.double().cpu() if x.is_floating_point() else x.cpu()
    if isinstance(x, dict):
        return {k: _to_fp64(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(_to_fp64(v) for v in x)
    return x
