"""Host cost of the dispatcher's round trip for an op with q3n::qlinear's signature (CPU or GPU).

    python bench/bench_op_dispatch.py --out bench/results/op-dispatch-cpu.json

A no-op implementation (it returns a new tensor, as q3n's ops do) registered three ways is
called back to back, with the autograd keys on and below them (q3n's compiled inference graphs
run below them): as a ``torch.library.custom_op`` (how ``kernels.contract`` registered q3n's
ops until session 12), as a ``torch.library.Library`` definition with a
``CompositeExplicitAutograd`` kernel (how it registers them now, plus an autograd kernel that
refuses gradients, skipped below autograd), and
as a plain Python call (what q3n's executor does for inference graphs,
``runtime.direct_kernel_calls``). µs a call, the best of 5 rounds of 20000 calls.

``--q3n-op`` also times q3n's own ``q3n::attention`` (a 1 x 2 x 5 x 16 causal call, CPU
reference path) through the op and as its Python implementation: the difference is what the
dispatch costs as q3n registers its ops at the checked-out commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from q3n_compile.compare import git_commit  # noqa: E402

SCHEMA = ("(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, Tensor? smooth, "
          "int bits, int group_size, int in_features, str act, int act_group_size=-1) -> Tensor")


def _impl(x, qweight, scales, zeros, bias, smooth, bits, group_size, in_features, act,
          act_group_size=-1):
    return x.new_empty(x.shape)


@torch.library.custom_op("q3n_bench_dispatch::as_custom_op", mutates_args=())
def _as_custom_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  zeros: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  smooth: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                  act: str, act_group_size: int = -1) -> torch.Tensor:
    return x.new_empty(x.shape)


_LIB = torch.library.Library("q3n_bench_dispatch", "FRAGMENT")
_LIB.define("as_library" + SCHEMA)
_LIB.impl("as_library", _impl, "CompositeExplicitAutograd")


def per_call_us(fn, calls=20000, rounds=5) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def q3n_attention_rows(dev: torch.device) -> list[dict]:
    """q3n::attention through the dispatcher and as its implementation, with the autograd keys
    on (under no_grad) and below them; the op's dispatch cost is the difference."""
    from q3n_compile.kernels import attention  # noqa: F401 - registers the op
    from q3n_compile.kernels import contract

    op = torch.ops.q3n.attention.default
    impl = contract.python_impl(op)
    q = torch.randn(1, 2, 5, 16, device=dev)
    rows = []
    with torch.no_grad():
        for below in (False, True):
            def timed(fn):
                if below:
                    with torch._C._AutoDispatchBelowAutograd():
                        return per_call_us(fn, calls=5000)
                return per_call_us(fn, calls=5000)
            through_op = timed(lambda: op(q, q, q, None, None, True))
            direct = timed(lambda: impl(q, q, q, None, None, True))
            where = "below autograd" if below else "autograd on"
            rows.append(dict(way="q3n::attention dispatch (op - impl)", below_autograd=below,
                             us=through_op - direct, op_us=through_op, impl_us=direct))
            print(f"  {'q3n::attention: op ' + f'{through_op:.1f}, impl {direct:.1f}':38s} "
                  f"{where:15s} {through_op - direct:7.2f} us/call of dispatch", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--q3n-op", action="store_true",
                    help="also time q3n::attention through the op against its implementation")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    x = torch.randn(4, 64, device=dev)
    args = (x, torch.zeros(8, 64, dtype=torch.int32, device=dev), torch.ones(1, 64, device=dev),
            None, None, None, 4, 128, 64, "fp8", -1)
    ways = {
        "custom_op": lambda: torch.ops.q3n_bench_dispatch.as_custom_op.default(*args),
        "Library (CompositeExplicitAutograd)": lambda: torch.ops.q3n_bench_dispatch.as_library.default(*args),
        "plain Python call": lambda: _impl(*args),
    }
    rows = []
    with torch.no_grad():
        for below in (False, True):
            for name, fn in ways.items():
                if below:
                    with torch._C._AutoDispatchBelowAutograd():
                        us = per_call_us(fn)
                else:
                    us = per_call_us(fn)
                rows.append(dict(way=name, below_autograd=below, us=us))
                print(f"  {name:38s} {'below autograd' if below else 'autograd on':15s} {us:7.2f} us/call",
                      flush=True)
    if a.q3n_op:
        rows += q3n_attention_rows(dev)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(dict(
            device=str(dev), cpu=platform.processor() or platform.machine(), torch=torch.__version__,
            commit=git_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
            threads=torch.get_num_threads(), rows=rows), indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
