"""q3n's one configuration type, built from torch.compile's `options`/`mode` and `Q3N_*` variables.

Guarantees:
- :class:`Q3NConfig` is frozen; every field has a validated value once built.
- Precedence: `options` over environment variables over defaults.
- An unknown option names itself and lists the valid ones; a bad value names the option and what
  it accepts; an unknown `Q3N_*` variable is warned about (a typo should not go unnoticed, but the
  environment is shared with other tools, so it does not fail compilation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Mapping

ATTENTION_MODES = ("tiled", "sparse", "off")
EXECUTORS = ("auto", "q3n", "inductor")
# torch.compile's modes and what each means for q3n.
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class Q3NConfigError(ValueError):
    """An option or environment variable q3n cannot accept; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Q3NConfig:
    # Rewrite attention into q3n::attention: "tiled" (exact), "sparse" (block-sparse, lossy), "off".
    attention: str = "tiled"
    # Fraction of key blocks kept per query block in sparse mode.
    sparse_keep: float = 0.2
    # Sparse mode runs a layer dense when its kept blocks hold less attention weight than this.
    sparse_min_mass: float = 0.95
    # Fold LayerNorm/RMSNorm into the linears that consume them. Off by default: on the H200 the
    # fused kernel is still slower than norm + cuBLAS (bench/results/norm_linear-h200-*.json).
    norm_fusion: bool = False
    # Mixed-precision quantization of linears (None: no quantization).
    quant_config: Mapping[str, Any] | None = None
    # Plan intermediate buffers into one arena (executor "q3n" only).
    memory_plan: bool = True
    # Length buckets the memory plan is made for (None: powers of two); a plan per bucket, cached.
    memory_buckets: tuple[int, ...] | None = None
    # Time the planner may spend improving one plan toward the lower bound.
    memory_plan_time_s: float = 0.5
    # Capture and replay CUDA graphs; `mode="reduce-overhead"` turns it on.
    cuda_graphs: bool = False
    # What runs the rewritten graph: q3n's generated Python (+ arena, CUDA graphs), Inductor for
    # the rest, or "auto": chosen per graph by measurement (see `resolve_executor`).
    executor: str = "auto"
    # Write per-graph dumps under this folder (also `Q3N_DUMP=dir`).
    dump_dir: str | None = None
    # Raise instead of rolling a failing pass back.
    strict: bool = False
    # Run the compiled graph against the captured one on the example inputs; fall back on mismatch.
    verify: bool = False
    # Let Inductor autotune (set by the max-autotune modes; executor "inductor" only).
    autotune: bool = False
    # Progress lines on stderr for long compile-time work (quantization, layer by layer): None
    # ("auto") once it has run 5 s, True always, False never.
    progress: bool | None = None
    # torch.compile's mode, as given.
    mode: str = "default"

    @classmethod
    def from_options(
        cls,
        options: Mapping[str, Any] | None = None,
        mode: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> "Q3NConfig":
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        values.update(_from_environ(environ))
        if options is not None:
            if not isinstance(options, Mapping):
                raise Q3NConfigError(
                    f"q3n: options must be a dict, got {type(options).__name__}"
                )
            unknown = [k for k in options if k not in _FIELDS]
            if unknown:
                raise Q3NConfigError(
                    f"q3n: unknown option {unknown[0]!r}. Valid options: {', '.join(sorted(_FIELDS))}"
                )
            values.update({k: _parse(k, v) for k, v in options.items()})
        values.update(_from_mode(mode, values))
        return cls(**values)

    def resolve_executor(self, devices: set[str]) -> tuple[str, str]:
        """The executor a graph on `devices` runs with, and why.

        ``executor="auto"`` chooses from measurements (bench/RESULTS.md, "Executors"): on CUDA,
        Inductor for the ops q3n does not rewrite was faster than q3n's generated Python at every
        prefill length measured on the H200 and had the lower peak; with ``cuda_graphs=True``
        Inductor's CUDA graph trees over the rewritten graph decoded 1.47x (batch 1) and 1.54x
        (batch 8) faster than q3n's own capture of its arena executor. On the CPU q3n's executor
        wins: Inductor's C++ compile costs far more than it saves on the small models the CPU runs.
        """
        if self.executor != "auto":
            return self.executor, "executor=" + repr(self.executor) + " was given"
        if "cuda" in devices:
            if self.cuda_graphs:
                return "inductor", "auto: on CUDA with cuda_graphs, Inductor's CUDA graph trees measured faster"
            return "inductor", "auto: on CUDA, Inductor for the ops q3n leaves measured faster"
        return "q3n", "auto: off CUDA, q3n's executor (no Inductor compile)"

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["quant_config"] = (
            json.loads(json.dumps(self.quant_config)) if self.quant_config is not None else None
        )
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(Q3NConfig) if f.name != "mode"}

