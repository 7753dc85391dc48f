"""``quant_config``: parsing, validation and per-layer resolution.

Accepted form (every key optional)::

    {
      "ffn_layers":  {"weight_bits": 4, "activation_bits": 8},      # feed-forward linears
      "attn_layers": {"weight_bits": 6, "activation_bits": 12},     # attention projections
      "norm_layers": {"dtype": "float16"},                           # accepted, see below
      "rules": [                                                     # first match wins
        {"match": "layers.0.*", "skip": true},
        {"match": ["*.down_proj", "lm_head"], "weight_bits": 8, "activation_bits": 8,
         "group_size": -1, "symmetric": true},
        {"match": "*.o_proj", "weight_bits": 8, "activation_bits": 8, "group_size": 128,
         "activation_group_size": 128},                              # per-group activation scales
        {"match": "*.up_proj", "weight_bits": 8, "activation_bits": 8,
         "rotation": 128},                                           # rotated activations
      ],
      "calibration": {"method": "gptq", "smoothquant": "auto", "clip_search": true,
                      "damp": "auto", "act_order": true, "max_rows": 512, "alpha": null,
                      "example_inputs": true, "refine": 0, "share_smoothing_within": 0.02},
      "merge_siblings": true,
    }

A layer format is ``weight_bits`` (2..8; 16 keeps the layer in high precision),
``activation_bits`` (16: weight-only; 8: dynamic 8-bit; 12: dynamic 12-bit integers; per token,
or per token and channel group: ``activation_group_size`` below),
``group_size`` (32, 64, 128, or -1/"channel" for per-channel scales; when left out: 128, or the
largest of 64 and 32 that divides the layer's K, else per-channel — an explicit size that does
not divide K is an error),
``symmetric`` (default: true for 8-bit weights, false — zero points — below), and
``activation_format`` for 8-bit activations: "auto" (fp8 e4m3 where the GPU has fp8 tensor cores
and the weight codes fit e4m3 exactly, i.e. <= 4 bits; int8 otherwise), "int8" or "fp8", and
``activation_group_size`` for quantized (8- or 12-bit) activations: -1 / "token" (the default:
one dynamic scale per token, ``s = max|x| / qmax`` over the row) or 32, 64, 128 (one scale per
token and that many consecutive input channels: an outlier channel then coarsens only its own
group's codes). Any K is accepted: where the size does not divide K, the last group of a row holds
the ``K % size`` channels left over. Any weight ``group_size`` goes with any activation group (the
kernels' K block is at most both sizes, all powers of two, so it lies in one group of each).
Cost: the activation quantizer writes one fp32 scale per token and group instead of per token;
the GEMM converts and multiplies each K block's partial product in fp32 (int8: no int32
accumulator chained across K blocks), and groups of 32/64 cap the K block at that size (smaller
tensor-core tiles). Per token stays the default: it is the cheaper kernel, the grouped kernels
have not run on a GPU yet, and a default change would move every existing config's results.
Measured on MiniLM W8A8 (``bench/eval_minilm_quant.py``, CPU, calibrated): Spearman of pairwise
similarities 0.99864 with g128 weights and per-token activations, 0.99933 with
``"group_size": 128, "activation_group_size": 128`` (no per-token setting met the 0.999 goal);
per-channel weights with activations per 128 channels 0.99924. Set ``activation_group_size``
where accuracy at 8 bits matters (with ``group_size: 128`` for the best figure).
``rotation`` for quantized activations: 0 (none), 32, 64 or 128, the layer's K a multiple of it
(else the layer is kept in high precision, or ``strict`` raises naming it): the weight is
quantized as ``W R`` from the statistics of the rows ``x R`` and the op quantizes ``x R``, R the
block-diagonal Hadamard rotation of :mod:`q3n_compile.kernels.hadamard` (``x W^T`` unchanged);
an outlier channel is spread over its block before the per-token scale is taken. **Left out,
int8 activations are rotated by 32-channel blocks** where K is a multiple of 32
(:data:`AUTO_ROTATION`, resolved per layer once "auto" activations are int8 or fp8), and fp8 and
12-bit ones are not. Measured on MiniLM W8A8 per-channel, per token, calibrated: Spearman
0.99836 unrotated, 0.99939 by 32-channel blocks, 0.99940 by 64, 0.99945 by 128 (session 34-35;
0.99953 by 128 on the H200's kernels, on a copy of the weights rounded to fp16); the design
config (int8 feed-forward, everything rotated) 0.98428 -> 0.98673 by 32, 0.98903 by 128. Cost:
the activations' quantizer does a b-wide tl.dot per block; on the H200 the W8A8 op ran at
0.96-1.02x its unrotated speed with 32-channel blocks (s35run2) and 0.88-1.00x with 128 (s34run7)
from 16 rows; qwen3 "bench" W8A8 decode steps of 1 row took the same time with 32 and 32 rows
0.7% longer (s35run4, ``bench/RESULTS.md``, session 35). fp8 is not rotated by default: it
keeps a relative precision per element, and on a layer with one 100x outlier channel the
rotation raised its error 7.0e-3 -> 2.6e-2. It may combine with ``activation_group_size``.
After a norm that norm_linear folded, ``q3n::norm_act_quant`` rotates too (x_hat R in the same
pass over x).

Resolution for a linear at module path ``p`` with layer class ``c``: the first rule whose glob
matches ``p`` (``fnmatch``, case-sensitive) decides; otherwise the class entry (``ffn_layers`` for
feed-forward, ``attn_layers`` for attention projections); otherwise the layer is left alone.
``lm_head`` and other output heads (and routers of mixtures of experts) are left alone unless a
rule *names* them: the rule's pattern contains the layer's own name (``"lm_head"``,
``"*.lm_head"``); a catch-all ``"*"`` does not count. Embeddings are lookups, never linears: the
quantize pass does not touch them.

``merge_siblings`` (default true): quantized linears that read the same input with the same
format and smoothing vector (q/k/v, gate/up) run as one GEMM on their concatenated packed weights,
the output sliced back, so x is quantized once and narrow weights (GQA k/v) join a wide one
(:mod:`q3n_compile.passes.qlinear_siblings`); false keeps one call per linear. Calibrated 8-bit
activations get a smoothing vector per layer, which would keep such siblings apart. So the
group's own choice, made once for their concatenated weight (each member's outputs weighed
alike), is offered to each member: a member takes it where its calibration error (RTN+clip, the
way a layer's candidates are compared) rises by at most ``calibration.share_smoothing_within``
(default 0.02) over its own choice's; otherwise the choice is made again without the member it
suits least, and a member never takes it alone. The members that take it merge; the report
gives each member's two errors (``shared_smoothing`` in its layer entry) and why the others
stay apart. ``"shared_smoothing"`` imposes the group's choice on every member. Measured on
MiniLM (W8A8 calibrated, CPU, Spearman of pairwise similarities over two folds, which moves by
2-5e-4 with any change): per-channel weights 0.99872 apart, 0.99841 at 0.02 (q/k merged in 5 of
6 layers; v kept its own: the group's raised its error 7-12%), 0.99809 imposed (session 31);
g128 weights with activations per 128 channels 0.99933 apart, 0.99934 at 0.02, 0.99945 at 0.05;
mean cosine of the embeddings 0.99942-0.99945 and 0.99979-0.99981 in every case. On qwen3
"bench" (H200, calibrated W8A8, CUDA graphs) the merged groups ran 1.11-1.12x faster a step.

``calibration``: ``method`` "gptq" (error-compensating rounding from the input Hessian) or "rtn";
``smoothquant`` (a per-input-channel smoothing vector: the kernel multiplies x by it before
quantizing, the weights absorb its inverse) "auto" (for 8-bit activations), true (for any
quantized activations, 12-bit too) or false; ``clip_search`` (scales' clipping
ratio searched per group); ``damp`` (GPTQ's Hessian damping, a fraction of its mean diagonal;
"auto": ``0.2 K / rows`` clamped to [0.01, 1], strong when there are few calibration rows for the
layer's width K, where the sample Hessian is noisy or singular); ``act_order`` (GPTQ quantizes
the columns by decreasing input energy);
``max_rows`` (calibration rows kept per layer for error figures and searches); ``alpha``
(which smoothing: null, the default, the vector minimising a noise model of the activation and
weight rounding errors on the calibration rows — see
:func:`q3n_compile.quant.algorithms.noise_model_smoothing` — or none, whichever gives the lower
error on the calibration rows; "search": SmoothQuant's ``max|x|^a / max|W|^(1-a)`` with ``a``
searched per layer over 0.3-0.8, or none; a number in [0, 1]: SmoothQuant with that ``a``.
Measured on MiniLM (``bench/eval_minilm_quant.py``), the noise model's vector against the
alpha search: embeddings' ``1 - cosine`` 7.2e-4 -> 5.8e-4 for W8A8 (Spearman 0.9983 ->
0.9987), 1.14e-2 -> 9.5e-3 for the design config; with ``smoothquant: true`` on W6A12
attention alone, 6.5e-4 -> 4.0e-4. The alpha search picked, by calibration error, alphas that
did worse on held-out sentences);
``example_inputs`` (default true: a layer that
:func:`q3n_compile.quant.calibrate` did not reach is calibrated on the example inputs of the first
compile that sees it; false: such a layer is rounded to nearest without data);
``share_smoothing_within`` (default 0.02, in [0, 1]: with ``merge_siblings`` true, the
fraction by which a sibling's calibration error may rise when it takes its group's smoothing
choice; above it the sibling keeps its own vector and its own GEMM);
``refine`` (0, the default, to 32: coordinate-descent sweeps over GPTQ's codes on GPTQ's own
damped objective, scales and zero points unchanged — :mod:`q3n_compile.quant.refine`; it never
raises that objective; on MiniLM it lowered held-out layer errors by 1.5-2% and moved the
embeddings' Spearman by -0.0003 to +0.001, within noise, for about GPTQ's time again: off unless
asked for).

Guarantees: :func:`validate_quant_config` raises :class:`~q3n_compile.config.Q3NConfigError`
naming the offending entry (as a Python subscript path) and saying how to fix it; it accepts
exactly what :func:`parse_quant_config` can parse. ``norm_layers`` is validated and reported but
not applied by the quantize pass (norms are the norm_linear pass's business).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Mapping, Optional, Sequence

from ..config import Q3NConfigError

CLASS_KEYS = {"ffn_layers": "ffn", "attn_layers": "attn"}
TOP_KEYS = ("ffn_layers", "attn_layers", "norm_layers", "rules", "calibration", "merge_siblings")
FORMAT_KEYS = ("weight_bits", "activation_bits", "group_size", "symmetric", "activation_format",
               "activation_group_size", "rotation")
RULE_KEYS = ("match", "skip") + FORMAT_KEYS
CALIBRATION_KEYS = ("method", "smoothquant", "clip_search", "damp", "act_order", "max_rows",
                    "alpha", "example_inputs", "refine", "share_smoothing_within")
MAX_REFINE_SWEEPS = 32  # q3n_compile.quant.refine.MAX_SWEEPS (not imported: it pulls in the kernels)
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
KEEP_BITS = 16
ACTIVATION_BITS = (16, 12, 8)
GROUP_SIZES = (32, 64, 128)
PER_CHANNEL = -1
ACTIVATION_GROUP_SIZES = (32, 64, 128)
PER_TOKEN = -1  # activation_group_size: one activation scale per token (the default)
ROTATIONS = (0, 32, 64, 128)  # none, or Hadamard blocks of that many channels (kernels/hadamard.py)
# rotation left out: resolved per layer by LayerFormat.resolved, DEFAULT_ROTATION-channel blocks
# for int8 activations where K is a multiple of it, else none (int12 resolves 4096 levels
# already; fp8 keeps a relative precision per element, which the rotation does not help).
AUTO_ROTATION = -1
DEFAULT_ROTATION = 32
AUTO_GROUP = 0  # group_size left out: resolved per layer by LayerFormat.for_k
A8_FORMATS = ("auto", "int8", "fp8")
NORM_DTYPES = ("float16", "bfloat16", "float32")
# Classes that are never quantized unless a rule names the layer.
PROTECTED_CLASSES = ("head", "router")
SHARED_SMOOTHING = "shared_smoothing"  # merge_siblings: one smoothing choice per sibling group


@dataclasses.dataclass(frozen=True)
class LayerFormat:
    """How one linear is quantized. ``activation_format``: "none", "int12", "auto", "int8", "fp8";
    ``activation_group_size``: -1 (one activation scale per token) or 32/64/128 (one per token
    and that many input channels); ``rotation``: 0, or 32, 64 or 128 (the weight is quantized as
    ``W R`` and the op quantizes ``x R``, R the block-diagonal Hadamard rotation of
    :mod:`q3n_compile.kernels.hadamard`), or :data:`AUTO_ROTATION` (the key left out with 8-bit
    activations) until :meth:`resolved` settles it for a layer."""

    weight_bits: int
    activation_bits: int = 16
    group_size: int = AUTO_GROUP
    symmetric: bool = False
    activation_format: str = "none"
    activation_group_size: int = PER_TOKEN
    rotation: int = 0

    def for_k(self, k: int) -> "LayerFormat":
        """This format with an automatic group size resolved for in_features `k`."""
        if self.group_size != AUTO_GROUP:
            return self
        group = next((g for g in (128, 64, 32) if k % g == 0), PER_CHANNEL)
        return dataclasses.replace(self, group_size=group)

    def resolved(self, k: int, fp8: bool) -> "LayerFormat":
        """This format for a layer of in_features `k`: the group size as :meth:`for_k`, an
        "auto" activation format as the hardware decides (`fp8`: fp8 e4m3, else int8), and an
        automatic rotation as :data:`AUTO_ROTATION` says."""
        fmt = self.for_k(k)
        if fmt.activation_bits == 8 and fmt.activation_format == "auto":
            fmt = dataclasses.replace(fmt, activation_format="fp8" if fp8 else "int8")
        if fmt.rotation == AUTO_ROTATION:
            rot = (DEFAULT_ROTATION if fmt.activation_format == "int8" and k % DEFAULT_ROTATION == 0
                   else 0)
            fmt = dataclasses.replace(fmt, rotation=rot)
        return fmt

    @property
    def name(self) -> str:
        group = {PER_CHANNEL: "channel", AUTO_GROUP: "gauto"}.get(self.group_size,
                                                                  f"g{self.group_size}")
        act = "" if self.activation_bits == 16 else f" {self.activation_format}"
        if self.activation_group_size != PER_TOKEN:
            act += f" act-g{self.activation_group_size}"
        if self.rotation > 0:
            act += f" rot{self.rotation}"
        return (f"W{self.weight_bits}A{self.activation_bits} {group} "
                f"{'sym' if self.symmetric else 'asym'}{act}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Rule:
    index: int
    patterns: tuple[str, ...]
    fmt: Optional[LayerFormat]  # None: skip (keep in high precision)

    def matches(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, p) for p in self.patterns)

    def names(self, path: str) -> bool:
        """The rule matches `path` and spells its last component (not only through wildcards)."""
        leaf = path.rsplit(".", 1)[-1]
        return self.matches(path) and any(leaf in p for p in self.patterns)


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    method: str = "gptq"  # "gptq" | "rtn"
    smoothquant: Any = "auto"  # "auto" (8-bit activations) | True | False
    clip_search: bool = True
    damp: Any = "auto"  # "auto" | a fraction of mean(diag H) in (0, 1]
    act_order: bool = True
    max_rows: int = 512
    # Smoothing of quantized activations: None: the noise-model optimum (or none, per layer);
    # "search": SmoothQuant's rule, alpha searched per layer; a number: SmoothQuant's alpha.
    alpha: Any = None
    # Layers calibrate() did not reach calibrate on the example inputs of the first compile.
    example_inputs: bool = True
    # Coordinate-descent sweeps over GPTQ's codes on GPTQ's own objective (quant/refine.py);
    # 0: off (the default: on MiniLM its gain was within noise, for about GPTQ's time again).
    refine: int = 0
    # merge_siblings true: a sibling adopts its group's smoothing choice (so it can share the
    # group's GEMM) when that raises its calibration error by at most this fraction of its own
    # choice's.
    share_smoothing_within: float = 0.02

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    classes: Mapping[str, Optional[LayerFormat]]
    rules: tuple[Rule, ...]
    norm_layers: Optional[Mapping[str, Any]]
    calibration: CalibrationSettings
    # Sibling linears on one input with one format become one GEMM (passes/qlinear_siblings.py):
    # True, False or "shared_smoothing" (one smoothing choice per group, so calibrated 8-bit
    # siblings merge too).
    merge_siblings: Any = True

    def resolve(self, path: str, layer_class: Optional[str]) -> tuple[Optional[LayerFormat], str]:
        """(format or None, why): the format `path` gets, and which entry decided it."""
        for rule in self.rules:
            if not rule.matches(path):
                continue
            if layer_class in PROTECTED_CLASSES and not rule.names(path):
                continue
            where = f"rules[{rule.index}]"
            if rule.fmt is None:
                return None, f"{where} says skip"
            return rule.fmt, where
        if layer_class in PROTECTED_CLASSES:
            return None, f"{layer_class} layers stay in high precision unless a rule names them"
        for key, cls in CLASS_KEYS.items():
            if cls == layer_class:
                if cls not in self.classes:
                    return None, f"no {key} entry"
                fmt = self.classes[cls]
                if fmt is None:
                    return None, f"{key} has weight_bits 16: kept in high precision"
                return fmt, key
        return None, "no rule matched and the layer is neither attention nor feed-forward"


def _where(path: Sequence[Any]) -> str:
    return "quant_config" + "".join(f"[{p!r}]" for p in path)


def _fail(path: Sequence[Any], problem: str, fix: str) -> Q3NConfigError:
    return Q3NConfigError(f"q3n: {_where(path)}: {problem}. Fix: {fix}")


def _check_keys(entry: Any, allowed: Sequence[str], path: Sequence[Any]) -> None:
    if not isinstance(entry, Mapping):
        raise _fail(path, f"expected a dict, got {type(entry).__name__}",
                    f"give a dict with keys from {', '.join(allowed)}")
    for key in entry:
        if key not in allowed:
            raise _fail(list(path) + [key], "unknown key", f"use one of {', '.join(allowed)}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_format(entry: Mapping[str, Any], path: Sequence[Any]) -> Optional[LayerFormat]:
    """A LayerFormat, or None when weight_bits is 16 (keep)."""
    path = list(path)
    if "weight_bits" not in entry:
        raise _fail(path, "missing 'weight_bits'",
                    "add 'weight_bits': an integer from 2 to 8 (or 16 to keep high precision)")
    wb = entry["weight_bits"]
    if not _is_int(wb) or (wb not in WEIGHT_BITS and wb != KEEP_BITS):
        raise _fail(path + ["weight_bits"], f"{wb!r} is not supported",
                    "use an integer from 2 to 8, or 16 to keep the layer in high precision")
    ab = entry.get("activation_bits", 16)
    if not _is_int(ab) or ab not in ACTIVATION_BITS:
        raise _fail(path + ["activation_bits"], f"{ab!r} is not supported",
                    "use 16 (weight-only), 12 (per-token 12-bit) or 8 (per-token 8-bit)")
    gs = entry.get("group_size", AUTO_GROUP)
    if gs in ("channel", None):
        gs = PER_CHANNEL
    if not _is_int(gs) or (gs not in GROUP_SIZES and gs not in (PER_CHANNEL, AUTO_GROUP)) or (
            gs == AUTO_GROUP and "group_size" in entry):
        raise _fail(path + ["group_size"], f"{gs!r} is not supported",
                    "use 32, 64, 128, or -1 / 'channel' for per-channel scales")
    sym = entry.get("symmetric", wb == 8)
    if not isinstance(sym, bool):
        raise _fail(path + ["symmetric"], f"{sym!r} is not a bool", "use true or false")
    fmt_default = {16: "none", 12: "int12", 8: "auto"}[ab]
    af = entry.get("activation_format", fmt_default)
    allowed = {16: ("none",), 12: ("int12",), 8: A8_FORMATS}[ab]
    if af not in allowed:
        raise _fail(path + ["activation_format"],
                    f"{af!r} does not go with activation_bits={ab}",
                    f"use one of {', '.join(map(repr, allowed))} (or leave it out)")
    ag = _parse_activation_group(entry, ab, path)
    rot = _parse_rotation(entry, ab, path)
    if wb == KEEP_BITS:
        return None
    if wb == 8 and not sym and ab in (8, 16):
        raise _fail(path, "8-bit weights with zero points are not supported "
                    f"with activation_bits={ab} (q - z needs 9 bits)",
                    "set 'symmetric': true, or use weight_bits <= 7")
    return LayerFormat(wb, ab, gs, sym, af, ag, rot)


def _parse_rotation(entry: Mapping[str, Any], activation_bits: int, path: list) -> int:
    """``rotation``: 0 / None / false (none) or 32, 64 or 128 (Hadamard blocks of that many
    channels; K must be a multiple of it: the quantize pass checks each layer). Left out:
    :data:`AUTO_ROTATION` with 8-bit activations that may be int8, else 0."""
    if "rotation" not in entry:
        may_be_int8 = activation_bits == 8 and entry.get("activation_format", "auto") != "fp8"
        return AUTO_ROTATION if may_be_int8 else 0
    rot = entry["rotation"]
    if rot in (None, False):
        rot = 0
    if not _is_int(rot) or rot not in ROTATIONS:
        raise _fail(path + ["rotation"], f"{rot!r} is not supported",
                    "use 32, 64 or 128 (rotate each block of that many channels of the layer's "
                    "input by a Hadamard matrix before quantizing it; K must be a multiple of "
                    "it) or 0 (none)")
    if rot and activation_bits == 16:
        raise _fail(path + ["rotation"],
                    f"a rotation ({rot}) serves quantized activations, but activation_bits is 16",
                    "set 'activation_bits' to 8 or 12, or drop 'rotation'")
    return rot


def _parse_activation_group(entry: Mapping[str, Any], activation_bits: int,
                            path: list) -> int:
    """``activation_group_size``: -1 / "token" / None (per token, the default) or 32/64/128.

    Any K is accepted (the last group of a row is partial when the size does not divide K), and
    any weight group_size goes with it (the kernels' K block is at most both, and divides both)."""
    ag = entry.get("activation_group_size", PER_TOKEN)
    if ag in ("token", None):
        ag = PER_TOKEN
    if not _is_int(ag) or (ag not in ACTIVATION_GROUP_SIZES and ag != PER_TOKEN):
        raise _fail(path + ["activation_group_size"], f"{ag!r} is not supported",
                    "use 32, 64 or 128 (one activation scale per token and that many input "
                    "channels), or -1 / 'token' (one per token, the default)")
    if ag != PER_TOKEN and activation_bits == 16:
        raise _fail(path + ["activation_group_size"],
                    f"activation scale groups ({ag}) need quantized activations, but "
                    "activation_bits is 16",
                    "set 'activation_bits' to 8 or 12, or drop 'activation_group_size'")
    return ag


def _parse_calibration(entry: Any) -> CalibrationSettings:
    path = ["calibration"]
    _check_keys(entry, CALIBRATION_KEYS, path)
    c = CalibrationSettings()
    method = entry.get("method", c.method)
    if method not in ("gptq", "rtn"):
        raise _fail(path + ["method"], f"{method!r} is not a method", "use 'gptq' or 'rtn'")
    sq = entry.get("smoothquant", c.smoothquant)
    if sq not in ("auto", True, False):
        raise _fail(path + ["smoothquant"], f"{sq!r} is not accepted", "use 'auto', true or false")
    clip = entry.get("clip_search", c.clip_search)
    if not isinstance(clip, bool):
        raise _fail(path + ["clip_search"], f"{clip!r} is not a bool", "use true or false")
    damp = entry.get("damp", c.damp)
    if damp != "auto" and (isinstance(damp, bool) or not isinstance(damp, (int, float))
                           or not 0 < damp <= 1):
        raise _fail(path + ["damp"], f"{damp!r} is out of range",
                    "use 'auto' (from the rows per layer width) or a number in (0, 1], e.g. 0.01")
    act_order = entry.get("act_order", c.act_order)
    if not isinstance(act_order, bool):
        raise _fail(path + ["act_order"], f"{act_order!r} is not a bool", "use true or false")
    rows = entry.get("max_rows", c.max_rows)
    if not _is_int(rows) or rows < 16:
        raise _fail(path + ["max_rows"], f"{rows!r} is not accepted", "use an integer >= 16")
    alpha = entry.get("alpha", c.alpha)
    if alpha is not None and alpha != "search" and (
            isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1):
        raise _fail(path + ["alpha"], f"{alpha!r} is out of range",
                    "use null (noise-model smoothing, the default), 'search' (SmoothQuant's "
                    "alpha searched per layer) or a number in [0, 1] (SmoothQuant's alpha)")
    examples = entry.get("example_inputs", c.example_inputs)
    if not isinstance(examples, bool):
        raise _fail(path + ["example_inputs"], f"{examples!r} is not a bool",
                    "use true (calibrate on the example inputs when calibrate() was not run) "
                    "or false")
    refine = entry.get("refine", c.refine)
    if not _is_int(refine) or not 0 <= refine <= MAX_REFINE_SWEEPS:
        raise _fail(path + ["refine"], f"{refine!r} is not a number of sweeps",
                    f"use an integer from 0 (off, the default) to {MAX_REFINE_SWEEPS}: the "
                    "coordinate-descent sweeps over GPTQ's codes (4 is plenty)")
    within = entry.get("share_smoothing_within", c.share_smoothing_within)
    if isinstance(within, bool) or not isinstance(within, (int, float)) or not 0 <= within <= 1:
        raise _fail(path + ["share_smoothing_within"], f"{within!r} is out of range",
                    "use a number in [0, 1]: the fraction by which a sibling's calibration error "
                    "may rise when it adopts its group's smoothing vector (0.02, the default; 0: "
                    "only where it is no worse)")
    return CalibrationSettings(method, sq, clip, damp if damp == "auto" else float(damp),
                               act_order, rows,
                               alpha if alpha in (None, "search") else float(alpha), examples,
                               refine, float(within))


def parse_quant_config(value: Mapping[str, Any]) -> QuantConfig:
    """Parse and validate; raises :class:`Q3NConfigError` naming the entry and the fix."""
    _check_keys(value, TOP_KEYS, [])
    classes: dict[str, Optional[LayerFormat]] = {}
    for key, cls in CLASS_KEYS.items():
        if key in value:
            _check_keys(value[key], FORMAT_KEYS, [key])
            classes[cls] = _parse_format(value[key], [key])
    norm = value.get("norm_layers")
    if norm is not None:
        _check_keys(norm, ("dtype",), ["norm_layers"])
        if norm.get("dtype", "float16") not in NORM_DTYPES:
            raise _fail(["norm_layers", "dtype"], f"{norm.get('dtype')!r} is not accepted",
                        f"use one of {', '.join(NORM_DTYPES)}")
    rules_in = value.get("rules", [])
    if not isinstance(rules_in, (list, tuple)):
        raise _fail(["rules"], f"expected a list, got {type(rules_in).__name__}",
                    "give a list of {'match': glob, 'weight_bits': ...} dicts")
    rules = []
    for i, entry in enumerate(rules_in):
        path = ["rules", i]
        _check_keys(entry, RULE_KEYS, path)
        match = entry.get("match")
        patterns = (match,) if isinstance(match, str) else tuple(match) if isinstance(
            match, (list, tuple)) else None
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise _fail(path + ["match"], f"{match!r} is not a glob or list of globs",
                        "give a module-path glob such as 'layers.*.mlp.down_proj'")
        skip = entry.get("skip", False)
        if not isinstance(skip, bool):
            raise _fail(path + ["skip"], f"{skip!r} is not a bool", "use true or false")
        if skip:
            extra = [k for k in FORMAT_KEYS if k in entry]
            if extra:
                raise _fail(path, f"'skip': true together with {extra[0]!r}",
                            "drop the format keys, or drop 'skip'")
            fmt = None
        else:
            fmt = _parse_format(entry, path)
        rules.append(Rule(i, patterns, fmt))
    calibration = _parse_calibration(value.get("calibration", {}))
    merge = value.get("merge_siblings", True)
    if not (isinstance(merge, bool) or merge == SHARED_SMOOTHING):
        raise _fail(["merge_siblings"], f"{merge!r} is not accepted",
                    "use true (siblings that quantize x alike run as one GEMM, the default), "
                    f"{SHARED_SMOOTHING!r} (also one smoothing choice per sibling group, so "
                    "calibrated 8-bit siblings merge too) or false (one call per linear)")
    return QuantConfig(classes, tuple(rules), norm, calibration, merge)


def wants_example_inputs(value: Optional[Mapping[str, Any]]) -> bool:
    """Whether a compile with this ``quant_config`` option may calibrate on its example inputs.

    The backend keeps the first call's real inputs until the graph is compiled only when this
    (or ``verify``) says so: a config that quantizes something and has not turned
    ``calibration.example_inputs`` off.
    """
    if not value:
        return False
    qc = parse_quant_config(value)
    quantizes = any(f is not None for f in qc.classes.values()) or any(
        r.fmt is not None for r in qc.rules)
    return quantizes and qc.calibration.example_inputs


def validate_quant_config(value: Any) -> Any:
    """Validate an option value (None or a dict); returns it unchanged (config.py stores it)."""
    if value is not None:
        parse_quant_config(value)
    return value
