"""One call of each norm_linear "wg" variant on the GPU against float64 (a first look before the
benchmark: a wrong result or a hang shows here in seconds). Prints the relative error per case.

    python bench/norm_linear_wg_smoke.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from q3n_compile.kernels import norm_linear as NL  # noqa: E402


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    worst = 0.0
    for M, K, N, kind, epi in ((256, 4096, 12288, "layernorm", "none"),
                               (300, 4096, 2 * 1000, "rmsnorm", "silu_gate"),
                               (129, 1000, 3001, "layernorm", "none")):
        x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16) + 3
        w = (torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to(torch.bfloat16)
        b = torch.randn(N, generator=gen, device="cuda")
        rs = w.float().sum(1)
        cfg = NL.choose_config(M, N // 2 if epi == "silu_gate" else N, K, w.dtype, epi,
                               design="wg")
        got = NL._launch(x, w, b, rs, 1e-5, kind, None, epi, None, config=cfg)[0]
        want = NL.reference(x.double(), w.double(), b.double(), None, 1e-5, kind, None, epi,
                            None)[0]
        err = ((got.double() - want).abs() / want.abs().clamp_min(1)).max().item()
        worst = max(worst, err)
        print(f"M={M} K={K} N={N} {kind} {epi}: rel err {err:.3g}", flush=True)
    sys.exit(0 if worst < 4e-2 else 1)


if __name__ == "__main__":
    main()
