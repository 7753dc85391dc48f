"""One launch of each of a few quantized-linear paths and their bf16 cuBLAS peers, for Nsight
Compute: warm-up outside the profiled range, then each case once between
``cudaProfilerStart``/``Stop``, so ``ncu --profile-from-start off`` sees exactly those launches.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \
        --section WarpStateStats --section SourceCounters ... \
        python bench/ncu_qlinear.py --cases w4a16:128x12288x4096 bf16:128x12288x4096

A case is ``FORMAT:MxNxK`` with FORMAT one of bench_qlinear.py's formats or ``bf16``
(``F.linear``); ``FORMAT:MxNxK:key=value,...`` forces path keys (``path=mmT,BLOCK_M=128``...);
``ws:MxNxK:TILE`` launches bench/wg_ws_experiment.py's kernel (W4A16 g128, TILE as its
``--tiles``: ``MxNxSTAGESxLOOKAHEAD``).
Prints each case's dispatched path, so the profile's kernels can be matched to it.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_qlinear import FORMATS, random_packed, resolve_act  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402


def _value(v: str):
    if v in ("True", "False"):
        return v == "True"
    try:
        return int(v)
    except ValueError:
        return v


def build(case: str, gen):
    """(label, fn) for one case string."""
    parts = case.split(":")
    fmt, shape = parts[0], parts[1]
    M, N, K = (int(v) for v in shape.split("x"))
    x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
    if fmt == "bf16":
        w = (torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to(torch.bfloat16)
        return f"bf16 {shape}", lambda: F.linear(x, w)
    if fmt == "ws":
        import wg_ws_experiment as WS

        pw = random_packed(gen, N, K, 4, 128, False)
        tile = WS.parse_tile(parts[2])
        return (f"ws {shape} {parts[2]}",
                lambda: WS.run(x, pw.qweight, pw.scales, pw.zeros, None, K, tile))
    bits, group, sym, act, *act_group = FORMATS[fmt]
    ag = act_group[0] if act_group else Q.PER_TOKEN
    act = resolve_act(act, bits, sym)
    pw = random_packed(gen, N, K, bits, group, sym)
    path = Q.choose_path(M, N, K, bits, group, act, x.dtype, x.device, act_group_size=ag)
    if len(parts) > 2:
        path = dict(path, **{k: _value(v) for k, v in
                             (kv.split("=") for kv in parts[2].split(","))})
    args = (x, pw.qweight, pw.scales, pw.zeros, None, None, bits, group, K, act)
    return (f"{fmt} {shape} {path}",
            lambda: Q._launch(*args, interpreter=False, path=path, act_group_size=ag))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", required=True)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = [build(c, gen) for c in a.cases]
    for _, fn in cases:
        for _ in range(a.warmup):
            fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for label, fn in cases:
        print("case:", label, flush=True)
        fn()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
