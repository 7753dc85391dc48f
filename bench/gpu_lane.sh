#!/usr/bin/env bash
# The GPU lane in one call of the device tool (an H200 with torch 2.11, triton 3.6, no network):
# install, the tests marked gpu, then the benchmarks. Everything lands under $OUT (default ./gpu_out).
#   bash bench/gpu_lane.sh [tests|attention|norm_linear|qlinear|memory|model|lossy|quant_decode|decode_steps|host|all]...
# One step each call keeps a call under the device tool's 10 minutes; `all` does not fit in one.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton, subprocess
print("gpu", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
PY
steps=${*:-all}
status=0
for step in $steps; do
  if [[ $step == tests || $step == all ]]; then
    python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
    [[ ${PIPESTATUS[0]} == 0 ]] || status=1
  fi
  if [[ $step == attention || $step == all ]]; then
    python3 bench/bench_attention.py --out "$OUT/attention-h200.json" 2>&1 | tee "$OUT/bench_attention.log" | tail -30
  fi
  if [[ $step == norm_linear || $step == all ]]; then
    python3 bench/bench_norm_linear.py --out "$OUT/norm_linear-h200.json" 2>&1 | tee "$OUT/bench_norm_linear.log" | tail -16
  fi
  if [[ $step == qlinear || $step == all ]]; then
    python3 bench/bench_qlinear.py --out "$OUT/qlinear-h200.json" 2>&1 | tee "$OUT/bench_qlinear.log" | tail -20
  fi
  if [[ $step == memory || $step == all ]]; then
    python3 bench/bench_memory.py --seqs 512 2048 8192 16384 --backends eager,inductor,q3n,q3n-inductor \
      --out "$OUT/memory-h200.json" 2>&1 | tee "$OUT/bench_memory.log" | tail -20
  fi
  if [[ $step == model || $step == all ]]; then
    # Rows are saved as measured (results.partial.jsonl) if the call's time limit cuts the run.
    q3n bench --model qwen3 --size bench --device cuda --seq-len 512 2048 8192 --decode-batch 1 8 \
      --backends inductor,inductor-cudagraphs,q3n,q3n+cudagraphs,q3n+arena+cudagraphs --time-budget 2 \
      --out "$OUT/qwen3-bench" 2>&1 | tee "$OUT/bench_model.log" | tail -30
  fi
  if [[ $step == lossy || $step == all ]]; then
    q3n bench --model qwen3 --size bench --device cuda --seq-len 2048 8192 --no-decode \
      --backends q3n+quant,q3n+sparse --time-budget 2 --out "$OUT/qwen3-bench-lossy" 2>&1 \
      | tee "$OUT/bench_lossy.log" | tail -20
  fi
  if [[ $step == quant_decode || $step == all ]]; then
    # The design's quantized model decoding under CUDA graphs (GPU time), against bf16 q3n.
    python3 -m pytest -q -m gpu -p no:cacheprovider \
      tests/test_backend_gpu.py::test_quantized_linears_under_cuda_graph_trees 2>&1 \
      | tee "$OUT/pytest_quant_cudagraphs.log" | tail -3
    [[ ${PIPESTATUS[0]} == 0 ]] || status=1
    # quant+norm: the norm fused into the activation quantization, siblings (q/k/v, gate/up) in
    # one GEMM each: fewer launches a step.
    quant=$(python3 -c 'import json; from q3n_compile.compare import QUANT_CONFIG as Q; print(json.dumps(Q))')
    q3n bench --model qwen3 --size bench --device cuda --no-prefill --decode-batch 1 32 \
      --backends q3n+cudagraphs \
      --q3n-set "quant+cudagraphs={\"quant_config\": $quant, \"cuda_graphs\": true}" \
      --q3n-set "quant+norm+cudagraphs={\"quant_config\": $quant, \"cuda_graphs\": true, \"norm_fusion\": true}" \
      --time-budget 2 --out "$OUT/qwen3-bench-quant-decode" 2>&1 \
      | tee "$OUT/bench_quant_decode.log" | tail -20
  fi
  if [[ $step == decode_steps || $step == all ]]; then
    # Each decode step's event time, host time and kernels, bf16 against the design's quantized
    # model with and without norm fusion, at 1 and 32 rows. Calibration is off: it changes the
    # codes, not the kernels or their speed, and at 32 rows it costs ~100 s of compile (s12run1-2).
    design_rtn='"quant_config": {"ffn_layers": {"weight_bits": 4, "activation_bits": 8}, "attn_layers": {"weight_bits": 6, "activation_bits": 12}, "norm_layers": {"dtype": "float16"}, "calibration": {"example_inputs": false}}, "cuda_graphs": true'
    for rows in 1 32; do
      python3 bench/decode_steps.py --batch $rows --steps 32 \
        --backends q3n+cudagraphs,quant+cudagraphs,quant+norm+cudagraphs \
        --set "quant+cudagraphs={$design_rtn}" --set "quant+norm+cudagraphs={$design_rtn, \"norm_fusion\": true}" \
        --out "$OUT/decode-steps-b$rows.json" 2>&1 | tee "$OUT/decode-steps-b$rows.log" | grep -v "Warn\|warn" | tail -40
      [[ ${PIPESTATUS[0]} == 0 ]] || status=1
    done
  fi
  if [[ $step == host || $step == all ]]; then
    # Host time of one quantized linear call, layer by layer, next to bf16 F.linear.
    python3 bench/bench_decode_overhead.py --qlinear --no-steps --out "$OUT/qlinear-host-overhead.json" \
      2>&1 | tee "$OUT/qlinear-host-overhead.log" | tail -32
    [[ ${PIPESTATUS[0]} == 0 ]] || status=1
  fi
done
exit $status