# Variables beside the one-per-option Q3N_<OPTION>: Q3N_DUMP is the short spelling of Q3N_DUMP_DIR.
_ENV_ALIASES = {"Q3N_DUMP": "dump_dir"}
# Q3N_ variables that are not compile options: Q3N_COMMIT names the commit result files record
# (q3n_compile.compare.git_commit).
_ENV_NOT_OPTIONS = frozenset({"Q3N_COMMIT"})


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for var, raw in environ.items():
        if not var.startswith("Q3N_") or var in _ENV_NOT_OPTIONS:
            continue
        key = _ENV_ALIASES.get(var, var[4:].lower())
        if key not in _FIELDS:
            valid = sorted([f"Q3N_{k.upper()}" for k in _FIELDS] + list(_ENV_ALIASES))
            warnings.warn(
                f"q3n: ignoring unknown environment variable {var}. Valid: {', '.join(valid)}",
                stacklevel=3,
            )
            continue
        try:
            values[key] = _parse(key, raw, from_env=True)
        except Q3NConfigError as err:
            raise Q3NConfigError(f"{err} (from environment variable {var}={raw!r})") from None
    return values


def _from_mode(mode: str | None, values: dict[str, Any]) -> dict[str, Any]:
    mode = mode or "default"
    if mode not in MODES:
        raise Q3NConfigError(f"q3n: unknown torch.compile mode {mode!r}. Valid modes: {', '.join(MODES)}")
    implied: dict[str, Any] = {"mode": mode}
    if mode in ("reduce-overhead", "max-autotune"):
        implied["cuda_graphs"] = values.get("cuda_graphs", True)
    if mode in ("max-autotune", "max-autotune-no-cudagraphs"):
        implied["autotune"] = values.get("autotune", True)
    return implied


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _parse(key: str, value: Any, from_env: bool = False) -> Any:
    """Validate one option's value, converting environment strings to the option's type."""

    def bad(accepts: str) -> Q3NConfigError:
        return Q3NConfigError(f"q3n: option {key!r} accepts {accepts}; got {value!r}")

    def boolean(accepts: str) -> bool:
        if from_env and isinstance(value, str):
            if value.lower() in _TRUE:
                return True
            if value.lower() in _FALSE:
                return False
            raise bad(accepts if accepts != "True or False" else "true/false (1/0, yes/no, on/off)")
        if not isinstance(value, bool):
            raise bad(accepts)
        return value

    if key in ("norm_fusion", "memory_plan", "cuda_graphs", "strict", "verify", "autotune"):
        return boolean("True or False")
    if key == "progress":
        if value is None or (isinstance(value, str) and value.lower() == "auto"):
            return None
        return boolean('True, False or None / "auto" (lines once the work has run 5 s)')
    if key == "attention":
        if value not in ATTENTION_MODES:
            raise bad(" | ".join(repr(m) for m in ATTENTION_MODES))
        return value
    if key == "executor":
        if value not in EXECUTORS:
            raise bad(" | ".join(repr(e) for e in EXECUTORS))
        return value
    if key in ("sparse_keep", "sparse_min_mass"):
        try:
            number = float(value) if from_env else value
        except ValueError:
            raise bad("a number in (0, 1]") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 < number <= 1:
            raise bad("a number in (0, 1]")
        return float(number)
    if key == "memory_buckets":
        if value is None or value == "":
            return None
        if from_env and isinstance(value, str):
            try:
                value = json.loads(value if value.lstrip().startswith("[") else f"[{value}]")
            except json.JSONDecodeError:
                raise bad("a list of positive lengths, e.g. 512,2048,8192") from None
        if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
        ):
            raise bad("a list of positive lengths, e.g. [512, 2048, 8192], or None")
        return tuple(sorted(set(value)))
    if key == "memory_plan_time_s":
        try:
            number = float(value) if from_env else value
        except ValueError:
            raise bad("a number of seconds >= 0") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
            raise bad("a number of seconds >= 0")
        return float(number)
    if key == "dump_dir":
        if value is None or value == "":
            return None
        if not isinstance(value, (str, os.PathLike)):
            raise bad("a folder path (str)")
        return os.fspath(value)
    if key == "quant_config":
        if from_env and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise bad(f"a JSON object ({err})") from None
        if value is not None and not isinstance(value, Mapping):
            raise bad("a dict such as {'ffn_layers': {'weight_bits': 4, 'activation_bits': 8}}, or None")
        try:
            json.dumps(value)
        except TypeError:
            raise bad("a JSON-serialisable dict") from None
        # The schema (layer classes, rules, formats, calibration): errors name the entry and the fix.
        from .quant.config import validate_quant_config

        return validate_quant_config(value)
    raise AssertionError(f"no parser for option {key}")  # pragma: no cover - _FIELDS is closed
