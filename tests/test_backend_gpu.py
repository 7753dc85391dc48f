"""GPU lane: the backend end to end on CUDA (run with `pytest -m gpu` on an H200)."""

import pytest
import torch

import q3n_compile
from q3n_compile.models import build_model, example_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _err_vs_fp64(out, model_name, inputs):
    exact = build_model(model_name, "tiny", dtype=torch.float64, device="cpu")
    with torch.no_grad():
        ref = exact(*[x.cpu() for x in inputs])
    return ((out.double().cpu() - ref).norm() / ref.norm()).item(), ref


@pytest.mark.parametrize("executor", ["q3n", "inductor"])
@pytest.mark.parametrize("name", ["qwen3", "gpt2", "bert"])
def test_executors_on_cuda_bf16(executor, name):
    model = build_model(name, "tiny", dtype=torch.bfloat16, device="cuda")
    inputs = example_inputs(name, model, 2, 77, device="cuda")
    with torch.no_grad():
        eager = model(*inputs)
        got = torch.compile(model, backend="q3n", options={"executor": executor, "verify": True})(*inputs)
    assert got.device.type == "cuda" and got.dtype == torch.bfloat16
    q3n_err, _ = _err_vs_fp64(got, name, inputs)
    eager_err, _ = _err_vs_fp64(eager, name, inputs)
    # bf16: q3n may be no farther from float64 than eager bf16 is (small slack for reordering).
    assert q3n_err <= 1.5 * eager_err + 1e-3, (q3n_err, eager_err)
    (report,) = q3n_compile.reports()
    assert report["executor"] == executor and report["verify"]["status"] == "passed"


def test_dynamic_lengths_on_cuda_do_not_recompile():
    from torch._dynamo.utils import counters

    model = build_model("qwen3", "tiny", dtype=torch.float16, device="cuda")
    compiled = torch.compile(model, backend="q3n", dynamic=True)
    counters.clear()
    with torch.no_grad():
        for seq_len in (129, 255, 1000):
            ids = example_inputs("qwen3", model, 1, seq_len, device="cuda")[0]
            out, ref = compiled(ids), model(ids)
            assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2
    assert counters["stats"]["unique_graphs"] == 1


def test_quantized_linears_under_cuda_graph_trees():
    # q3n's quantized linears with split K keep their ticket counters across calls; Inductor's
    # CUDA-graph trees (cuda_graphs=True) refuse a tensor left alive in a graph's pool, which is
    # where a counter buffer first allocated during the warm-up run would live (s10run8). Rows 1
    # (gemv1p) and 16 (mmT) both split K at these widths.
    from q3n_compile.kernels import qlinear as Q

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.SiLU(),
                                torch.nn.Linear(4096, 4096)).to("cuda", torch.bfloat16)
    cfg = {"rules": [{"match": "*", "weight_bits": 4, "activation_bits": 8}],
           "calibration": {"example_inputs": False}}  # round to nearest: both compiles alike
    graphed = torch.compile(model, backend="q3n",
                            options={"quant_config": cfg, "cuda_graphs": True})
    plain = torch.compile(model, backend="q3n", options={"quant_config": cfg})
    Q._TICKETS.clear()  # the counters' first allocation then falls in the graph trees' warm-up
    with torch.no_grad():
        for rows in (1, 16):
            for _ in range(3):  # warm-up, recording, replay
                x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
                got = graphed(x).clone()
                assert torch.equal(got, plain(x))
    for report in q3n_compile.reports():  # both linears ran quantized in every graph
        q = report["passes"]["quantize"]
        assert (q["status"], q["rewritten"]) == ("applied", 2)


@pytest.mark.parametrize("name,seq,quant", [("qwen3", 1, True), ("gpt2", 77, False)])
def test_kept_tensors_live_outside_cuda_graph_pools(name, seq, quant):
    # Tensors the launchers keep across calls (norm_linear's placeholder and its bias cast for
    # cuBLAS, the split-K tickets) were allocated on first use; in a CUDA-graph trees' warm-up
    # that is the graph's pool, which refuses them ("tensor(s) in the cudagraph pool not tracked
    # as outputs": qwen3 with the design's quant config, norm fusion and calibration off, s13run1).
    # qwen3 at 1 row: the final norm into lm_head (fused design, placeholder) and
    # norm_act_quant -> qlinear_codes; gpt2 at 2 x 77 rows: the cublas design (the bias cast).
    from q3n_compile.compare import QUANT_CONFIG
    from q3n_compile.kernels import norm_linear as NL
    from q3n_compile.kernels import qlinear as Q

    model = build_model(name, "tiny", dtype=torch.bfloat16, device="cuda")
    options = {"norm_fusion": True}
    if quant:
        options["quant_config"] = dict(QUANT_CONFIG, calibration={"example_inputs": False})
    plain = torch.compile(model, backend="q3n", options=options)
    graphed = torch.compile(model, backend="q3n", options=dict(options, cuda_graphs=True))
    NL._PLACEHOLDERS.clear()
    NL._cast.entries.clear()
    Q._TICKETS.clear()
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(3):  # warm-up, recording, replay
            inputs = example_inputs(name, model, 2 if name == "gpt2" else 1, seq, device="cuda")
            got = graphed(*inputs).float()
            want = plain(*inputs).float()
            assert ((got - want).norm() / want.norm()).item() < 1e-2
    fused = [r["passes"]["norm_linear"]["rewritten"] for r in q3n_compile.reports()]
    assert fused and all(n > 0 for n in fused), fused
